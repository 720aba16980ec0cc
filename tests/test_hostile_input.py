"""Hostile checkpoints, generated rather than hand-picked: every one gets a clear
InputError, never a crash, a hang, a huge allocation, or a read outside SOURCE."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.checkpoint import open_checkpoint
from nvfp4_ray.io.safetensors_format import DTYPE_SIZES, MAX_HEADER_BYTES, header_length, parse_header

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

integers = st.one_of(st.integers(-5, 70), st.integers(-(2**64), 2**64), st.sampled_from([0, 1, 2**31, 2**63 - 1]))
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.text(max_size=6), st.integers()),
        "shape": st.one_of(st.lists(integers, max_size=4), st.text(max_size=3), st.none()),
        "data_offsets": st.one_of(st.lists(integers, max_size=3), st.none(), st.text(max_size=3)),
    },
)
headers = st.dictionaries(st.text(max_size=8), st.one_of(entries, st.integers(), st.text(max_size=4)), max_size=6)


@FAST
@given(header=headers, data_size=st.integers(0, 4096), metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=2)))
def test_generated_headers_parse_or_fail_cleanly(header, data_size, metadata):
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    file_size = 8 + len(raw) + data_size
    try:
        parsed = parse_header(raw, file_size, "shard")
    except InputError as exc:
        assert str(exc).startswith("shard")  # every message names the file
        return
    spans = []
    for entry in parsed.entries.values():
        assert 8 + len(raw) <= entry.start <= entry.end <= file_size
        assert entry.end - entry.start == math.prod(entry.shape) * DTYPE_SIZES[entry.dtype]
        spans.append((entry.start, entry.end))
    spans = sorted(s for s in spans if s[0] != s[1])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlaps


@FAST
@given(blob=st.binary(max_size=64), file_size=st.integers(0, 1 << 40))
def test_arbitrary_bytes_never_crash(blob, file_size):
    try:
        length = header_length(blob, file_size, "shard")
        parse_header(blob[8 : 8 + length], max(file_size, 8 + length), "shard")
    except InputError:
        pass


@pytest.mark.parametrize("declared", [2**63, 2**40, MAX_HEADER_BYTES + 1])
def test_huge_header_lengths_are_refused_before_reading(declared):
    with pytest.raises(InputError, match="header length"):
        header_length(struct.pack("<Q", declared), 10**15, "shard")


def test_deeply_nested_json_header():
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InputError, match="not valid JSON"):
        parse_header(raw, 8 + len(raw), "shard")


@pytest.fixture(scope="module")
def small_checkpoint(family_case):
    return family_case("qwen2").source


def copy_of(source: str, folder: str) -> str:
    target = os.path.join(folder, "source")
    shutil.copytree(source, target)
    return target


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.one_of(
        st.sampled_from(["../outside.safetensors", "/etc/passwd", "s3://bucket/x.safetensors", "sub/x.safetensors",
                         "file:///etc/hosts", "..", "..safetensors", "C:\\x.safetensors", "%2e%2e/x.safetensors",
                         "~/x.safetensors", "x.safetensors\x00", ""]),  # fmt: skip
        st.text(max_size=24),
    )
)
def test_index_paths_never_leave_source(small_checkpoint, name):
    with tempfile.TemporaryDirectory() as folder:
        source = copy_of(small_checkpoint, folder)
        # a perfectly valid shard right outside SOURCE: it must never be opened
        shutil.copy(os.path.join(source, sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))[0]),
                    os.path.join(folder, "outside.safetensors"))  # fmt: skip
        index_path = os.path.join(source, "model.safetensors.index.json")
        index = json.load(open(index_path))
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = name
        json.dump(index, open(index_path, "w"))
        try:
            opened = open_checkpoint(source)
        except InputError as exc:
            assert "model.safetensors.index.json" in str(exc)
            return
        for file_name in opened.files:  # accepted: only plain names of files inside SOURCE
            assert "/" not in file_name and "\\" not in file_name and not file_name.startswith("..")
            assert os.path.exists(os.path.join(source, file_name))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=40), st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=8))))  # fmt: skip
def test_malformed_config_json(small_checkpoint, content):
    with tempfile.TemporaryDirectory() as folder:
        source = copy_of(small_checkpoint, folder)
        open(os.path.join(source, "config.json"), "wb").write(content)
        with pytest.raises(InputError, match="config.json"):
            open_checkpoint(source)


def test_shapes_that_disagree_with_config(family_case, tmp_path):
    from conftest import run_cli

    case = family_case("qwen2")
    source = copy_of(case.source, str(tmp_path))
    config = json.load(open(os.path.join(source, "config.json")))
    config["intermediate_size"] = 336
    json.dump(config, open(os.path.join(source, "config.json"), "w"))
    code, _, stderr = run_cli("quantize", source, str(tmp_path / "dest"), "--calibration", case.calibration)
    assert code == 2 and "has shape [320, 160] but config.json implies [336, 160]" in stderr


def test_no_pickle_and_no_remote_code_anywhere_in_the_package():
    for path in (REPO / "nvfp4_ray").rglob("*.py"):
        text = path.read_text()
        for forbidden in ("torch.load(", "pickle.load", "weights_only=False", "trust_remote_code=True"):
            assert forbidden not in text, f"{path}: {forbidden}"


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, family_case):
    import pickle

    from conftest import run_cli

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (source / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    code, _, stderr = run_cli("quantize", str(source), str(tmp_path / "dest"), "--calibration", family_case("llama").calibration)
    assert code == 2 and "only safetensors checkpoints are supported" in stderr
    assert not marker.exists()


def test_remote_code_in_source_never_runs(tmp_path, family_case):
    from conftest import run_cli

    marker = tmp_path / "pwned"
    case = family_case("llama")
    source = pathlib.Path(copy_of(case.source, str(tmp_path)))
    (source / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.load(open(source / "config.json"))
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.Evil"})  # fmt: skip
    json.dump(config, open(source / "config.json", "w"))
    code, _, stderr = run_cli("quantize", str(source), str(tmp_path / "dest"), "--calibration", case.calibration)
    assert code == 2 and "model type 'evil' is not supported" in stderr
    assert not marker.exists()


def test_text_calibration_with_a_remote_code_tokenizer_never_runs_it(tmp_path, family_case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import run_cli

    marker = tmp_path / "pwned"
    case = family_case("llama")
    source = pathlib.Path(copy_of(case.source, str(tmp_path)))
    (source / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    tokenizer_config = json.load(open(source / "tokenizer_config.json"))
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tokenizer_config.pop("tokenizer_class", None)
    json.dump(tokenizer_config, open(source / "tokenizer_config.json", "w"))
    calibration = str(tmp_path / "text.parquet")
    pq.write_table(pa.table({"text": ["hello world"] * 6}), calibration)
    code, _, stderr = run_cli("quantize", str(source), str(tmp_path / "dest"), "--calibration", calibration)
    assert not marker.exists()
    assert code in (0, 2), stderr  # refused, or loaded without running the repository's code


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_every_nan_and_inf_is_found_in_any_step_and_no_finite_value_is_flagged(dtype, monkeypatch):
    """finite() looks at a tensor's bytes a step at a time: a bad value in the first or
    last value of a step, or in the last step, is found; the extremes of the finite range
    are not flagged."""
    import numpy as np

    import nvfp4_ray.io.tensors as tensors

    monkeypatch.setattr(tensors, "_FINITE_STEP", 64)
    if dtype == "BF16":  # bit patterns: the largest finite values, then +-Inf and NaNs
        good, bad, kind = [0x7F7F, 0xFF7F, 0x0001, 0x8000], [0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x7F81], np.uint16
    else:
        kind = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
        top = np.finfo(kind).max
        good, bad = [top, -top, np.finfo(kind).tiny, -0.0], [np.inf, -np.inf, np.nan]
    values = np.resize(np.array(good, dtype=kind), 1000)
    per_step = 64 // values.itemsize
    assert tensors.finite(dtype, values.view(np.uint8))
    for where in (0, per_step - 1, per_step, 999):
        for value in bad:
            broken = values.copy()
            broken[where] = value
            assert not tensors.finite(dtype, broken.view(np.uint8)), (where, value)
