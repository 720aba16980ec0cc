"""Other schemes and mixed recipes, each byte-identical to llm-compressor with the same recipe."""

from __future__ import annotations

import json
import os

import pytest
import transformers
from conftest import quantize, run_cli
from models import save_model, write_rows, random_rows
from reference import load_tensors, run_llmcompressor

pytestmark = pytest.mark.usefixtures("ray_instance")

# FP8 attention + NVFP4 MLP, with presets as llm-compressor's `scheme` mapping allows
MIXED = r"""
default_stage:
  default_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      scheme:
        FP8: ['re:.*self_attn\.(q|k|v|o)_proj$']
        NVFP4: ['re:.*mlp\.(gate|up|down)_proj$']
"""
# NVIDIA's layout on an 8-layer model: attention and the MLPs of the first 4 and the last
# layer in FP8, the other MLPs in NVFP4, and an FP8 KV cache
NVIDIA = r"""
default_stage:
  default_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      scheme:
        FP8: ['re:.*self_attn\.(q|k|v|o)_proj$', 're:.*layers\.(0|1|2|3|7)\.mlp\.(gate|up|down)_proj$']
        NVFP4: ['re:.*layers\.(4|5|6)\.mlp\.(gate|up|down)_proj$']
      kv_cache_scheme: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true, observer: static_minmax}
"""


KV_RECIPE = """
default_stage:
  default_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      targets: [Linear]
      scheme: NVFP4
      kv_cache_scheme: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true%s}
"""


