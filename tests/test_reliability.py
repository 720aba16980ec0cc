"""Faults survived, for real: processes are killed with SIGKILL, disks fill up, mounts are
read-only. Every surviving run must produce the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
from conftest import quantize, run_cli, session_processes
from reference import load_tensors

pytestmark = [pytest.mark.usefixtures("ray_instance"), pytest.mark.slow]
SAMPLES, SEQ_LEN = 16, 256  # enough work on SmolLM2 (30 layers, ~0.3 s each here) to kill things mid-run


@pytest.fixture(scope="module")
def smol_job(smollm2, tmp_path_factory):
    """SmolLM2, its calibration file, and the output of an uninterrupted run."""
    from nvfp4_ray.demo import demo_calibration

    calibration = demo_calibration(smollm2, SAMPLES, SEQ_LEN)
    clean = str(tmp_path_factory.mktemp("clean") / "out")
    quantize(smollm2, clean, calibration, num_samples=SAMPLES, max_seq_len=SEQ_LEN)
    return smollm2, calibration, clean


def unit_files(folder: str) -> list[str]:
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    return sorted(set(index["weight_map"].values()))


def assert_same_checkpoint(out: str, clean: str) -> None:
    assert unit_files(out) == unit_files(clean)  # same content keys
    assert load_tensors(out) == load_tensors(clean)


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def calibrated_layers(dest: str) -> int:
    folder = os.path.join(dest, ".nvfp4", "calibration")
    return len([n for n in os.listdir(folder) if n.endswith(".json")]) if os.path.isdir(folder) else 0


def run_in_background(**kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["summary"] = quantize(**kwargs)
        except Exception as exc:  # surfaced by the test's assertions
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)  # never outlives a failed test
    thread.start()
    return thread, result


def killed_after(command: list[str], dest: str, layers: int) -> dict:
    """Start the job ``command`` and kill -9 all of it, the driver and every Ray process it
    started (one process session), once ``layers`` layers are calibrated; no checkpoint is
    left. The environment to run it again with."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: calibrated_layers(dest) >= layers, what=f"{layers} calibrated layers")
    finally:
        subprocess.run(["pkill", "-9", "-s", str(job.pid)])
        job.wait()
    assert not os.path.exists(os.path.join(dest, "_SUCCESS"))
    return env


def test_driver_killed_mid_run_resumes_byte_identical(smol_job, tmp_path):
    source, calibration, clean = smol_job
    dest = str(tmp_path / "out")
    command = [os.path.join(os.path.dirname(sys.executable), "nvfp4-ray"), "quantize", source, dest,
               "--calibration", calibration, "--num-samples", str(SAMPLES), "--max-seq-len", str(SEQ_LEN),
               "--checkpoint-minutes", "0"]  # fmt: skip
    env = killed_after(command, dest, 8)

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "reusing" in resumed.stderr and "resuming calibration at layer" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["units_reused"] > 0
    assert_same_checkpoint(dest, clean)


def test_calibration_actor_killed_is_replaced(smol_job, tmp_path):
    source, calibration, clean = smol_job
    dest = str(tmp_path / "out")
    thread, result = run_in_background(source=source, dest=dest, calibration=calibration, num_samples=SAMPLES,
                                       max_seq_len=SEQ_LEN)  # fmt: skip
    wait_for(lambda: calibrated_layers(dest) >= 5, what="five calibrated layers")
    (actor,) = session_processes("ray::LayerWorker")
    os.kill(actor, signal.SIGKILL)
    thread.join(timeout=900)
    assert "error" not in result, result.get("error")
    assert result["summary"]["worker_replacements"] == 1
    assert_same_checkpoint(dest, clean)


