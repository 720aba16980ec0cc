"""``nvfp4-ray evaluate`` and ``quantize --evaluate``: the report is deterministic, is the
same for nvfp4-ray's and llm-compressor's SmolLM2 checkpoints, measures the weights that
transformers serves, and lands in the manifest before the checkpoint is committed."""

from __future__ import annotations

import io
import json
import math
import os
from importlib import resources

import pytest
import torch
from conftest import run_cli
from models import random_rows, save_model, write_rows

from nvfp4_ray.quality.evaluate import EvaluateOptions, evaluate

pytestmark = pytest.mark.usefixtures("ray_instance")


def tiny_llama(path: str, tokenizer_dir: str, hidden: int) -> str:
    """A small random Llama with SmolLM2's tokenizer and vocabulary, so the held-out text fits."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(hidden)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=1024)  # fmt: skip
    return save_model(AutoModelForCausalLM.from_config(config).to(torch.bfloat16), path, tokenizer_dir)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, smollm2):
    """A tiny model quantized with --evaluate: (source, dest, summary, json events)."""
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize

    folder = tmp_path_factory.mktemp("evaluated")
    source = tiny_llama(str(folder / "source"), smollm2, hidden=128)
    calibration = write_rows(random_rows(4, 49152, seed=3), str(folder / "calibration.parquet"))
    dest, stream = str(folder / "dest"), io.StringIO()
    config = QuantizeConfig(source=source, dest=dest, calibration=calibration, num_samples=4, max_seq_len=64, evaluate=True)
    summary = run_quantize(config, Events("json", stream=stream))
    return source, dest, summary, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_quantize_evaluate_stores_the_report_before_committing(evaluated):
    source, dest, summary, events = evaluated
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    assert manifest["quality"] == summary["quality"]
    assert manifest["quality"]["weight_sqnr_db"]["linears"] == 14
    # the checkpoint was complete when evaluated, and committed (manifest, _SUCCESS) only after
    stages = [event["stage"] for event in events if event["event"] == "stage_end"]
    assert stages[-3:] == ["commit", "evaluate", "commit"]
    # `nvfp4-ray evaluate` of the finished checkpoint gives the same report
    code, stdout, stderr = run_cli("evaluate", source, dest)
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["status"] == "succeeded" and {key: report[key] for key in manifest["quality"]} == manifest["quality"]
    assert "Quality of QUANT against BASE" in stderr and "worst Linears" in stderr


def test_the_summary_line_of_quantize_evaluate_is_short_and_the_manifest_keeps_every_linear(evaluated, tmp_path):
    from nvfp4_ray.quality.evaluate import headline

    source = evaluated[0]
    calibration = os.path.join(os.path.dirname(source), "calibration.parquet")
    dest = str(tmp_path / "dest")
    code, stdout, stderr = run_cli("quantize", source, dest, "--calibration", calibration, "--num-samples", "4",
                                   "--max-seq-len", "64", "--evaluate")  # fmt: skip
    assert code == 0, stderr
    line = stdout.strip().splitlines()[-1]
    summary, quality = json.loads(line), json.load(open(os.path.join(dest, "manifest.json")))["quality"]
    assert len(quality["weight_sqnr_db"]["per_linear"]) == 14  # every Linear, in the manifest
    assert summary["quality"] == headline(quality) and "per_linear" not in summary["quality"]["weight_sqnr_db"]
    assert [w["name"] for w in summary["quality"]["weight_sqnr_db"]["worst"]] == [
        name for name, _ in sorted(quality["weight_sqnr_db"]["per_linear"].items(), key=lambda item: (item[1], item[0]))
    ][:5]
    assert len(line) < 2500  # the same for 14 Linears or 210: per_linear added ~100 bytes for each


def test_a_replace_keeps_the_old_checkpoint_in_place_while_it_is_evaluated(evaluated, tmp_path, monkeypatch):
    """--evaluate runs on the new small files beside DEST's unit files, before the old
    checkpoint is withdrawn: consumers of DEST see it until the commit's few writes."""
    from conftest import quantize

    from nvfp4_ray.quality import evaluate as evaluate_module

    import shutil

    source, evaluated_dest, first, _ = evaluated
    dest = str(tmp_path / "dest")  # a copy: the fixture's checkpoint serves the other tests
    shutil.copytree(evaluated_dest, dest)
    calibration = os.path.join(os.path.dirname(source), "calibration.parquet")
    seen = {}
    original = evaluate_module.evaluate

    def watching(options, events=None):
        seen["version"] = json.load(open(os.path.join(dest, "_SUCCESS")))["version"]
        seen["config"] = open(os.path.join(dest, "config.json")).read()
        return original(options, events)

    old_config = open(os.path.join(dest, "config.json")).read()
    monkeypatch.setattr(evaluate_module, "evaluate", watching)
    second = quantize(source, dest, calibration, num_samples=4, max_seq_len=64, evaluate=True, overwrite=True,
                      ignore=["lm_head", "model.layers.1.mlp.down_proj"])  # fmt: skip
    assert seen == {"version": first["version"], "config": old_config}  # the old checkpoint throughout
    assert json.load(open(os.path.join(dest, "_SUCCESS")))["version"] == second["version"] != first["version"]
    assert json.load(open(os.path.join(dest, "manifest.json")))["quality"] == second["quality"]
    assert second["quality"]["weight_sqnr_db"]["linears"] == 13  # the report is the new checkpoint's