def test_a_kv_observer_other_than_static_minmax_runs_and_is_recorded_as_static_minmax(family_case, tmp_path):
    """The default KV observer (minmax: an average over shuffled samples) cannot be
    reproduced; the job warns, uses the running max, and DEST says so: the checkpoint is
    the one the static_minmax recipe gives, recipe.yaml and config.json included."""
    case = family_case("llama")
    outputs = {}
    for name, observer in (("default", ""), ("static", ", observer: static_minmax")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(KV_RECIPE % observer)
        outputs[name] = str(tmp_path / name)
        code, _, stderr = run_cli("quantize", case.source, outputs[name], "--calibration", case.calibration,
                                  "--recipe", str(recipe), "--num-samples", "6", "--max-seq-len", "64")  # fmt: skip
        assert code == 0, stderr[-2000:]
        assert ("kv_cache_scheme observer minmax (the default)" in stderr) == (name == "default")
    assert_identical(outputs["default"], outputs["static"])
    config = json.load(open(os.path.join(outputs["default"], "config.json")))["quantization_config"]
    assert config["kv_cache_scheme"]["observer"] == "static_minmax"


def assert_identical(out: str, ref: str) -> None:
    ours, theirs = load_tensors(out), load_tensors(ref)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    for name in ("config.json", "recipe.yaml"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(ref, name)).read(), name


@pytest.mark.parametrize("scheme", ["FP8", "FP8_DYNAMIC", "NVFP4A16"])
def test_preset_scheme_is_byte_identical(scheme, family_case, tmp_path):
    case = family_case("llama")
    calibrated = scheme == "FP8"
    rows = case.rows if calibrated else None
    reference = run_llmcompressor(case.source, rows, ["lm_head"], str(tmp_path / "reference"), scheme=scheme)
    out = str(tmp_path / "out")
    # weight-only and dynamic schemes need no calibration data at all
    summary = quantize(case.source, out, case.calibration if calibrated else None, scheme=scheme)
    assert (summary["calibration_tokens"] > 0) == calibrated
    assert_identical(out, reference)


def test_mixed_fp8_attention_nvfp4_mlp_recipe(family_case, tmp_path):
    case = family_case("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MIXED)
    reference = run_llmcompressor(case.source, case.rows, [], str(tmp_path / "reference"), recipe=MIXED)
    out = str(tmp_path / "out")
    quantize(case.source, out, case.calibration, recipe=str(recipe))
    assert_identical(out, reference)
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == ["float-quantized", "nvfp4-pack-quantized"]


@pytest.mark.slow
def test_nvidia_layout_with_fp8_kv_cache(family_case, tmp_path):
    base = family_case("llama")
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=2048)  # fmt: skip
    import torch

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    source = save_model(model, str(tmp_path / "source"), base.source)
    rows = random_rows(6, 2048, seed=11)
    calibration = write_rows(rows, str(tmp_path / "calibration.parquet"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(NVIDIA)
    reference = run_llmcompressor(source, rows, [], str(tmp_path / "reference"), recipe=NVIDIA)
    out = str(tmp_path / "out")
    quantize(source, out, calibration, recipe=str(recipe))
    assert_identical(out, reference)
    tensors = load_tensors(out)
    assert "model.layers.3.self_attn.k_scale" in tensors and "model.layers.3.self_attn.v_scale" in tensors
    assert "model.layers.5.mlp.up_proj.weight_packed" in tensors and "model.layers.7.mlp.up_proj.input_scale" in tensors


def test_fused_siblings_with_different_schemes_are_refused(family_case, tmp_path):
    case = family_case("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MIXED.replace(r"(q|k|v|o)_proj$", r"(q|o)_proj$").replace(
        r"re:.*mlp\.(gate|up|down)_proj$", r"re:.*(mlp\.(gate|up|down)|self_attn\.(k|v))_proj$"))  # fmt: skip
    code, _, stderr = run_cli("quantize", case.source, str(tmp_path / "out"), "--calibration", case.calibration,
                              "--recipe", str(recipe), "--num-samples", "6")  # fmt: skip
    assert code == 2 and "mixes quantization schemes" in stderr and "self_attn.q_proj" in stderr
    assert not os.path.exists(tmp_path / "out")


def test_unsupported_preset_lists_the_valid_ones(family_case, tmp_path):
    case = family_case("llama")
    code, _, stderr = run_cli("quantize", case.source, str(tmp_path / "out"), "--scheme", "W4A16")
    assert code == 2 and "scheme 'W4A16' is not supported (valid: NVFP4, NVFP4A16, FP8, FP8_DYNAMIC)" in stderr


def test_config_override_is_applied_and_recorded(family_case, tmp_path):
    case = family_case("llama")
    out = str(tmp_path / "out")
    summary = quantize(case.source, out, case.calibration, config_override=["rope_parameters.rope_theta=20000.0"])
    assert summary["status"] == "succeeded"
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["rope_parameters"]["rope_theta"] == 20000.0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["fingerprint"]["config_overrides"] == ["rope_parameters.rope_theta=20000.0"]
    # the override reaches the calibration forward: scales differ from the unmodified run
    plain = str(tmp_path / "plain")
    quantize(case.source, plain, case.calibration)
    ours, unmodified = load_tensors(out), load_tensors(plain)
    assert any(ours[n] != unmodified[n] for n in ours if n.endswith("input_global_scale"))
    assert all(ours[n] == unmodified[n] for n in ours if not n.endswith("input_global_scale"))


def test_config_override_with_a_missing_parent_is_refused(family_case, tmp_path):
    case = family_case("llama")
    code, _, stderr = run_cli("quantize", case.source, str(tmp_path / "out"), "--calibration", case.calibration,
                              "--config-override", "text_config.rope_theta=1")  # fmt: skip
    assert code == 2 and "config.json has no object at text_config" in stderr


def test_config_override_of_a_key_config_json_lacks_is_named_in_a_warning(family_case, tmp_path):
    case = family_case("llama")
    code, _, stderr = run_cli("quantize", case.source, str(tmp_path / "out"), "--calibration", case.calibration,
                              "--num-samples", "6", "--max-seq-len", "64",
                              "--config-override", "rope_parameters.rope_thetta=20000.0")  # fmt: skip
    assert code == 0, stderr
    assert "adds 'rope_parameters.rope_thetta', which config.json does not have" in stderr
    assert "(did you mean 'rope_parameters.rope_theta'?)" in stderr


def test_preprocessor_config_written_from_processor_config(family_case, tmp_path):
    import shutil

    case = family_case("mistral3")
    source = str(tmp_path / "source")
    shutil.copytree(case.source, source)
    block = {"image_processor_type": "PixtralImageProcessorFast", "patch_size": 16, "size": {"longest_edge": 64}}
    json.dump({"image_processor": block, "processor_class": "PixtralProcessor"}, open(os.path.join(source, "processor_config.json"), "w"))
    out = str(tmp_path / "out")
    quantize(source, out, case.calibration, ignore=case.ignore, write_preprocessor_config=True)
    assert json.load(open(os.path.join(out, "preprocessor_config.json"))) == block
    assert "preprocessor_config.json" in json.load(open(os.path.join(out, "manifest.json")))["files"]
    plain = str(tmp_path / "plain")
    quantize(source, plain, case.calibration, ignore=case.ignore)
    assert not os.path.exists(os.path.join(plain, "preprocessor_config.json"))


def test_preprocessor_option_without_processor_config_is_refused(family_case, tmp_path):
    case = family_case("mistral3")
    code, _, stderr = run_cli("quantize", case.source, str(tmp_path / "out"), "--calibration", case.calibration,
                              "--write-preprocessor-config")  # fmt: skip
    assert code == 2 and "needs a processor_config.json in SOURCE" in stderr
