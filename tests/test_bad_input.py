"""Bad input: exit code 2, one clear line naming the problem, no traceback, no _SUCCESS,
and, where the problem can be found from headers, nothing written at DEST at all."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from types import SimpleNamespace

import pytest
from conftest import NUM_ROWS, run_cli, session_processes
from models import build_model, save_model, write_rows

pytestmark = pytest.mark.usefixtures("ray_instance")


@pytest.fixture
def checkpoint(family_case, tmp_path):
    """A writable copy of the small Llama checkpoint and its calibration file."""
    case = family_case("llama")
    source = str(tmp_path / "source")
    shutil.copytree(case.source, source)
    return source, case.calibration


def quantize_args(source, dest, calibration, *extra):
    return ["quantize", source, dest, "--calibration", calibration, "--num-samples", str(NUM_ROWS),
            "--max-seq-len", "64", *extra]  # fmt: skip


def assert_input_error(result, fragment: str, dest: str | None = None, untouched: bool = True):
    code, stdout, stderr = result
    assert code == 2, (code, stderr)
    error_lines = [line for line in stderr.splitlines() if line.startswith("nvfp4-ray: error:")]
    assert len(error_lines) == 1 and fragment in error_lines[0], stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "failed" and summary["exit_code"] == 2 and fragment in summary["error"]
    if dest is not None:
        assert not os.path.exists(os.path.join(dest, "_SUCCESS"))
        if untouched:
            assert not os.path.exists(dest), "work started before the input was checked"


def shard_of(source: str, tensor_suffix: str) -> str:
    index = json.load(open(os.path.join(source, "model.safetensors.index.json")))
    name = next(n for n in index["weight_map"] if n.endswith(tensor_suffix))
    return os.path.join(source, index["weight_map"][name])


def test_missing_source(tmp_path, checkpoint):
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(str(tmp_path / "nope"), dest, checkpoint[1]))
    assert_input_error(result, "does not exist", dest)


def test_directory_without_config_is_not_a_checkpoint(tmp_path, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(str(empty), dest, checkpoint[1])), "has no config.json", dest)


def test_config_without_weights_is_not_a_checkpoint(tmp_path, checkpoint):
    source, calibration = checkpoint
    for name in os.listdir(source):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(source, name))
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(source, dest, calibration)), "no model.safetensors", dest)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("cut_header_length", "not a safetensors file"),
        ("cut_header", "truncated safetensors file"),
        ("cut_data", "truncated file"),
        ("garbage_header", "not valid JSON"),
    ],
)
def test_corrupt_or_truncated_shard(tmp_path, checkpoint, damage, fragment):
    source, calibration = checkpoint
    path = shard_of(source, "layers.1.mlp.up_proj.weight")
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    damaged = {
        "cut_header_length": data[:5],
        "cut_header": data[: 8 + length // 2],
        "cut_data": data[:-100],
        "garbage_header": data[:8] + b"{" * length + data[8 + length :],
    }[damage]
    open(path, "wb").write(damaged)
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(source, dest, calibration))
    assert_input_error(result, fragment, dest)
    assert os.path.basename(path) in result[2]  # the message names the file


def test_index_naming_a_missing_shard(tmp_path, checkpoint):
    source, calibration = checkpoint
    os.remove(shard_of(source, "layers.0.self_attn.k_proj.weight"))
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(source, dest, calibration)), "which is missing from SOURCE", dest)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_in_a_weight_names_the_tensor(tmp_path, family_case, value):
    import torch

    case = family_case("llama")
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] = float(value)
    source = save_model(model, str(tmp_path / "source"), case.source)
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(source, dest, case.calibration))
    assert_input_error(result, "model.layers.1.mlp.up_proj.weight", dest, untouched=False)
    assert "NaN or Inf" in result[2]


def test_nan_in_a_copied_tensor_names_it_and_leaves_no_copy_at_dest(tmp_path, family_case):
    """Tensors outside the layers are checked chunk by chunk as they are copied."""
    import torch

    case = family_case("llama")
    model = build_model("llama")
    with torch.no_grad():
        model.model.norm.weight[5] = float("nan")
    source = save_model(model, str(tmp_path / "source"), case.source)
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(source, dest, case.calibration))
    assert_input_error(result, "tensor 'model.norm.weight' contains NaN or Inf", dest, untouched=False)
    assert [name for name in os.listdir(dest) if name.startswith("model-other-")] == []


def test_in_features_not_divisible_by_16(tmp_path, family_case):
    import transformers

    case = family_case("llama")
    config = transformers.LlamaConfig(hidden_size=200, intermediate_size=400, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch_bf16())
    source = save_model(model, str(tmp_path / "source"), case.source)
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(source, dest, case.calibration))
    assert_input_error(result, "in_features 200 is not divisible by the group size 16", dest)


def test_model_type_without_runnable_decoder_layers(tmp_path, family_case):
    import transformers

    case = family_case("llama")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=2048))
    source = save_model(model.to(torch_bf16()), str(tmp_path / "source"), case.source)
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(source, dest, case.calibration))
    assert_input_error(result, "model type 'gpt2' is not supported", dest)
    assert "llama" in result[2] and "deepseek_v3" in result[2]  # the valid choices are listed


def test_ignore_pattern_splitting_a_fused_group(tmp_path, checkpoint):
    source, calibration = checkpoint
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(source, dest, calibration, "--ignore", "lm_head", "re:.*layers\\.1\\.self_attn\\.k_proj"))
    assert_input_error(result, "splits the fused group", dest)
    assert "model.layers.1.self_attn.k_proj" in result[2]


def test_calibration_file_missing(tmp_path, checkpoint):
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(checkpoint[0], dest, str(tmp_path / "none.parquet")))
    assert_input_error(result, "does not exist", dest)


def test_workers_started_before_a_bad_input_was_found_are_stopped(tmp_path, checkpoint):
    """On a running Ray instance the workers are asked for while the inputs are read: a bad
    input removes their placement group, and no worker process outlives the job."""
    from ray.util import placement_group_table

    groups_before = set(placement_group_table())
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(checkpoint[0], dest, str(tmp_path / "none.parquet")))
    assert_input_error(result, "does not exist", dest)
    groups = {key: value["state"] for key, value in placement_group_table().items() if key not in groups_before}
    assert list(groups.values()) == ["REMOVED"], "one placement group was asked for before the check, then removed"
    deadline = time.monotonic() + 30
    while session_processes("ray::LayerWorker") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes("ray::LayerWorker") == []


def test_workers_stopped_right_after_they_were_asked_for_give_back_every_cpu():
    """What a bad input found at once does, many times over: the placement group removed
    milliseconds after it was asked for. Ray 2.60 lost a group's CPUs for good about once in
    35 such removals unless it was placed first (Placement.release); a lost CPU makes every
    later job on the instance wait out its placement timeout."""
    import ray

    from nvfp4_ray.pipeline.worker_start import start_workers
    from nvfp4_ray.pipeline.placement import Placement

    total = ray.cluster_resources()["CPU"]
    for attempt in range(60):
        placement = Placement.request(None, "auto")
        start_workers(placement, SimpleNamespace(recipe=None, algorithm="rtn", exact=False))
        placement.release()
        deadline = time.monotonic() + 10
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ray.available_resources().get("CPU", 0) == total, f"CPUs lost after removal {attempt + 1}"


def test_calibration_file_empty(tmp_path, checkpoint):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"input_ids": pa.array([], type=pa.list_(pa.int64()))}), path)
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(checkpoint[0], dest, path)), "is empty", dest)


def test_calibration_file_without_the_column(tmp_path, checkpoint):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "wrong.parquet")
    pq.write_table(pa.table({"tokens": [[1, 2, 3]] * NUM_ROWS}), path)
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(checkpoint[0], dest, path))
    assert_input_error(result, "needs an 'input_ids' or 'text' column (it has: tokens)", dest)


def test_calibration_token_ids_outside_the_vocabulary(tmp_path, checkpoint):
    path = write_rows([[1, 2, 3]] * (NUM_ROWS - 1) + [[5, 2048, 7]], str(tmp_path / "oov.parquet"))
    dest = str(tmp_path / "dest")
    result = run_cli(*quantize_args(checkpoint[0], dest, path))
    assert_input_error(result, f"calibration row {NUM_ROWS - 1}: token id 2048 is outside the vocabulary", dest)


def test_too_few_calibration_rows(tmp_path, checkpoint):
    path = write_rows([[1, 2, 3]] * 2, str(tmp_path / "short.parquet"))
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(checkpoint[0], dest, path)), "has 2 rows but --num-samples asks for 6", dest)


def test_dest_holding_another_checkpoint(tmp_path, family_case):
    llama, qwen = family_case("llama"), family_case("qwen3")
    dest = str(tmp_path / "dest")
    assert run_cli(*quantize_args(llama.source, dest, llama.calibration))[0] == 0
    before = open(os.path.join(dest, "_SUCCESS")).read()
    result = run_cli(*quantize_args(qwen.source, dest, qwen.calibration))
    code, _, stderr = result
    assert code == 2 and "already holds a checkpoint made from other inputs; pass --overwrite" in stderr
    assert open(os.path.join(dest, "_SUCCESS")).read() == before  # nothing replaced


def test_dest_with_foreign_files(tmp_path, checkpoint):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    code, _, stderr = run_cli(*quantize_args(checkpoint[0], str(dest), checkpoint[1]))
    assert code == 2 and "is not empty and was not written by nvfp4-ray" in stderr
    assert sorted(os.listdir(dest)) == ["notes.txt"]


def test_unknown_option_in_config_file(tmp_path, checkpoint):
    config = tmp_path / "job.yaml"
    config.write_text("source: x\ndest: y\nnum_samplez: 3\n")
    code, stdout, stderr = run_cli("quantize", "--config", str(config))
    assert code == 2 and "num_samplez: unknown option (valid:" in stderr


def torch_bf16():
    import torch

    return torch.bfloat16


def test_calibrated_scheme_without_calibration_data(tmp_path, family_case):
    case = family_case("llama")
    dest = str(tmp_path / "dest")
    result = run_cli("quantize", case.source, dest, "--num-samples", str(NUM_ROWS))
    assert_input_error(result, "--calibration is required", dest)
