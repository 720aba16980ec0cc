"""Shared fixtures: one real local Ray instance per session, the real SmolLM2 checkpoint,
random checkpoints of every supported family and their llm-compressor references, and a
real S3 server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 enables token auth for local instances
os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from models import EQUAL_LENGTH_ROWS, MULTIMODAL_IGNORE, REFERENCE_IGNORE, add_mtp_layer, build_model, random_rows, save_model, write_rows  # noqa: E402
from seaweed import SeaweedServer  # noqa: E402

NUM_ROWS = 6


@pytest.fixture(scope="session")
def s3_server_config(tmp_path_factory):
    """This session's S3 server, not started yet, and its random credentials and endpoint
    in the AWS_* environment (restored afterwards). Set before Ray starts because Ray's
    workers inherit the environment the local instance was started with, not later changes."""
    server = SeaweedServer(
        str(tmp_path_factory.mktemp("seaweedfs")), "NVFP4TEST" + secrets.token_hex(6).upper(), secrets.token_hex(20)
    )
    # Two attempts per request instead of botocore's five: a test that takes the store
    # down fails in seconds, not minutes. Retrying itself is tested with faults the store
    # recovers from (test_object_storage.py).
    env = {**server.env(), "AWS_MAX_ATTEMPTS": "2"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server(s3_server_config):
    """The session's SeaweedFS server, started on first use."""
    if s3_server_config.process is None:
        s3_server_config.start()
    return s3_server_config


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A new, empty bucket for one test; its name."""
    import s3fs

    name = f"t-{secrets.token_hex(4)}-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="session")
def ray_instance(s3_server_config):
    import ray

    _start_ray()
    yield ray
    ray.shutdown()


_RAY_LOGS: list[str] = []  # the session instances' log folders, for the summary of a failed run


def _start_ray() -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30)
    _RAY_LOGS.append(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs"))


def pytest_terminal_summary(terminalreporter, exitstatus):
    """After a failed run, what CI shows last: the machine, and what the session's Ray
    instance logged of its workers' deaths and errors (a job's workers are other processes:
    their tracebacks are not in any test's report)."""
    if exitstatus == 0:
        return
    write = terminalreporter.write_line
    disk = shutil.disk_usage(tempfile.gettempdir())
    write(f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB, "
          f"{disk.free / 2**30:.1f} GiB free in {tempfile.gettempdir()}")  # fmt: skip
    for folder in _RAY_LOGS:
        lines = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if name.endswith(".err") and os.path.getsize(path):
                lines += [f"{name}: {line}" for line in open(path, errors="replace").read().splitlines()[-20:]]
            elif name == "raylet.out":
                words = ("died", "Failed", "failed", "timed out", "killed", "OOM")
                lines += [f"{name}: {line.rstrip()}" for line in open(path, errors="replace")
                          if any(w in line for w in words) and "[state-dump]" not in line and "metric" not in line][-20:]  # fmt: skip
        write(f"the session's Ray instance logged ({folder}):")
        for line in lines[-60:]:
            write("  " + line[:300])


