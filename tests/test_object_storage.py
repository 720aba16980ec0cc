"""Object storage against a real S3 server (SeaweedFS on 127.0.0.1): range reads that
fetch only what they need with many requests in flight, atomic uploads whose failures are
aborted, retries on throttling and resets, bad input found before any work, a store that
dies mid-job and a re-run that resumes, and byte-identical checkpoints for every pairing
of local and S3 SOURCE and DEST. No credential appears in any output."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import NUM_ROWS, run_cli
from models import build_model, random_rows, save_model, write_rows
from tcp_proxy import TcpProxy

from nvfp4_ray.io import destination
from nvfp4_ray.io.checkpoint import SourceTensor, read_header
from nvfp4_ray.io.range_reads import read_piece_size
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.storage_errors import StorageUnavailable
from nvfp4_ray.io.tensors import read_file, read_tensors

MiB = 1 << 20


def s3fs_client(endpoint: str | None = None):
    """A fresh client (own connection pool) with the options Store uses."""
    import s3fs

    from nvfp4_ray.io.storage import storage_options

    options = storage_options("s3://")
    return s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint, **options)


def through(proxy: TcpProxy, url: str) -> Store:
    """A Store at ``url`` whose requests cross ``proxy`` (on a new connection pool)."""
    store = Store(url)
    store.fs = s3fs_client(proxy.endpoint)
    return store


@pytest.fixture
def proxy(s3_server):
    relay = TcpProxy(s3_server.ports["s3"])
    yield relay
    relay.close()


def secrets_in(text: str) -> list[str]:
    return [name for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID") if os.environ[name] in text]


def pending_uploads(bucket: str, prefix: str = "", client=None) -> list[str]:
    page = (client or s3fs_client()).call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    return [upload["Key"] for upload in page.get("Uploads", [])]


# ---- reads ------------------------------------------------------------------------------
def write_layers_file(store: Store, name: str, layers: int, layer_bytes: int) -> dict[str, bytes]:
    """A safetensors file of ``layers`` layers (two tensors each), like one shard of a model."""
    from nvfp4_ray.io.shards import write_shard

    rng = np.random.default_rng(0)
    raw = {}
    for layer in range(layers):
        for part in ("a", "b"):
            raw[f"model.layers.{layer}.{part}.weight"] = rng.integers(0, 256, layer_bytes // 2, dtype=np.uint8).tobytes()
    write_shard(store, name, [(tensor, "U8", (len(data),), memoryview(data)) for tensor, data in raw.items()])
    return raw


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_copied_tensor_is_streamed_in_chunks_into_the_same_bytes_as_a_whole_write(where, bucket, tmp_path, monkeypatch):
    """CopiedShard writes the file write_shard would, holding one chunk at a time; a NaN in
    a later chunk leaves no file at DEST, and the error names the tensor."""
    import nvfp4_ray.io.shards as shards
    from nvfp4_ray.errors import InputError

    monkeypatch.setattr(shards, "_COPY_CHUNK", 4096)
    source = Store(str(tmp_path / "source"))
    rng = np.random.default_rng(0)
    values = {"lm_head.weight": rng.standard_normal((64, 200)), "model.norm.weight": rng.standard_normal(300)}
    raw = {name: value.astype(np.float32).tobytes() for name, value in values.items()}
    shards.write_shard(source, "in.safetensors", [(n, "F32", values[n].shape, memoryview(b)) for n, b in raw.items()])
    entries = read_header(source, "in.safetensors", source.info("in.safetensors").size)
    dest = Store(str(tmp_path / "dest") if where == "local" else f"s3://{bucket}/dest")
    expected = shards.write_shard(dest, "whole.safetensors", [(n, "F32", values[n].shape, memoryview(b)) for n, b in raw.items()])

    shard = shards.CopiedShard("copy.safetensors", source, [SourceTensor("in.safetensors", e) for e in entries.values()])
    parts = list(shard.parts())
    assert max(len(part) for part in parts[1:]) == 4096 and len(parts) > 2 * len(raw)
    dest.write_parts("copy.safetensors", parts)
    assert dest.read_bytes("copy.safetensors") == dest.read_bytes("whole.safetensors")
    assert (shard.written.size, shard.written.sha256, shard.written.tensors) == (expected.size, expected.sha256, expected.tensors)

    broken = values["lm_head.weight"].astype(np.float32)
    broken[60, 3] = np.nan  # in the last of its chunks
    shards.write_shard(source, "in.safetensors", [("lm_head.weight", "F32", broken.shape, memoryview(broken.tobytes()))])
    entries = read_header(source, "in.safetensors", source.info("in.safetensors").size)
    shard = shards.CopiedShard("broken.safetensors", source, [SourceTensor("in.safetensors", e) for e in entries.values()])
    with pytest.raises(InputError, match="tensor 'lm_head.weight' contains NaN or Inf"):
        dest.write_parts("broken.safetensors", shard.parts())
    assert not dest.exists("broken.safetensors") and shard.written is None
    if where == "local":  # no temporary file left behind either
        assert sorted(os.listdir(tmp_path / "dest")) == ["copy.safetensors", "whole.safetensors"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tensors_written_through_a_small_buffer_are_the_bytes_of_a_whole_write(where, bucket, tmp_path):
    """TensorShard (a worker's units and snapshots) copies tensors through one host buffer
    that is refilled for every part, the chunks not dividing the tensors: the file and its
    digest are those write_shard makes of the tensors' bytes, and so without a buffer."""
    import torch

    from nvfp4_ray.io.shards import TensorShard, write_shard

    generator = torch.Generator().manual_seed(0)
    tensors = [
        ("b.weight", torch.randn(37, 19, generator=generator).to(torch.bfloat16)),
        ("a.weight_scale", torch.randn(5, 3, generator=generator).to(torch.float8_e4m3fn)),
        ("a.weight_global_scale", torch.tensor([448.0 * 6 / 3.0])),
        ("c.scalar", torch.tensor(2.5)),
        ("d.empty", torch.empty(0, 4)),
    ]
    dest = Store(str(tmp_path / "dest") if where == "local" else f"s3://{bucket}/tensor-shard")
    entries = [(n, t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()) for n, t in tensors]
    dtypes = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}
    expected = write_shard(dest, "whole.safetensors", [(n, dtypes[d], s, memoryview(b)) for n, d, s, b in entries])

    buffer = torch.empty(7, dtype=torch.uint8)
    for name, shard in [("chunked.safetensors", TensorShard("chunked.safetensors", tensors, buffer)),
                        ("own.safetensors", TensorShard("own.safetensors", tensors))]:  # fmt: skip
        dest.write_parts(name, shard.parts(), size=shard.size)
        assert dest.read_bytes(name) == dest.read_bytes("whole.safetensors")
        assert (shard.written.size, shard.written.sha256, shard.written.tensors) == (expected.size, expected.sha256, expected.tensors)
    assert TensorShard("", tensors, buffer).sha256() == expected.sha256


