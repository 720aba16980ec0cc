"""GPTQ input that nvfp4-ray refuses: exit code 2, one line naming the problem, before
any work at DEST (the style of test_bad_input.py)."""

from __future__ import annotations

import pytest
from conftest import run_cli
from test_bad_input import assert_input_error, checkpoint, quantize_args  # noqa: F401  (checkpoint: a fixture)

pytestmark = pytest.mark.usefixtures("ray_instance")

GPTQ = "GPTQModifier: {targets: [Linear], scheme: NVFP4, ignore: [lm_head]%s}"


def write_recipe(tmp_path, modifiers: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("quant_stage:\n  quant_modifiers:\n" + "".join(f"    {line}\n" for line in modifiers.splitlines()))
    return str(path)


@pytest.mark.parametrize(
    "modifiers, fragment",
    [
        ("SmoothQuantModifier: {smoothing_strength: 0.8}\n" + GPTQ % "", "only a single QuantizationModifier or GPTQModifier"),
        (GPTQ % ", actorder: group", "GPTQ actorder group is not implemented"),
        (GPTQ % ", batched_quantization: 4", "GPTQ batched_quantization 4 is not implemented"),
        (GPTQ.replace("NVFP4", "FP8") % "", "GPTQ is implemented for NVFP4, NVFP4A16 only"),
        (GPTQ % ", dampening_frac: -0.5", "GPTQ dampening_frac must be a number in [0, 1)"),
    ],
)
def test_gptq_recipe_refused(modifiers, fragment, tmp_path, checkpoint):  # noqa: F811
    source, calibration = checkpoint
    dest = str(tmp_path / "dest")
    recipe = write_recipe(tmp_path, modifiers)
    assert_input_error(run_cli(*quantize_args(source, dest, calibration, "--recipe", recipe)), fragment, dest)


def test_gptq_options_that_conflict(tmp_path, checkpoint):  # noqa: F811
    source, calibration = checkpoint
    dest = str(tmp_path / "dest")
    recipe = write_recipe(tmp_path, GPTQ % "")
    result = run_cli(*quantize_args(source, dest, calibration, "--recipe", recipe, "--algorithm", "gptq"))
    assert_input_error(result, "give either --recipe or --algorithm", dest)
    result = run_cli(*quantize_args(source, dest, calibration, "--algorithm", "gptq", "--batch-tokens", "256"))
    assert_input_error(result, "GPTQ computes one sample per forward", dest)
