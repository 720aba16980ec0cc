"""The benchmark harness end to end on the CPU, as a user runs it (python bench/run.py):
a 2-layer tiny model, a few calibration rows, llm-compressor and nvfp4-ray, the comparison
and the JSON record."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every record must have these (issue 5, "The benchmark").
REQUIRED_FIELDS = (
    "device", "date", "gpus", "model", "params", "samples", "seq_len", "llmcompressor_s", "nvfp4_ray_s",
    "speedup_vs_llmcompressor", "outputs_equal", "stages_s", "calibration_tokens_per_s", "weight_gb_per_s",
    "peak_rss_gib", "peak_gpu_gib", "source_read_s", "calibration_speedup_vs_1gpu",
)  # fmt: skip


@pytest.mark.slow
def test_tiny_benchmark_writes_a_complete_record(tmp_path):
    results = tmp_path / "results"
    command = [
        sys.executable, os.path.join(REPO, "bench", "run.py"), "--preset", "tiny", "--layers", "2",
        "--samples", "4", "--seq-len", "32", "--work", str(tmp_path / "work"), "--out", str(results),
        # evict the model's pages only: a whole-cache drop (the default where root may) makes the
        # machine read every package back, three times, which takes most of a minute on CI
        "--page-cache", "fadvise",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    (path,) = glob.glob(str(results / "*-tiny-2L-0gpu.json"))
    with open(path) as handle:
        record = json.load(handle)
    assert [field for field in REQUIRED_FIELDS if field not in record] == []
    assert record["outputs_equal"] is True
    assert record["max_input_scale_diff_bf16_steps"] == 0
    assert (record["gpus"], record["samples"], record["seq_len"]) == (0, 4, 32)
    assert record["model"] == "random-llama-tiny-2L"
    assert record["llmcompressor_s"] > 0 and record["nvfp4_ray_s"] > 0 and record["source_read_s"] > 0
    assert record["peak_rss_gib"] > 0 and record["peak_gpu_gib"] is None
    assert {"plan", "layers", "commit"} <= set(record["stages_s"])
    assert record["calibration_speedup_vs_1gpu"] is None  # one run, on the CPU
    assert set(record["page_cache_drop"].values()) == {"fadvise"}
    assert "speedup_vs_llmcompressor" in done.stdout  # the table


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_bench_checkpoint_is_what_transformers_saves(tmp_path, family):
    """bench/model.py's checkpoint (the presets' layouts at a small size): the tensors and
    shapes transformers' save_pretrained writes for the same config.json, loaded with none
    missing or unexpected."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if REPO not in sys.path:  # bench/ is imported from the checkout
        sys.path.insert(0, REPO)
    from bench.compare import checkpoint_tensors
    from bench.model import tensor_shapes, write_model

    shape = dict(hidden=64, layers=2, intermediate=96, heads=4, kv_heads=2, vocab=256)
    if family == "qwen3_moe":
        shape = dict(arch="qwen3_moe", **shape, moe_intermediate=32, experts=8, experts_per_tok=2, head_dim=32)
    ours = str(tmp_path / "ours")
    write_model({"shape": shape, "seed": 0, "shard_bytes": 10**5}, ours)
    config = AutoConfig.from_pretrained(ours)
    assert config.model_type == family
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    names = lambda folder: {n: tuple(e[2]) for n, e in checkpoint_tensors(folder).items()}  # noqa: E731
    assert names(ours) == names(str(tmp_path / "hf")) == dict(tensor_shapes(shape))
    _, info = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_gptq_timeline_splits_one_workers_calls_by_layer(tmp_path):
    """bench/run.py's summary of Ray's timeline for a 1-GPU GPTQ run: per layer a Hessian
    pass, a solve per fused group (two here), a propagation pass."""
    sys.path.insert(0, REPO)
    from bench.run import gptq_layer_timeline

    events, clock = [], 0.0
    for durations in [(3.0, 1.0, 0.5, 0.25), (1.0, 0.25, 0.25, 0.25), (2.0, 0.5, 0.25, 0.5)]:
        for seconds in durations:
            events.append({"cat": "task::LayerWorker.gptq", "ph": "X", "tid": 7, "ts": clock * 1e6, "dur": seconds * 1e6})
            clock += seconds + 0.125
        events.append({"cat": "task::LayerWorker.gptq_write", "ph": "X", "tid": 8, "ts": clock * 1e6, "dur": 1e6})
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(events))
    summary = gptq_layer_timeline(str(path), 3)
    assert summary["first_layer"] == {"calibration_pass_s": 3.0, "solves_s": 1.5, "propagation_s": 0.25, "to_next_layer_s": 5.25}
    assert summary["later_layers_median"] == {"calibration_pass_s": 1.0, "solves_s": 0.5, "propagation_s": 0.25,
                                              "to_next_layer_s": 2.25}  # fmt: skip
    assert gptq_layer_timeline(str(path), 5) is None  # 12 calls are no whole number of layers