def test_a_tensor_read_to_a_device_in_pieces_is_the_tensor(tmp_path):
    """LocalRead.to_device (a worker's embedding) reads a piece at a time, the last piece
    short: the same tensor as a whole read, of the second tensor of a file."""
    import torch

    from nvfp4_ray.io.shards import write_shard
    from nvfp4_ray.io.tensors import LocalRead

    store = Store(str(tmp_path))
    values = {"a.weight": torch.randn(7, 5).to(torch.bfloat16), "b.weight": torch.randn(301, 33).to(torch.bfloat16)}
    entries = [(n, "BF16", tuple(v.shape), memoryview(v.view(torch.uint8).reshape(-1).numpy())) for n, v in values.items()]
    write_shard(store, "m.safetensors", entries)
    header = read_header(store, "m.safetensors", store.info("m.safetensors").size)
    local = LocalRead(str(tmp_path), [SourceTensor("m.safetensors", e) for e in header.values()])
    pieces = [torch.empty(1000, dtype=torch.uint8) for _ in range(2)]
    weight = local.to_device("b.weight", torch.device("cpu"), pieces)  # 19,866 bytes: 20 pieces
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, values["b.weight"])
    assert torch.equal(weight, local.read().tensor("b.weight"))


def test_a_layer_crossing_in_pieces_has_the_bytes_of_a_whole_read(tmp_path):
    """A layer's tensors in two files, with a tensor not wanted between two pairs of them
    (wider than _MERGE_GAP: two spans in that file): crossed through pieces smaller than
    the tensors and not dividing the spans, or larger than the layer, the bytes equal
    those of a whole read, from a LocalRead and from the bundle it reads."""
    import torch

    from nvfp4_ray.io.shards import write_shard
    from nvfp4_ray.io.tensors import LocalRead, to_device_in_pieces

    store = Store(str(tmp_path))
    rng = np.random.default_rng(0)

    def tensor(rows):
        return rng.integers(0, 255, (rows, 64), dtype=np.uint8)

    first = {"x.a": tensor(3), "x.b": tensor(40), "x.c": tensor(5), "x.bz": tensor(20000), "x.d": tensor(9)}
    write_shard(store, "one.safetensors", [(n, "U8", v.shape, memoryview(v.tobytes())) for n, v in first.items()])
    write_shard(store, "two.safetensors", [("y.a", "U8", (7, 64), memoryview(tensor(7).tobytes()))])
    wanted = []
    for file_name, names in (("one.safetensors", ("x.a", "x.b", "x.d", "x.c")), ("two.safetensors", ("y.a",))):
        header = read_header(store, file_name, store.info(file_name).size)
        wanted += [SourceTensor(file_name, header[name]) for name in names]
    local = LocalRead(str(tmp_path), wanted)
    whole = local.read()
    assert local.size == whole.size and local.entries == whole.entries
    assert len(local._layout[0]) == 3  # x.a-x.b, x.c-x.d (past x.bz: a gap wider than _MERGE_GAP), y.a
    for source in (local, whole):
        for piece_bytes in (777, 4096, whole.size, whole.size + 1):
            pieces = [torch.empty(piece_bytes, dtype=torch.uint8) for _ in range(2)]
            crossed = to_device_in_pieces(source, torch.device("cpu"), pieces)
            assert crossed.numpy().tobytes() == whole.buffer.tobytes(), (type(source).__name__, piece_bytes)


