"""nvfp4-ray's checkpoint against llm-compressor's, tensor by tensor, for every family.

* Llama, Qwen2, Qwen3: the default mode is byte-identical to llm-compressor.
* Mistral, Mistral3 (Ministral3 text): llm-compressor 0.14 calibrates them without a
  causal mask. ``--exact`` reproduces that byte for byte; the default mode is checked
  against a plain transformers forward of the whole model instead (the truth).
* ``--batch-tokens`` (padded SDPA batches): weights byte-identical, input scales close,
  and padded positions never enter an amax.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import quantize
from models import DENSE_FAMILIES
from reference import bf16_steps, full_forward_input_scales, load_tensors

pytestmark = pytest.mark.usefixtures("ray_instance")
MASKLESS_IN_REFERENCE = ("mistral", "mistral3")


def scale_of(raw: bytes) -> float:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).item()


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_checkpoint_is_byte_identical_to_llmcompressor(family, family_case, reference, tmp_path):
    case = family_case(family)
    ref = reference(family)
    out = str(tmp_path / "out")
    # --exact only changes anything for the families whose reference drops the causal mask
    quantize(case.source, out, case.calibration, ignore=case.ignore, exact=family in MASKLESS_IN_REFERENCE)

    ours, theirs = load_tensors(out), load_tensors(ref)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert sum(name.endswith(".input_global_scale") for name in ours) > 0
    for name in ("config.json", "recipe.yaml"):
        with open(os.path.join(out, name)) as mine, open(os.path.join(ref, name)) as expected:
            assert mine.read() == expected.read(), name


@pytest.mark.parametrize("family", MASKLESS_IN_REFERENCE)
def test_default_mode_calibrates_mistral_family_with_the_causal_mask(family, family_case, reference, tmp_path):
    case = family_case(family)
    out = str(tmp_path / "out")
    quantize(case.source, out, case.calibration, ignore=case.ignore)

    ours, theirs = load_tensors(out), load_tensors(reference(family))
    truth = full_forward_input_scales(case.source, case.rows)
    scales = {n.removesuffix(".input_global_scale"): scale_of(v[2]) for n, v in ours.items() if n.endswith("input_global_scale")}
    assert scales == truth
    # and the reference's (maskless) scales really are different: the mode matters
    assert any(scale_of(theirs[f"{n}.input_global_scale"][2]) != s for n, s in scales.items())
    assert all(ours[n] == theirs[n] for n in theirs if not n.endswith(".input_global_scale"))


def test_batched_mode_keeps_weights_and_masks_padding(family_case, reference, tmp_path):
    """Padded batches: weights identical; a huge embedding for the pad token (id 0) would
    dominate every layer-0 amax if padded positions leaked into it."""
    from models import build_model, save_model, write_rows

    case = family_case("llama")
    model = build_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 1000.0
    source = save_model(model, str(tmp_path / "source"), case.source)
    rows = [[t if t != 0 else 1 for t in row] for row in case.rows]  # id 0 only ever as padding
    calibration = write_rows(rows, str(tmp_path / "calibration.parquet"))
    out = str(tmp_path / "out")
    quantize(source, out, calibration, batch_tokens=256)

    ours = load_tensors(out)
    truth = full_forward_input_scales(source, rows)
    reference_weights = load_tensors(reference("llama"))
    for name, value in reference_weights.items():
        if ".weight_" in name:
            assert ours[name] == value, name
    for name, expected in truth.items():
        mine = scale_of(ours[f"{name}.input_global_scale"][2])
        assert bf16_steps(mine, expected) <= 4, (name, mine, expected)


def test_quantization_config_expands_ignore_to_checkpoint_names(family_case, tmp_path):
    case = family_case("mistral3")
    out = str(tmp_path / "out")
    quantize(case.source, out, case.calibration, ignore=case.ignore)
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    assert "lm_head" in config["ignore"]
    assert sum(name.startswith("vision_tower.") for name in config["ignore"]) == 14
    assert sum(name.startswith("multi_modal_projector.") for name in config["ignore"]) == 3
    assert not any(".layers." in name and "language_model" in name for name in config["ignore"])
