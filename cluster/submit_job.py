"""Run ``jobs/quantize.py`` on a Ray cluster and exit with the job's own exit code.

``ray job submit`` exits 1 for every failed job, but schedulers need the job's codes: 2 (bad
input or configuration: do not retry) and 3 (failed while running: the same command
resumes). This submits the same way (``--working-dir .`` with cluster/runtime_env.yaml),
streams the job's logs, then exits with the driver's exit code, and ends its stdout with the
job's JSON summary line, like ``jobs/quantize.py`` run locally:

    python cluster/submit_job.py [--address http://HEAD:8265] [--outputs DIR] -- \\
        --config jobs/configs/mistral-medium-3.5-128b-nvfp4.yaml [--if-changed]

``--outputs DIR`` also writes ``summary.json``, ``status`` and ``exit_code`` there, for
pipeline engines that read step outputs from files. As for ``ray job submit``,
RAY_API_SERVER_ADDRESS or RAY_ADDRESS, when set, win over ``--address``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
import traceback
from pathlib import Path

import yaml

EXIT_RUN = 3  # nvfp4_ray.errors.EXIT_RUN; this script runs where the package may not be installed
ENTRYPOINT = ["python", "jobs/quantize.py"]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="submit_job.py",
        description="Submit jobs/quantize.py to a Ray cluster; exit with its exit code.",
        usage="%(prog)s [options] -- QUANTIZE_ARGS...",
    )
    parser.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265")
    parser.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir")
    parser.add_argument("--runtime-env", default="cluster/runtime_env.yaml", help="runtime_env YAML file")
    parser.add_argument("--outputs", metavar="DIR", help="write summary.json, status and exit_code here")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    job_args = argv[split + 1 :]
    if not job_args:
        parser.error("give the arguments of jobs/quantize.py after --")
    return args, job_args


def last_summary(logs: str) -> dict | None:
    """The job's final JSON summary: the last log line that is a JSON object with a
    ``status`` (``--log-format json`` event lines carry an ``event`` key instead)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "status" in record and "event" not in record:
            return record
    return None


def write_outputs(folder: str, summary: dict, code: int) -> None:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary) + "\n")
    (path / "status").write_text(str(summary.get("status", "failed")))
    (path / "exit_code").write_text(str(code))


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _stop_on_sigterm(client, job_id: str) -> None:
    """A scheduler that kills this pod (deadline, deletion) should not leave the job running
    on the cluster, where it would overlap the next run on the same DEST."""

    def stop(signum, frame):
        client.stop_job(job_id)
        print(f"submit_job.py: stopped Ray job {job_id}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_RUN)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run(args: argparse.Namespace, job_args: list[str]) -> tuple[int, dict]:
    from ray.job_submission import JobSubmissionClient

    runtime_env = yaml.safe_load(Path(args.runtime_env).read_text()) or {}
    runtime_env["working_dir"] = args.working_dir
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=shlex.join(ENTRYPOINT + job_args), runtime_env=runtime_env)
    print(f"submit_job.py: submitted Ray job {job_id}", file=sys.stderr, flush=True)
    _stop_on_sigterm(client, job_id)
    asyncio.run(_stream_logs(client, job_id))

    info = client.get_job_info(job_id)
    # No exit code: the driver never ran or was stopped (runtime env setup, `ray job stop`,
    # a lost head node). Re-running is the remedy, as for exit 3.
    code = EXIT_RUN if info.driver_exit_code is None else info.driver_exit_code
    summary = last_summary(client.get_job_logs(job_id)) or _failure(
        code, f"Ray job {job_id} ended {info.status} without a summary: {info.message}"
    )
    return code, summary


def _failure(code: int, error: str) -> dict:
    return {"status": "failed", "exit_code": code, "error": error}


def main(argv: list[str] | None = None) -> int:
    args, job_args = parse_args(argv)
    try:
        code, summary = run(args, job_args)
    except Exception as exc:  # cluster unreachable, upload failed: as cli.py, resumable
        traceback.print_exc(file=sys.stderr)
        code, summary = EXIT_RUN, _failure(EXIT_RUN, f"submit_job.py: {type(exc).__name__}: {exc}")
    if args.outputs:
        write_outputs(args.outputs, summary, code)
    print(json.dumps(summary), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