def test_a_layer_is_read_with_concurrent_range_requests_not_the_whole_file(bucket, proxy):
    layer_bytes = 32 * MiB
    raw = write_layers_file(Store(f"s3://{bucket}/model"), "shard.safetensors", layers=4, layer_bytes=layer_bytes)

    store = through(proxy, f"s3://{bucket}/model")
    size = store.info("shard.safetensors").size
    proxy.reset_counters()
    header = read_header(store, "shard.safetensors", size)  # what planning reads of a shard
    assert proxy.bytes_down < 512 * 1024

    store = through(proxy, f"s3://{bucket}/model")  # a fresh connection pool
    proxy.reset_counters()
    wanted = [SourceTensor("shard.safetensors", entry) for name, entry in header.items() if name.startswith("model.layers.2.")]
    bundle = read_tensors(store, wanted)
    for tensor in wanted:
        assert bundle.raw(tensor.name).tobytes() == raw[tensor.name]
    # The layer's bytes (a quarter of the file) plus HTTP headers crossed the wire ...
    assert layer_bytes <= proxy.bytes_down < layer_bytes + 64 * 1024
    # ... in pieces requested at once: one connection per piece in flight (a piece done
    # before the last one starts lends its connection on: seen once on a loaded machine)
    pieces = layer_bytes // read_piece_size(layer_bytes)
    assert pieces > 1 and pieces // 2 < proxy.connections <= pieces


def test_reads_and_writes_ride_out_throttling_and_resets(bucket, proxy):
    data = np.random.default_rng(1).integers(0, 256, 40 * MiB, dtype=np.uint8).tobytes()
    Store(f"s3://{bucket}/x").write_bytes("blob", data)

    store = through(proxy, f"s3://{bucket}/x")
    proxy.throttle = 3  # 503 SlowDown to the next three requests
    proxy.cut, proxy.cut_after = 3, MiB  # then three responses cut off after 1 MiB
    out = bytearray(30 * MiB)
    store.read_into("blob", [(5 * MiB, 35 * MiB)], memoryview(out))
    assert out == data[5 * MiB : 35 * MiB]
    assert proxy.throttle == 0 and proxy.cut == 0  # every fault was met, and outlasted

    store = through(proxy, f"s3://{bucket}/x")  # new connections, which the proxy throttles
    proxy.throttle = 2
    store.write_bytes("copy", data)  # a multipart upload (40 MiB in 8 parts)
    assert proxy.throttle == 0
    assert Store(f"s3://{bucket}/x").read_bytes("copy") == data