def test_worker_killed_while_moe_layers_load_in_expert_groups_is_replaced(smollm2, tmp_path):
    """A DeepSeek-V3-shaped model whose MoE layers fit the device only in 4 expert groups:
    the calibration worker killed mid-run is replaced, the stand-in loads the layers it
    needs again group by group, and the bytes are those of an uninterrupted run."""
    from models import build_model, random_rows, save_model, write_rows
    from test_expert_groups import budget_for

    source = save_model(build_model("deepseek_v3", num_hidden_layers=16), str(tmp_path / "source"), smollm2)
    case = types.SimpleNamespace(source=source, calibration=write_rows(random_rows(6, 2048, 64, 64), str(tmp_path / "rows.parquet")))
    options = dict(source=source, calibration=case.calibration, num_samples=6, max_seq_len=64, ignore=["lm_head"],
                   device_memory_gib=budget_for(case, 4, tmp_path))  # fmt: skip
    clean, dest = str(tmp_path / "clean"), str(tmp_path / "out")
    assert quantize(dest=clean, **options)["device_memory"]["expert_groups"] == 4
    thread, result = run_in_background(dest=dest, **options)
    wait_for(lambda: calibrated_layers(dest) >= 3, what="three calibrated layers")
    (actor,) = session_processes("ray::LayerWorker")
    os.kill(actor, signal.SIGKILL)
    assert calibrated_layers(dest) < 16  # killed while calibrating, not while the last units were written
    thread.join(timeout=900)
    assert "error" not in result, result.get("error")
    assert result["summary"]["worker_replacements"] == 1
    assert_same_checkpoint(dest, clean)


def test_worker_killed_in_a_weight_only_run_is_replaced(smollm2, tmp_path):
    """No calibration: the worker only quantizes; the layers it had not written yet are
    quantized by its replacement."""
    clean, dest = str(tmp_path / "clean"), str(tmp_path / "out")
    quantize(smollm2, clean, scheme="NVFP4A16")
    # a read-ahead of about one layer: the worker is still loading when it is killed
    thread, result = run_in_background(source=smollm2, dest=dest, scheme="NVFP4A16", prefetch_gib=0.01)
    written = lambda: len([n for n in os.listdir(dest) if n.startswith("model-layer-")]) if os.path.isdir(dest) else 0
    wait_for(lambda: written() >= 3, what="three layer files")
    # what a worker killed while it writes a unit leaves (the kill below hits one at times)
    layer = min(n for n in os.listdir(dest) if n.startswith("model-layer-"))
    left = os.path.join(dest, f"{layer}.tmp-0badcafe")
    with open(left, "wb") as handle:
        handle.write(b"half a layer")
    (actor,) = session_processes("ray::LayerWorker")
    os.kill(actor, signal.SIGKILL)
    thread.join(timeout=900)
    assert "error" not in result, result.get("error")
    assert result["summary"]["worker_replacements"] == 1 and written() == 30  # no temporary file left either
    assert_same_checkpoint(dest, clean)


def test_temporary_files_of_a_killed_run_are_removed(family_case, tmp_path):
    """A local write goes to NAME.tmp-XXXXXXXX first; kill -9 can leave one behind."""
    case = family_case("llama")
    dest = tmp_path / "out"
    (dest / ".nvfp4" / "units").mkdir(parents=True)  # what a killed run of ours leaves
    stale = [dest / "model-layer-000-0123456789abcdef.safetensors.tmp-deadbeef", dest / ".nvfp4/units/k.json.tmp-0badf00d"]
    for path in stale:
        path.write_bytes(b"half")
    summary = quantize(case.source, str(dest), case.calibration, num_samples=6)
    assert summary["status"] == "succeeded"
    assert not any(path.exists() for path in stale)
    assert not [p for p in dest.rglob("*") if ".tmp-" in p.name]


def test_dest_on_a_read_only_filesystem(family_case, mount_tmpfs):
    case = family_case("llama")
    dest = os.path.join(mount_tmpfs("ro,size=1m"), "out")
    code, _, stderr = run_cli("quantize", case.source, dest, "--calibration", case.calibration, "--num-samples", "6")
    assert code == 2 and "is not writable: " in stderr and "Read-only file system" in stderr
    assert not os.path.exists(dest)


