"""How fast the layer flow's page-cache read-ahead reads a local source, by reads in flight.

Drives LayerFlow as the driver does (pump, poll, then 50 ms waiting on the workers' calls)
with no workers, so that only the read-ahead moves, over every layer of a model the
benchmark wrote; the source's pages are dropped from the page cache before each pass.
Passes alternate between the values of READING_AHEAD given, so that a drift of the disk
shows in both.

    python bench/readahead_probe.py MODEL_DIR [--in-flight 1,2,1,2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from bench import log  # noqa: E402
from bench.measure import drop_page_cache, files_under  # noqa: E402

DRIVER_POLL_S = 0.05  # what Execution._wait waits on the workers' calls between two pumps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder the benchmark wrote (bench/run.py --work DIR: DIR/model)")
    parser.add_argument("--in-flight", default="1,2,1,2", help="READING_AHEAD of each pass, comma-separated")
    parser.add_argument("--out", help="write the record here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    import nvfp4_ray.pipeline.layer_flow as layer_flow
    import nvfp4_ray.pipeline.layer_reads as layer_reads
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.plan import build_plan, read_inputs

    config = QuantizeConfig(source=args.model, dest="/tmp/nvfp4-readahead-probe", scheme="NVFP4A16")
    plan = build_plan(config, read_inputs(config))
    gigabytes = sum(unit.nbytes for unit in plan.layer_units) / 1e9
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        node = ray.get_runtime_context().get_node_id()
        ray.get([layer_reads.read_ahead_task.remote(args.model, []) for _ in range(4)])  # their processes started
        passes = []
        for in_flight in [int(n) for n in args.in_flight.split(",")]:
            layer_reads.READING_AHEAD = in_flight
            page_cache = drop_page_cache(files_under(args.model))
            flow = layer_flow.LayerFlow(plan, [node], set(), 0, budget=1, readahead=float("inf"), local=True)
            began = time.monotonic()
            while flow.ahead < len(flow.todo) or flow.reading_ahead:
                flow.pump(None)
                flow.poll(block=False)
                time.sleep(DRIVER_POLL_S)
            seconds = time.monotonic() - began
            passes.append({"in_flight": in_flight, "seconds": round(seconds, 3), "gb_per_s": round(gigabytes / seconds, 3),
                           "page_cache": page_cache})  # fmt: skip
            log(f"READING_AHEAD={in_flight}: {len(flow.todo)} layers, {gigabytes:.2f} GB in {seconds:.2f} s "
                f"({gigabytes / seconds:.2f} GB/s)")  # fmt: skip
    finally:
        ray.shutdown()
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model, "layers": len(plan.layer_units),
              "layer_gb": round(gigabytes, 3), "cpus": os.cpu_count(), "passes": passes}  # fmt: skip
    print(f"\n{'READING_AHEAD':>13}  {'seconds':>8}  {'GB/s':>6}")
    for row in passes:
        print(f"{row['in_flight']:>13}  {row['seconds']:>8.2f}  {row['gb_per_s']:>6.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
        log(f"record written to {args.out}")
    return record


if __name__ == "__main__":
    main()