def test_a_failed_multipart_upload_is_aborted_and_leaves_no_object(bucket, proxy):
    store = through(proxy, f"s3://{bucket}/out")
    proxy.cut_uploads, proxy.cut_after = True, MiB  # every request body over 1 MiB is cut
    with pytest.raises(StorageUnavailable) as failure:
        store.write_bytes("big.safetensors", bytes(48 * MiB))
    assert "s3://" in str(failure.value) and not secrets_in(str(failure.value))
    assert not Store(f"s3://{bucket}/out").exists("big.safetensors")
    assert pending_uploads(bucket) == []  # the abort went through: no invisible parts kept


@pytest.mark.parametrize("what", ["unit", "hidden-state snapshot"])
def test_a_workers_write_is_tried_again_after_the_store_fails_it(what, bucket, proxy, capsys):
    """s3fs gives up on an upload whose every request is cut (above); the worker's write
    (unit_tasks.retrying) tries it again, saying so in its log, and the file lands whole."""
    import torch

    from nvfp4_ray.io.shards import TensorShard
    from nvfp4_ray.pipeline.unit_tasks import write_retrying
    from nvfp4_ray.pipeline.workers import _write_hidden

    tensor = torch.arange(6 * MiB, dtype=torch.bfloat16)  # 12 MiB: a multipart upload, aborted when cut
    store = through(proxy, f"s3://{bucket}/out")
    if what == "unit":
        write = lambda: write_retrying(store, "layer-0", TensorShard("unit.safetensors", [("w", tensor)]))  # noqa: E731
        name = "unit.safetensors"
    else:
        write = lambda: _write_hidden(store, "snapshot", {0: tensor})  # noqa: E731
        name = "snapshot/batch-00000.safetensors"
    proxy.cut_uploads, proxy.cut_after = True, MiB
    result = {}
    writer = threading.Thread(target=lambda: result.update(written=write()))
    writer.start()
    log = ""
    while writer.is_alive() and "warning: writing" not in log:
        log += capsys.readouterr().err
        time.sleep(0.02)
    proxy.cut_uploads = False  # the store recovers
    writer.join(timeout=120)
    log += capsys.readouterr().err

    assert f"nvfp4-ray: warning: writing s3://{bucket}/out/{name} failed" in log, log
    digest = result["written"].sha256 if what == "unit" else result["written"][1]["batch-00000.safetensors"]
    stored = Store(f"s3://{bucket}/out")
    assert hashlib.sha256(stored.read_bytes(name)).hexdigest() == digest and complete_safetensors(stored, name)
    if what == "unit":
        assert destination.load_done(stored, "layer-0", name) == result["written"]
    assert pending_uploads(bucket) == [] and not secrets_in(log)


def test_an_upload_sends_parts_while_its_chunks_are_still_coming_and_a_failing_chunk_aborts_it(bucket):
    """write_parts on S3 does not gather the file first: parts are on the server before the
    last chunk is produced; an error raised by the chunks comes through unchanged, and the
    upload is aborted (no object, no parts kept)."""
    from nvfp4_ray.errors import InputError

    store = Store(f"s3://{bucket}/out")
    client = s3fs_client()
    data = np.random.default_rng(2).integers(0, 256, 32 * MiB, dtype=np.uint8).tobytes()
    seen_before_last = []

    def chunks(fail: bool):
        for start in range(0, len(data), 4 * MiB):
            if start == len(data) - 4 * MiB:  # the last chunk: some parts must be up already
                deadline = time.monotonic() + 10
                while not seen_before_last and time.monotonic() < deadline:
                    for upload in client.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []):
                        parts = client.call_s3("list_parts", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                        seen_before_last.extend(parts.get("Parts", []))
                    time.sleep(0.05)
                if fail:
                    raise InputError("tensor 'x' contains NaN or Inf; the source checkpoint is broken")
            yield memoryview(data)[start : start + 4 * MiB]

    store.write_parts("whole.bin", chunks(fail=False), size=len(data))
    assert seen_before_last, "no part was uploaded before the last chunk"
    assert store.read_bytes("whole.bin") == data

    seen_before_last.clear()
    with pytest.raises(InputError, match="contains NaN or Inf"):
        store.write_parts("broken.bin", chunks(fail=True), size=len(data))
    assert seen_before_last and not store.exists("broken.bin")
    assert pending_uploads(bucket) == []


def test_an_upload_cut_short_by_a_crash_is_aborted_by_the_next_run(bucket, tmp_path):
    """A writer killed mid-upload cannot abort; the next run's cleanup does."""
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys\nfrom nvfp4_ray.io.storage import Store\n"
        f"Store('s3://{bucket}/dst').write_bytes('model-layer-000-x.safetensors', bytes(384 << 20))\n"
    )
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    writer = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": repository})
    client = s3fs_client()
    try:
        while not pending_uploads(bucket, client=client) and writer.poll() is None:
            time.sleep(0.02)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait()
    assert writer.returncode == -signal.SIGKILL, "the upload finished before it could be interrupted"
    assert pending_uploads(bucket) == ["dst/model-layer-000-x.safetensors"]
    assert not Store(f"s3://{bucket}/dst").exists("model-layer-000-x.safetensors")
    # Someone else's upload in flight under DEST: not ours to abort.
    client.call_s3("create_multipart_upload", Bucket=bucket, Key="dst/notes/other.bin")
    assert destination.abort_stale_uploads(Store(f"s3://{bucket}/dst")) == 1
    assert pending_uploads(bucket) == ["dst/notes/other.bin"]


