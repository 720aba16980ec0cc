"""Ray jobs for real: ``ray job submit`` to a head the test starts, and a simulated
multi-node cluster where every node takes part and reads each layer once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import NUM_ROWS, run_cli
from reference import load_tensors

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started with `ray start --head`, with its job server on a free port."""
    # The job's `python` is looked up on the head's PATH: make it this environment's.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": os.pathsep.join([BIN, os.environ["PATH"]])}
    dashboard = free_port()
    ports = ["--port", str(free_port()), "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
             "--object-manager-port", str(free_port())]  # fmt: skip
    temp_dir = str(tmp_path_factory.mktemp("ray-head"))
    # --block keeps `ray start` in the foreground: terminating it stops exactly this head
    # (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
         "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    wait_for_job_server(address)
    try:
        yield address, env
    finally:
        head.terminate()
        head.wait(timeout=60)


def wait_for_job_server(address: str) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def submit(address: str, env: dict, *args: str) -> dict:
    """`ray job submit --no-wait`, then wait for the job to finish; return its details."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"nvfp4-test-{time.time_ns()}"
    subprocess.run(
        [f"{BIN}/ray", "job", "submit", "--address", address, "--submission-id", submission_id,
         "--runtime-env", os.path.join(REPO, "cluster", "runtime_env.yaml"), "--working-dir", REPO, "--no-wait",
         "--", "python", "jobs/quantize.py", *args],
        check=True, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    client = JobSubmissionClient(address)
    deadline = time.time() + 600
    while time.time() < deadline:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal():
            return {"info": info, "logs": client.get_job_logs(submission_id)}
        time.sleep(1)
    raise TimeoutError(submission_id)


def job_args(case, dest: str) -> list[str]:
    return [case.source, dest, "--calibration", case.calibration, "--num-samples", str(NUM_ROWS), "--max-seq-len", "64"]


@pytest.mark.usefixtures("ray_instance")
def test_ray_job_submit_matches_the_cli(ray_head, family_case, tmp_path):
    address, env = ray_head
    case = family_case("llama")
    job_dest, cli_dest = str(tmp_path / "job"), str(tmp_path / "cli")

    result = submit(address, env, *job_args(case, job_dest))
    assert result["info"].status.name == "SUCCEEDED", result["logs"][-3000:]
    summary = json.loads(result["logs"].strip().splitlines()[-1])  # the log's last line is the summary
    assert summary["status"] == "succeeded" and summary["dest"] == job_dest
    assert "[nvfp4-ray] progress layers" in result["logs"]  # progress is readable in `ray job logs`

    assert run_cli("quantize", *job_args(case, cli_dest))[0] == 0
    assert load_tensors(job_dest) == load_tensors(cli_dest)
    for name in ("config.json", "model.safetensors.index.json", "recipe.yaml"):
        assert open(os.path.join(job_dest, name)).read() == open(os.path.join(cli_dest, name)).read()


def test_ray_job_with_bad_input_fails_with_exit_code_2(ray_head, family_case, tmp_path):
    address, env = ray_head
    case = family_case("llama")
    result = submit(address, env, str(tmp_path / "missing"), str(tmp_path / "dest"), "--calibration", case.calibration)
    info = result["info"]
    assert info.status.name == "FAILED"
    assert info.driver_exit_code == 2
    summary = json.loads(result["logs"].strip().splitlines()[-1])
    assert summary == {"status": "failed", "exit_code": 2, "error": f"SOURCE {tmp_path / 'missing'} does not exist"}


def gptq_budget_with_no_layer_ahead(case, tmp_path, workers: int) -> float:
    """GiB between the GPTQ plan's estimate with no layer loaded ahead and with one (two
    queued writes; device_memory.plan_device): each layer is loaded only once the one before is done. Streamed layers
    then have loads still to submit when their GPTQ steps come: Ray's in-order actor calls
    deadlocked such jobs before the loads were all submitted first (gptq_flow._solve_layer)."""
    from nvfp4_ray.calibration.batches import block_size, make_batches
    from nvfp4_ray.calibration.hessians import blocks_of, device_bytes, worker_runs
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.device_memory import estimate
    from nvfp4_ray.pipeline.plan import build_plan, read_inputs

    config = QuantizeConfig(source=case.source, dest=str(tmp_path / "probe"), calibration=case.calibration,
                            num_samples=NUM_ROWS, max_seq_len=64, algorithm="gptq")  # fmt: skip
    plan = build_plan(config, read_inputs(config))
    batches = make_batches(plan.samples, None)
    size = block_size(len(batches), False)
    shares = worker_runs(batches, size, workers)  # as GptqExecution deals them
    longest = max(batch.input_ids.shape[-1] for batch in batches)
    hessians = device_bytes([unit.spec.groups for unit in plan.layer_units], max(len(blocks_of(s, size)) for s in shares),
                            longest)  # fmt: skip
    text_config = plan.source.config.get("text_config") or plan.source.config
    need = estimate(plan.layer_units, shares, text_config, hessians)[0]
    return (need(0, 2) + need(1, 2)) / 2 / 2**30


@pytest.mark.usefixtures("ray_instance")
def test_simulated_cluster_of_two_nodes_with_two_gpus_each(family_case, bucket, tmp_path):
    """One worker per (fake) GPU, two on each node; each node reads every layer exactly once
    for its two workers; same bytes as one worker. DeepSeek-V3's layout: a dense first
    layer, then MoE layers with shared experts, MLA. Then twice from S3 with a read-ahead
    of one layer, so that the MoE layers read after the plan come a part at a time
    (pipeline/part_streams.py), each part read once on a node for both its workers: taken
    whole by the devices, and with a budget that holds the MoE layers in 4 expert groups
    only (calibration/expert_groups.py); and from S3 with GPTQ, its MoE layer a part at a
    time too, with no layer loaded ahead (the same bytes as GPTQ on one worker). The same
    bytes, each layer read once per node."""
    import s3fs
    from test_expert_groups import budget_for

    case = family_case("deepseek_v3")
    s3fs.S3FileSystem(skip_instance_cache=True).put(case.source + "/", f"{bucket}/src/", recursive=True)
    dest = str(tmp_path / "cluster")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    streamed = {"source": f"s3://{bucket}/src", "prefetch_gib": 1e-9}
    grouped = {**streamed, "device_memory_gib": budget_for(case, 4, tmp_path, workers=4)}
    gptq = {**streamed, "algorithm": "gptq", "device_memory_gib": gptq_budget_with_no_layer_ahead(case, tmp_path, 4)}
    process = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "simulated_cluster.py"), "2", case.source, dest, case.calibration, str(NUM_ROWS),
         "--gpus-per-node", "2", "--then", json.dumps([streamed, grouped, gptq])],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    then = summary.pop("then")
    assert [result["device_memory"]["expert_groups"] for result in then] == [1, 4, 1]
    assert then[2]["device_memory"]["layers_ahead"] == 0
    # layers 0 and 1 are read whole while the workers start, before the plan (two reads in
    # flight: layer_reads.READING); the last MoE layer a part at a time, on each node
    assert [result["layer_reads_in_parts"] for result in (summary, *then)] == [0, 2, 2, 2]
    single, single_gptq = str(tmp_path / "single"), str(tmp_path / "single-gptq")
    assert run_cli("quantize", *job_args(case, single))[0] == 0
    assert run_cli("quantize", *job_args(case, single_gptq), "--algorithm", "gptq")[0] == 0
    outputs = [(summary, dest, single), *((result, f"{dest}-then-{i}", single) for i, result in enumerate(then[:2])),
               (then[2], f"{dest}-then-2", single_gptq)]  # fmt: skip
    for result, out, expected in outputs:
        layers = result["layers"]
        assert result["calibration_workers"] == 4
        reads = result["layer_reads_per_node"]
        assert sorted(reads) == sorted(summary["nodes"])  # every node took part
        assert all(count == layers for count in reads.values())  # once per layer per node, not per worker
        assert load_tensors(out) == load_tensors(expected)


@pytest.mark.usefixtures("ray_instance")
def test_gpu_workers_wait_for_nodes_that_join_later(family_case, tmp_path):
    """worker_device=gpu on a cluster with no GPU node yet: the job waits for the nodes an
    autoscaler adds (here: joined 5 s after the start) instead of falling back to CPU."""
    case = family_case("llama")
    dest = str(tmp_path / "late")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "simulated_cluster.py"), "2", case.source, dest,
         case.calibration, str(NUM_ROWS), "--late-gpus"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    assert summary["calibration_workers"] == 2
    assert len(summary["layer_reads_per_node"]) == 2  # the two GPU nodes that joined, not the head
