"""cluster/submit_job.py: the schedule and the pipeline act on its exit code and summary."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from test_ray_jobs import free_port, ray_head  # noqa: F401  (ray_head: `ray start --head` on free ports)

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("submit_job", ROOT / "cluster" / "submit_job.py")
submit_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(submit_job)


def test_last_summary_skips_json_events_and_trailing_log_lines():
    logs = "\n".join(
        [
            '{"time": 1.0, "event": "stage_end", "stage": "plan"}',
            '{"status": "succeeded", "dest": "s3://b/out", "version": "abc"}',
            '{"time": 2.0, "event": "info", "status": "late event"}',
            "2026-01-01 INFO sdk.py -- WebSocket closed",
        ]
    )
    assert submit_job.last_summary(logs) == {"status": "succeeded", "dest": "s3://b/out", "version": "abc"}
    assert submit_job.last_summary("Traceback ...\n{not json") is None


def test_arguments_after_double_dash_go_to_the_job():
    args, job_args = submit_job.parse_args(["--address", "http://h:8265", "--", "--config", "c.yaml", "--if-changed"])
    assert args.address == "http://h:8265" and job_args == ["--config", "c.yaml", "--if-changed"]
    with pytest.raises(SystemExit):
        submit_job.parse_args(["--address", "http://h:8265"])


def test_unreachable_cluster_is_a_resumable_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["--address", f"http://127.0.0.1:{free_port()}", "--outputs", str(tmp_path), "--", "--config", "c.yaml"]
    assert submit_job.main(argv) == 3
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["status"] == "failed" and summary["exit_code"] == 3
    assert (tmp_path / "exit_code").read_text() == "3" and (tmp_path / "status").read_text() == "failed"


STUB = """
import json, sys
code = int(sys.argv[sys.argv.index("--exit") + 1])
status = sys.argv[sys.argv.index("--status") + 1]
print(json.dumps({"time": 1.0, "event": "stage_start", "stage": "plan"}))
print("[nvfp4-ray] progress on stderr", file=sys.stderr)
print(json.dumps({"status": status, "dest": "s3://b/out", "exit_code": code}), flush=True)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def dashboard(ray_head):
    address, _ = ray_head
    _wait_for_job_agent(address, time.monotonic() + 180)
    return address


def _wait_for_job_agent(address: str, deadline: float) -> None:
    """The dashboard answers before its job agent does; a trivial job tells when jobs run."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    while True:
        try:
            job_id = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            assert time.monotonic() < deadline, "the job agent did not start"
            time.sleep(1)
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.monotonic() < deadline, "the first job did not finish"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("exit_code,status", [(3, "failed"), (0, "unchanged")])
def test_exit_code_and_summary_of_the_ray_job_come_back(dashboard, tmp_path, monkeypatch, capsys, exit_code, status):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "jobs").mkdir(parents=True)
    (checkout / "jobs" / "quantize.py").write_text(STUB)
    outputs = tmp_path / "outputs"
    argv = [
        "--address", dashboard,
        "--working-dir", str(checkout),
        "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
        "--outputs", str(outputs),
        "--", "--exit", str(exit_code), "--status", status,
    ]  # fmt: skip
    assert submit_job.main(argv) == exit_code
    summary = {"status": status, "dest": "s3://b/out", "exit_code": exit_code}
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == summary
    assert json.loads((outputs / "summary.json").read_text()) == summary
    assert (outputs / "status").read_text() == status and (outputs / "exit_code").read_text() == str(exit_code)


@pytest.mark.slow
def test_bad_input_to_the_real_entrypoint_is_exit_2(dashboard, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    missing = tmp_path / "missing"
    argv = [
        "--address", dashboard,
        "--working-dir", str(ROOT),
        "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
        "--", str(missing), str(tmp_path / "dest"),
    ]  # fmt: skip
    assert submit_job.main(argv) == 2
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary == {"status": "failed", "exit_code": 2, "error": f"SOURCE {missing} does not exist"}
