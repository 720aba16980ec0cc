"""Run one job on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``).

Every node is a real set of Ray processes on this machine and advertises one fake GPU,
so the job places one calibration worker per node. Used by tests/test_ray_jobs.py in a
subprocess (a process can join only one Ray cluster).

usage: simulated_cluster.py NODES SOURCE DEST CALIBRATION NUM_SAMPLES [--late-gpus] [--gptq] [--then JSON]
                            [--gpus-per-node N] [--workers N,N,...] [--kill-after LAYERS]

--late-gpus: the cluster starts without any GPU node and the job asks for NODES GPU
workers (worker_device=gpu); the GPU nodes join a few seconds after the job started,
as an autoscaler would add them.
--gptq: quantize with GPTQ (--algorithm gptq).
--gpus-per-node N: N fake GPUs on each node, so N workers share it (default 1).
--then JSON: after the job, the same job again on the same cluster for each JSON object of
this list, with its QuantizeConfig fields changed, into DEST-then-<i>; their summaries are
the first's "then".
--workers N,N,...: one job after the other on the same cluster, job i with num_workers N_i
(one worker per GPU node, so on N_i nodes) into DEST/workers-N_i; the last line is then a
JSON list of their summaries (a cluster started once instead of once per job).
--kill-after LAYERS: kill -9 the process of one of the job's workers once LAYERS layers are
calibrated (their statistics at DEST); the summary's "killed_at" is how many there were then.
"""

import io
import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    nodes, source, dest, calibration, num_samples = sys.argv[1:6]
    late = "--late-gpus" in sys.argv[6:]
    algorithm = "gptq" if "--gptq" in sys.argv[6:] else "rtn"
    jobs = None
    if "--workers" in sys.argv[6:]:
        jobs = [int(n) for n in sys.argv[sys.argv.index("--workers") + 1].split(",")]
    import ray
    from ray.cluster_utils import Cluster

    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize

    per_node = int(sys.argv[sys.argv.index("--gpus-per-node") + 1]) if "--gpus-per-node" in sys.argv[6:] else 1
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0 if late else per_node})
    for _ in range(int(nodes) - (0 if late else 1)):
        if not late:
            cluster.add_node(num_cpus=4, num_gpus=per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    try:
        if jobs is not None:
            summaries = []
            for workers in jobs:
                config = QuantizeConfig(
                    source=source, dest=os.path.join(dest, f"workers-{workers}"), calibration=calibration,
                    num_samples=int(num_samples), max_seq_len=64, algorithm=algorithm, num_workers=workers,
                )
                summaries.append(run_quantize(config, Events("json", stream=io.StringIO())))
            print(json.dumps(summaries))
            return
        options = {"worker_device": "gpu", "num_workers": int(nodes)} if late else {}
        config = QuantizeConfig(
            source=source, dest=dest, calibration=calibration, num_samples=int(num_samples), max_seq_len=64,
            algorithm=algorithm, **options
        )
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(run_quantize(config, Events("json", stream=io.StringIO()))))
        job.start()
        killed_at = None
        if "--kill-after" in sys.argv[6:]:
            killed_at = kill_a_worker(dest, int(sys.argv[sys.argv.index("--kill-after") + 1]))
        if late:  # nodes join while the job waits for its placement group (main thread only)
            time.sleep(5)
            for _ in range(int(nodes)):
                cluster.add_node(num_cpus=4, num_gpus=1)
        job.join()
        if not result:
            raise SystemExit("the job failed")
        summary = result
        if killed_at is not None:
            summary["killed_at"] = killed_at
        summary["nodes"] = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        if "--then" in sys.argv[6:]:
            summary["then"] = []
            for i, changes in enumerate(json.loads(sys.argv[sys.argv.index("--then") + 1])):
                then = QuantizeConfig(**{**config.model_dump(), "dest": f"{dest}-then-{i}", **changes})
                summary["then"].append(run_quantize(then, Events("json", stream=io.StringIO())))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(summary))


def kill_a_worker(dest: str, layers: int) -> int:
    """SIGKILL one LayerWorker process once ``layers`` layers' statistics are at DEST."""
    import signal

    from ray.util.state import list_actors

    folder = os.path.join(dest, ".nvfp4", "calibration")
    calibrated = lambda: len([n for n in os.listdir(folder) if n.endswith(".json")]) if os.path.isdir(folder) else 0
    deadline = time.time() + 300
    while calibrated() < layers:
        if time.time() > deadline:
            raise SystemExit(f"{layers} layers were not calibrated in 300 s")
        time.sleep(0.05)
    actors = list_actors(filters=[("class_name", "=", "LayerWorker"), ("state", "=", "ALIVE")])
    killed_at = calibrated()
    os.kill(sorted(actor.pid for actor in actors)[0], signal.SIGKILL)
    return killed_at


if __name__ == "__main__":
    main()