def test_disk_full_fails_cleanly_and_resumes_elsewhere(family_case, mount_tmpfs, tmp_path):
    case = family_case("llama")
    dest = os.path.join(mount_tmpfs("size=600k"), "out")  # the output needs ~3 MB
    args = ["--calibration", case.calibration, "--num-samples", "6", "--max-seq-len", "64"]
    code, stdout, stderr = run_cli("quantize", case.source, dest, *args)
    assert code == 3, stderr
    assert "No space left on device" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert not os.path.exists(os.path.join(dest, "_SUCCESS"))
    assert json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 3


def test_disk_full_under_a_workers_snapshot_fails_cleanly(family_case, mount_tmpfs, tmp_path):
    """The hidden-state snapshots are written by the calibration workers, not by the driver:
    a full disk there (a tmpfs of one page where they go, the units' folder roomy) fails
    the job with the exit code and the one-line error, naming the file, of a full disk
    under the unit files."""
    from nvfp4_ray.io.versions import CALIBRATION

    case = family_case("llama")
    dest = tmp_path / "out"
    (dest / CALIBRATION).mkdir(parents=True)
    mount_tmpfs("size=4k", dest / CALIBRATION)
    args = ["--calibration", case.calibration, "--num-samples", "6", "--max-seq-len", "64", "--checkpoint-minutes", "0"]
    code, stdout, stderr = run_cli("quantize", case.source, str(dest), *args)
    assert code == 3, stderr
    assert "No space left on device" in stderr and "run the same command again to resume" in stderr
    assert f"{CALIBRATION}/" in stderr.splitlines()[-1]
    assert "Traceback" not in stderr and "a task failed" not in stderr
    assert not (dest / "_SUCCESS").exists()


@pytest.fixture(scope="module")
def gptq_job(smollm2, tmp_path_factory):
    """A random 8-layer Llama (1-2 s a GPTQ layer here: room for a kill mid-run), its
    calibration file, and the output of an uninterrupted GPTQ run."""
    from models import build_model, random_rows, save_model, write_rows

    folder = tmp_path_factory.mktemp("gptq")
    source = save_model(build_model("llama", num_hidden_layers=8), str(folder / "source"), smollm2)
    calibration = write_rows(random_rows(6, 2048, seed=12), str(folder / "calibration.parquet"))
    clean = str(folder / "clean")
    quantize(source, clean, calibration, algorithm="gptq")
    return source, calibration, clean


def test_gptq_driver_killed_mid_run_resumes_byte_identical(gptq_job, tmp_path):
    """GPTQ solves each layer before the next one calibrates: a run killed after a few
    layers resumes from the last hidden-state snapshot, keeps the unit files already
    written, solves the rest and writes the bytes of an uninterrupted run."""
    source, calibration, clean = gptq_job
    dest = str(tmp_path / "out")
    command = [os.path.join(os.path.dirname(sys.executable), "nvfp4-ray"), "quantize", source, dest,
               "--calibration", calibration, "--num-samples", "6", "--max-seq-len", "64", "--algorithm", "gptq",
               "--checkpoint-minutes", "0"]  # fmt: skip
    env = killed_after(command, dest, 3)
    assert calibrated_layers(dest) < 8  # killed mid-run

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming calibration at layer" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["units_reused"] > 0
    assert_same_checkpoint(dest, clean)


def test_gptq_worker_killed_on_a_two_node_cluster_restarts_every_worker(gptq_job, tmp_path):
    """Two calibration workers on two simulated nodes, one of them killed mid-run: the job
    goes on in the same run. The other worker's Hessians and solves of the layer needed the
    lost one's, so both start again from the last hidden-state snapshot (the 3 kept ones:
    after layers 1, 3 and 5). The bytes are those of the one-worker run (the default mode's Hessian sums
    do not depend on how samples are split)."""
    source, calibration, clean = gptq_job
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    dest = str(tmp_path / "cluster")
    process = subprocess.run(
        [sys.executable, os.path.join(repo, "tests", "simulated_cluster.py"), "2", source, dest, calibration, "6",
         "--gptq", "--kill-after", "3"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    assert summary["calibration_workers"] == 2 and summary["killed_at"] < 8
    assert summary["worker_replacements"] == 1
    assert_same_checkpoint(dest, clean)