def test_success_marker_is_created_only_once(bucket):
    """_SUCCESS goes up as a conditional PUT (If-None-Match: *): of racing writers one wins."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store(f"s3://{bucket}/dst")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: store.create_exclusive("_SUCCESS", b"writer %d" % i), range(8)))
    assert won.count(True) == 1
    assert store.read_bytes("_SUCCESS") == b"writer %d" % won.index(True)
    assert store.create_exclusive("_SUCCESS", b"late") is False


# ---- whole jobs ---------------------------------------------------------------------------
def quantize_args(source, dest, calibration, *extra):
    return ["quantize", source, dest, "--calibration", calibration, "--num-samples", str(NUM_ROWS),
            "--max-seq-len", "64", "--log-format", "json", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def model_on_s3(tmp_path_factory, smollm2, s3_server):
    """A 6-layer Llama, locally and in a bucket, with its calibration rows."""
    import s3fs

    folder = tmp_path_factory.mktemp("s3-model")
    model = build_model("llama")
    model.model.layers.extend(build_model("llama", seed=1).model.layers)  # six layers
    model.config.num_hidden_layers = 6
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    source = save_model(model, str(folder / "source"), smollm2)
    calibration = write_rows(random_rows(NUM_ROWS, 2048, seed=3), str(folder / "calibration.parquet"))
    name = "models-" + os.urandom(4).hex()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    fs.put(source + "/", f"{name}/src/", recursive=True)
    fs.put(calibration, f"{name}/calib.parquet")
    return {"local": source, "local_calibration": calibration, "bucket": name,
            "s3": f"s3://{name}/src", "s3_calibration": f"s3://{name}/calib.parquet"}  # fmt: skip


def unit_digests(manifest: dict) -> dict[str, str]:
    """sha256 of every unit file by what it holds (the key in its name depends on the
    source's file identities: mtimes locally, ETags on S3)."""
    return {re.sub(r"-[0-9a-f]{16}\.safetensors$", "", name): entry["sha256"]
            for name, entry in manifest["files"].items() if name.endswith(".safetensors")}  # fmt: skip


def checkpoint_tensors(url: str) -> dict[str, tuple]:
    """Every tensor of a committed checkpoint, read through Store (local or S3)."""
    store = Store(url)
    files = sorted(set(json.loads(store.read_text("model.safetensors.index.json"))["weight_map"].values()))
    tensors = {}
    for name in files:
        bundle = read_file(store, name)
        for tensor, (_, dtype, shape) in bundle.entries.items():
            tensors[tensor] = (dtype, shape, bundle.raw(tensor).tobytes())
    return tensors


def all_files_text(url: str) -> str:
    """Every byte under a DEST, local or S3, as text (for the credential check)."""
    store = Store(url)
    paths = store.fs.find(store.root)
    return "\n".join(store.fs.cat_file(path).decode("latin-1") for path in paths)


def ray_logs_text() -> str:
    import ray

    folder = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    texts = []
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                texts.append(handle.read().decode("latin-1"))
    return "\n".join(texts)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_instance")
def test_every_pairing_of_local_and_s3_gives_the_same_checkpoint(model_on_s3, tmp_path):
    case, bucket = model_on_s3, model_on_s3["bucket"]
    runs = {
        "local->local": (case["local"], str(tmp_path / "local"), case["local_calibration"]),
        "s3->s3": (case["s3"], f"s3://{bucket}/dst-s3", case["s3_calibration"]),
        "local->s3": (case["local"], f"s3://{bucket}/dst-local", case["local_calibration"]),
        "s3->local": (case["s3"], str(tmp_path / "from-s3"), case["s3_calibration"]),
    }
    outputs, manifests = [], {}
    for label, (source, dest, calibration) in runs.items():
        code, stdout, stderr = run_cli(*quantize_args(source, dest, calibration))
        assert code == 0, (label, stderr, stdout[-2000:])
        outputs += [stdout, stderr]
        store = Store(dest)
        assert store.exists("_SUCCESS")
        manifests[label] = json.loads(store.read_text("manifest.json"))

    reference = checkpoint_tensors(runs["local->local"][1])
    for label, (_, dest, _) in runs.items():
        assert checkpoint_tensors(dest) == reference, label
        assert unit_digests(manifests[label]) == unit_digests(manifests["local->local"]), label
        for name in ("config.json", "recipe.yaml", "tokenizer.json"):
            assert manifests[label]["files"][name] == manifests["local->local"]["files"][name], (label, name)
        # What the manifest lists is what DEST holds.
        store = Store(dest)
        for name, entry in manifests[label]["files"].items():
            assert store.info(name).size == entry["size"], (label, name)
    s3_manifest = manifests["s3->s3"]
    assert all(identity.startswith("size=") and "etag=" in identity for identity in s3_manifest["fingerprint"]["source"].values())
    assert set(s3_manifest["report"]["timings_s"]) >= {"plan", "layers"}

    texts = outputs + [all_files_text(dest) for _, dest, _ in runs.values()] + [ray_logs_text()]
    assert [secrets_in(text) for text in texts if secrets_in(text)] == []


# ---- bad input ------------------------------------------------------------------------------
def assert_input_error(result, fragment: str) -> str:
    code, stdout, stderr = result
    assert code == 2, (code, stderr, stdout[-2000:])
    errors = [line for line in stderr.splitlines() if line.startswith("nvfp4-ray: error:")]
    assert len(errors) == 1 and fragment in errors[0], stderr
    assert "Traceback" not in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 2
    return errors[0]


@pytest.fixture
def fresh_clients():
    """s3fs reuses clients for equal arguments, whatever the environment says now: start
    from none, so a test's changed credentials or endpoint are used, and leave none."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.usefixtures("ray_instance", "fresh_clients")
@pytest.mark.parametrize(
    "problem, fragment",
    [
        ("wrong secret", "access denied"),
        ("unknown access key", "access denied"),
        ("missing source bucket", "bucket 'no-such-bucket-nvfp4' does not exist"),
        ("missing source prefix", "does not exist"),
        ("missing dest bucket", "bucket 'no-such-bucket-nvfp4' does not exist"),
        ("server down", "cannot reach the object store"),
    ],
)
def test_bad_storage_input_fails_before_any_work(model_on_s3, monkeypatch, problem, fragment):
    import s3fs
    from seaweed import free_ports

    case, bucket = model_on_s3, model_on_s3["bucket"]
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    source, dest = case["s3"], f"s3://{bucket}/dst-bad-{problem.replace(' ', '-')}"
    if problem == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 24)
    elif problem == "unknown access key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY0000")
    elif problem == "missing source bucket":
        source = "s3://no-such-bucket-nvfp4/src"
    elif problem == "missing source prefix":
        source = f"s3://{bucket}/no/such/prefix"
    elif problem == "missing dest bucket":
        dest = "s3://no-such-bucket-nvfp4/dst"
    elif problem == "server down":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    code, stdout, stderr = result = run_cli(*quantize_args(source, dest, case["s3_calibration"]))
    line = assert_input_error(result, fragment)
    assert "s3://" in line  # the message names the location
    assert not any(secret in stdout + stderr for secret in secrets)
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    if "dest bucket" not in problem:
        assert Store(dest).list_files("") == [] and not Store(dest).exists(".nvfp4"), "work started"


# ---- a store that dies mid-job ----------------------------------------------------------------
def complete_safetensors(store: Store, name: str) -> bool:
    """Whether an object holds a whole safetensors file (its header accounts for every byte)."""
    import struct

    size = store.info(name).size
    (length,) = struct.unpack("<Q", store.read_bytes(name, 0, 8))
    header = json.loads(store.read_bytes(name, 8, 8 + length))
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return 8 + length + end == size


@pytest.mark.slow
@pytest.mark.usefixtures("ray_instance")
def test_store_killed_mid_job_fails_cleanly_and_the_same_command_resumes(model_on_s3, s3_server, tmp_path):
    case, bucket = model_on_s3, model_on_s3["bucket"]
    dest = f"s3://{bucket}/dst-killed"
    args = quantize_args(case["s3"], dest, case["s3_calibration"], "--checkpoint-minutes", "0")
    result = {}
    job = threading.Thread(target=lambda: result.update(run=run_cli(*args)))
    job.start()
    watcher = s3fs_client()
    # a unit counts as done once its completion record follows its file: wait for one
    while job.is_alive() and not any("/.nvfp4/units/" in path for path in watcher.find(f"{bucket}/dst-killed")):
        time.sleep(0.02)
    s3_server.stop()
    job.join()
    s3_server.start()

    code, stdout, stderr = result["run"]
    assert code == 3, (stderr, stdout[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("nvfp4-ray: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 3
    store = Store(dest)
    files = store.list_files("")
    assert not {"_SUCCESS", "config.json", "model.safetensors.index.json"} & set(files), files  # nothing looks finished
    units = [name for name in files if name.endswith(".safetensors")]
    assert units and all(complete_safetensors(store, name) for name in units)  # no half-written object

    code, stdout, stderr = rerun = run_cli(*args)
    assert code == 0, (stderr, stdout[-3000:])
    reused = [json.loads(line) for line in stdout.splitlines() if "reusing" in line]
    assert reused and reused[0]["reused"] >= 1
    assert pending_uploads(bucket, "dst-killed/") == []
    manifest = json.loads(store.read_text("manifest.json"))
    uninterrupted = f"s3://{bucket}/dst-uninterrupted"
    assert run_cli(*quantize_args(case["s3"], uninterrupted, case["s3_calibration"]))[0] == 0
    assert manifest["files"] == json.loads(Store(uninterrupted).read_text("manifest.json"))["files"]
    assert checkpoint_tensors(dest) == checkpoint_tensors(uninterrupted)
    texts = [result["run"][1], result["run"][2], rerun[1], rerun[2], all_files_text(dest), ray_logs_text()]
    assert [secrets_in(text) for text in texts if secrets_in(text)] == []


@pytest.mark.usefixtures("ray_instance")
def test_a_source_deleted_mid_job_fails_the_job_instead_of_hanging(model_on_s3, tmp_path):
    """The layers still to read are gone: their reads fail (after their retries), so the
    loads waiting for them never run. The job fails with exit 3 naming the failure; a
    worker would otherwise wait for those layers for ever."""
    import s3fs

    case = model_on_s3
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    source = f"{case['bucket']}/deleted-src"
    fs.put(case["local"] + "/", source + "/", recursive=True)
    dest = str(tmp_path / "dest")
    args = quantize_args(f"s3://{source}", dest, case["local_calibration"], "--prefetch-gib", "1e-9")
    result = {}
    job = threading.Thread(target=lambda: result.update(run=run_cli(*args)))
    job.start()
    units = os.path.join(dest, ".nvfp4", "units")
    while job.is_alive() and not (os.path.isdir(units) and os.listdir(units)):
        time.sleep(0.02)
    fs.rm([path for path in fs.find(source) if path.endswith(".safetensors")])
    job.join(timeout=300)
    assert not job.is_alive(), "the job hung"
    code, stdout, stderr = result["run"]
    assert code == 3, (stderr, stdout[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("nvfp4-ray: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert not os.path.exists(os.path.join(dest, "_SUCCESS"))
