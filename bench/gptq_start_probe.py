"""What a GPTQ layer worker's start costs on this GPU, step by step, in fresh processes.

Each child process does what LayerWorker.__init__ and _start_gptq do, in order, timing
each step: torch, the CUDA context, nvfp4_ray.layer_quantizer (compressed-tensors and
transformers), the runner, llm-compressor's GPTQ modules (workers._gptq_modules_alone),
the GPTQ steps, Triton's driver, cuSOLVER's first Cholesky, then gptq.warm_up twice (the
first compiles llm-compressor's Triton block update, or finds it in Triton's disk cache).
Runs, each in its own process:

  cold       an empty TRITON_CACHE_DIR (a fresh machine)
  warm       the same directory again (the kernel and its launcher on disk)
  profiled   another empty directory, the first warm_up under cProfile (its largest callees)
  early      an empty directory; Triton's driver and the first Cholesky in a thread started
             right after the CUDA context, beside the quantizer's import

    python -m bench.gptq_start_probe [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(mode: str) -> dict:
    laps, clock = {}, [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        laps[name] = round(now - clock[0], 4)
        clock[0] = now

    from nvfp4_ray.pipeline.workers import UNUSED_BY_WORKERS

    for name in UNUSED_BY_WORKERS:
        sys.modules.setdefault(name, None)
    lap("workers_module")
    import torch

    lap("torch")
    device = torch.device("cuda")
    torch.empty(1, device=device)
    lap("cuda")

    def solver_and_driver():
        import triton

        triton.runtime.driver.active.get_current_device()
        hessian = torch.eye(256, device=device) * 2
        torch.linalg.cholesky(hessian)
        torch.cuda.synchronize(device)

    early = None
    if mode == "early":
        import threading

        early = threading.Thread(target=solver_and_driver)
        early.start()
    import nvfp4_ray.layer_quantizer  # noqa: F401

    lap("quantizer")
    from nvfp4_ray.calibration.runner import DecoderRunner  # noqa: F401

    lap("runner")
    if early is not None:
        early.join()
        lap("early_join")
    from nvfp4_ray.pipeline.workers import _gptq_modules_alone

    _gptq_modules_alone()
    import llmcompressor.modifiers.gptq.gptq_quantize  # noqa: F401

    lap("gptq_modules")
    from nvfp4_ray.pipeline.gptq_worker import GptqSteps  # noqa: F401

    lap("gptq_steps")
    if early is None:
        import triton

        triton.runtime.driver.active.get_current_device()
        lap("triton_driver")
        hessian = torch.eye(256, device=device) * 2
        torch.linalg.cholesky(hessian)
        torch.cuda.synchronize(device)
        lap("first_cholesky")
    from nvfp4_ray.formats import gptq

    profile = None
    if mode == "profiled":
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    gptq.warm_up(device, False)
    torch.cuda.synchronize(device)
    if profile is not None:
        profile.disable()
    lap("warm_up")
    gptq.warm_up(device, False)
    torch.cuda.synchronize(device)
    lap("warm_up_again")
    result = {"laps_s": laps, "total_s": round(sum(laps.values()), 3)}
    if profile is not None:
        import pstats

        stats = pstats.Stats(profile)
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])[:25]  # cumulative time
        result["warm_up_cumulative_s"] = [[f"{path.split('site-packages/')[-1]}:{line}:{fn}", round(cum, 4)]
                                          for (path, line, fn), (_, _, _, cum, _) in rows]  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    import torch

    runs = {}
    shared = tempfile.mkdtemp(prefix="triton-probe-")
    for mode, cache in (("cold", shared), ("warm", shared), ("profiled", tempfile.mkdtemp(prefix="triton-probe-")),
                        ("early", tempfile.mkdtemp(prefix="triton-probe-"))):  # fmt: skip
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "bench.gptq_start_probe", "--child", mode], env=env,
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            sys.exit(f"{mode}: {done.stderr[-3000:]}")
        out = done.stdout
        runs[mode] = {**json.loads(out.strip().splitlines()[-1]), "process_wall_s": round(time.monotonic() - began, 3)}
        print(mode, json.dumps(runs[mode]), flush=True)
    record = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
              "what": " ".join(__doc__.split("\n\n")[1:3]), "runs": runs}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