@pytest.fixture(autouse=True)
def ray_left_as_found(request):
    """A test on the session's Ray instance leaves it as it found it: no placement group or
    actor alive, every CPU free. A job that left its workers holding the instance's two
    CPUs would make every later job wait out its placement timeout (15 min each); the test
    that left them fails instead, and its placement groups (their actors with them) are
    removed for the next one, or, where CPUs stay lost, a new instance is started."""
    yield
    if "ray_instance" not in request.fixturenames:
        return
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    def leftovers() -> list[str]:
        groups = [f"placement group {g}: {v['state']}" for g, v in placement_group_table().items() if v["state"] != "REMOVED"]
        actors = [
            f"actor {a['ActorClassName']} {a['ActorID'][:8]}: {a['State']}"
            for a in ray._private.state.actors().values()
            if a["State"] != "DEAD"
        ]
        free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
        return groups + actors + ([f"{free} of {total} CPUs free"] if free < total else [])

    def settled(seconds: float) -> list[str]:  # removals and kills take effect asynchronously
        deadline = time.monotonic() + seconds
        while (found := leftovers()) and time.monotonic() < deadline:
            time.sleep(0.25)
        return found

    found = settled(30)
    if found:
        for group, value in placement_group_table().items():
            if value["state"] != "REMOVED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
        if settled(30):
            ray.shutdown()
            _start_ray()
        pytest.fail(f"the test left the session's Ray instance busy: {found}")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a bf16 safetensors checkpoint (converted once)."""
    from nvfp4_ray.demo import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2_quantized(tmp_path_factory, smollm2, ray_instance):
    """SmolLM2 quantized by nvfp4-ray and by llm-compressor from the same 12 rows of the
    demo calibration set: (nvfp4-ray's folder, llm-compressor's folder, the rows)."""
    import pyarrow.parquet as pq
    from reference import run_llmcompressor

    from nvfp4_ray.demo import demo_calibration

    folder = tmp_path_factory.mktemp("smollm2-quantized")
    calibration = demo_calibration(smollm2, 12, 128)
    rows = pq.read_table(calibration).column("input_ids").to_pylist()
    reference = run_llmcompressor(smollm2, rows, ["lm_head"], str(folder / "reference"))
    ours = str(folder / "ours")
    quantize(smollm2, ours, calibration, num_samples=len(rows), max_seq_len=128)
    return ours, reference, rows


class FamilyCase:
    def __init__(self, family: str, source: str, rows: list[list[int]], calibration: str, ignore: list[str]):
        self.family, self.source, self.rows, self.calibration, self.ignore = family, source, rows, calibration, ignore


@pytest.fixture(scope="session")
def family_case(tmp_path_factory, smollm2):
    """family -> FamilyCase, built once per session."""
    cache: dict[str, FamilyCase] = {}

    def get(family: str) -> FamilyCase:
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            model = build_model(family)
            source = save_model(model, str(folder / "source"), smollm2)
            if family == "deepseek_v3":  # its checkpoints carry a layer transformers does not load
                add_mtp_layer(source, model.config.hidden_size)
            lengths = dict(min_len=40, max_len=40) if family in EQUAL_LENGTH_ROWS else {}
            rows = random_rows(NUM_ROWS, 2048, seed=len(family), **lengths)
            calibration = write_rows(rows, str(folder / "calibration.parquet"))
            ignore = MULTIMODAL_IGNORE if family == "mistral3" else ["lm_head"]
            cache[family] = FamilyCase(family, source, rows, calibration, ignore)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def reference(tmp_path_factory, family_case):
    """family -> folder of llm-compressor's NVFP4 checkpoint for that family's case."""
    from reference import run_llmcompressor

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            case = family_case(family)
            out = str(tmp_path_factory.mktemp(f"{family}-reference"))
            ignore = case.ignore + REFERENCE_IGNORE.get(family, [])
            cache[family] = run_llmcompressor(case.source, case.rows, ignore, out)
        return cache[family]

    return get


def quantize(source: str, dest: str, calibration: str | None = None, events=None, **options) -> dict:
    """Run a job in-process on the session's Ray instance (what the CLI does); its JSON
    events go to ``events`` (a text stream) if given."""
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize

    options.setdefault("num_samples", NUM_ROWS)
    options.setdefault("max_seq_len", 64)
    config = QuantizeConfig(source=source, dest=dest, calibration=calibration, **options)
    return run_quantize(config, Events("json", stream=events if events is not None else io.StringIO()))


def run_cli(*args: str) -> tuple[int, str, str]:
    """``nvfp4-ray ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from nvfp4_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def session_processes(title_prefix: str) -> list[int]:
    """PIDs of this test session's Ray workers whose process title starts with the prefix
    (Ray titles a worker "ray::<task or actor>"); other Ray instances on the machine are ignored."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    children = subprocess.run(["pgrep", "-P", str(raylet)], capture_output=True, text=True).stdout.split()
    found = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if handle.read().startswith(title_prefix.encode()):
                    found.append(int(pid))
        except FileNotFoundError:
            continue
    return found


@pytest.fixture(scope="session")
def gptq_reference(tmp_path_factory, family_case):
    """family -> folder of llm-compressor's GPTQ NVFP4 checkpoint (GPTQModifier defaults,
    samples in file order) for that family's case."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from reference import run_llmcompressor

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            case = family_case(family)
            out = str(tmp_path_factory.mktemp(f"{family}-gptq-reference"))
            recipe = GPTQModifier(targets="Linear", scheme="NVFP4", ignore=list(case.ignore))
            cache[family] = run_llmcompressor(case.source, case.rows, case.ignore, out, recipe=recipe, shuffle=False)
        return cache[family]

    return get


@pytest.fixture
def mount_tmpfs(tmp_path):
    """A real mount point; unmounted afterwards."""
    mounts = []

    def mount(options: str, point=None) -> str:
        """A new tmpfs with these options, at ``point`` (an empty folder) or a new one."""
        if point is None:
            point = tmp_path / f"mount{len(mounts)}"
            point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounts.append(point)
        return str(point)

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)])