def test_weight_sqnr_measures_the_weights_transformers_serves(evaluated):
    from safetensors import safe_open

    from nvfp4_ray.formats.nvfp4 import PackedWeight, dequantize_weight
    from nvfp4_ray.quality.logits import load_model
    from nvfp4_ray.quality.weights import tensor_files, weight_sqnr

    source, dest, summary, _ = evaluated
    served = load_model(dest, torch.bfloat16, "cpu")
    files = tensor_files(dest)
    base = load_model(source, torch.bfloat16, "cpu")
    per_linear = weight_sqnr(source, dest)
    assert per_linear == summary["quality"]["weight_sqnr_db"]["per_linear"]
    for name, sqnr in per_linear.items():
        parts = []
        for suffix in (".weight_packed", ".weight_scale", ".weight_global_scale"):
            with safe_open(files[name + suffix], "pt") as handle:
                parts.append(handle.get_tensor(name + suffix))
        weight = served.get_submodule(name).weight.detach()
        assert torch.equal(dequantize_weight(PackedWeight(*parts)), weight)
        signal = base.get_submodule(name).weight.detach().double()
        served_sqnr = 10 * math.log10(float(signal.square().sum()) / float((signal - weight.double()).square().sum()))
        assert abs(served_sqnr - sqnr) < 0.1  # the bf16 rounding of the served weight moves it a little
    worst = summary["quality"]["weight_sqnr_db"]["worst"]
    assert [w["sqnr_db"] for w in worst] == sorted(per_linear.values())[: len(worst)]


def test_quantize_evaluate_checks_its_input_before_any_work(tmp_path, family_case):
    case = family_case("llama")  # SmolLM2's tokenizer on a 2048-token vocabulary
    dest = str(tmp_path / "dest")
    code, stdout, stderr = run_cli("quantize", case.source, dest, "--calibration", case.calibration,
                                   "--num-samples", "6", "--max-seq-len", "64", "--evaluate")  # fmt: skip
    assert code == 2 and "beyond the model's vocab_size 2048" in json.loads(stdout.strip().splitlines()[-1])["error"]
    assert not os.path.exists(dest)
    code, stdout, stderr = run_cli("quantize", case.source, "s3://bucket/out", "--calibration", case.calibration,
                                   "--evaluate")  # fmt: skip
    assert code == 2 and "--evaluate loads SOURCE and DEST with transformers" in stderr


def test_evaluate_bad_input(tmp_path, smollm2, evaluated):
    source, dest, _, _ = evaluated
    other = tiny_llama(str(tmp_path / "other"), smollm2, hidden=64)
    for base, quant, fragment in [
        (source, source, "is not an NVFP4 checkpoint"),
        (dest, dest, "BASE " + dest + " is quantized"),
        (other, dest, "was QUANT made from BASE?"),
        (str(tmp_path / "missing"), dest, "does not exist"),
    ]:
        code, stdout, stderr = run_cli("evaluate", base, quant)
        assert code == 2 and "Traceback" not in stderr, stderr
        assert fragment in json.loads(stdout.strip().splitlines()[-1])["error"]


def test_held_out_text_is_not_in_the_shipped_calibration_corpus():
    from nvfp4_ray.calibration.conversations import MULTILINGUAL, builtin_conversations, shipped

    def shingles(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        return {tuple(words[i : i + 8]) for i in range(len(words) - 7)}

    held_out = shingles(resources.files("nvfp4_ray").joinpath("data", "heldout.txt").read_text("utf-8"))
    corpus = set()
    for conversation in builtin_conversations() + shipped(MULTILINGUAL):
        corpus |= shingles(json.dumps(conversation.messages, ensure_ascii=False).replace("\\n", " "))
    assert len(held_out) > 900 and not held_out & corpus


@pytest.mark.slow
def test_reports_for_nvfp4_ray_and_llmcompressor_checkpoints_are_identical(smollm2, smollm2_quantized):
    ours, reference, _ = smollm2_quantized
    first, again, theirs = (
        evaluate(EvaluateOptions(base=smollm2, quant=quant, max_tokens=512)) for quant in (ours, ours, reference)
    )
    assert first == again  # deterministic
    assert first == theirs  # same bytes, same report
    sqnr = first["weight_sqnr_db"]
    assert sqnr["linears"] == 210 and 18 < sqnr["min"] <= sqnr["mean"] < 23  # ~6 dB per bit: 4-bit weights
    assert 0.4 < first["top1_agreement"] < 1 and 0 < first["mean_kl"] < 2
    assert first["perplexity"]["base"] < first["perplexity"]["quant"] < 3 * first["perplexity"]["base"]
