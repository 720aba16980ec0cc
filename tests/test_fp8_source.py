"""FP8 SOURCE checkpoints with 128 x 128 block scales, as DeepSeek-V3 and Kimi-K2 are
published: dequantized to bf16 on the fly, then quantized as any bf16 checkpoint.

The reference: llm-compressor 0.14's oneshot refuses a checkpoint whose config.json says
``quant_method: fp8``, even loaded through transformers with
``FineGrainedFP8Config(dequantize=True)``; it has its users dequantize it first with
compressed-tensors' ``FP8BlockDequantizer`` (``convert_checkpoint``), and runs on that bf16
checkpoint. The random deepseek_v3 model (tests/models.py) has Linear dimensions that are not
multiples of 128 (hidden 160, MLP 288), so partial edge blocks are everywhere; there
convert_checkpoint fails to save the weights it dequantized (non-contiguous slices) and
transformers 5.17 computes wrong weights (it splits a dimension into as many equal blocks as
the scale grid has) or raises, so the test writes the FP8BlockDequantizer's weights itself.
Our dequantization is checked bit for bit against both functions where each is right.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import quantize, run_cli
from reference import load_tensors, run_llmcompressor
from safetensors.torch import load_file, save_file
from test_bad_input import assert_input_error, quantize_args

from nvfp4_ray.formats import fp8_block

pytestmark = pytest.mark.usefixtures("ray_instance")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
IGNORE = ["lm_head", "re:.*kv_b_proj$"]  # an FP8 Linear left unquantized: written in bf16


def to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in DeepSeek's FP8 format: e4m3 values and one F32 scale (amax / 448) per
    128 x 128 block, the last blocks partial."""
    rows, cols = weight.shape
    grid = fp8_block.scale_shape(weight.shape)
    padded = torch.zeros(grid[0] * 128, grid[1] * 128)
    padded[:rows, :cols] = weight.float()
    blocks = padded.reshape(grid[0], 128, grid[1], 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    fp8 = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(padded.shape)
    return fp8[:rows, :cols].contiguous(), scale


def is_deepseek_fp8(name: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek publishes in FP8: the decoder layers' Linear weights (not the router's)."""
    return ".layers." in name and name.endswith(".weight") and tensor.ndim == 2 and not name.endswith("mlp.gate.weight")


def rewrite(source: str, out: str, convert, quantization: dict | None) -> str:
    """``source`` copied to ``out``, each shard's tensors (a dict) changed in place by
    ``convert``, config.json's quantization_config set to ``quantization`` (None: none)."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    index = json.load(open(os.path.join(source, "model.safetensors.index.json")))
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(source, shard))
        convert(tensors)
        save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    config = json.load(open(os.path.join(source, "config.json")))
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
    return out


def write_fp8(bf16: str, out: str, fp8=is_deepseek_fp8, edit=lambda tensors: None, quantization=FP8_CONFIG) -> str:
    """The bf16 checkpoint as an FP8 one: the weights for which ``fp8(name, tensor)`` holds,
    each with its ``weight_scale_inv`` next to it; ``edit`` may then change a shard's tensors."""

    def convert(tensors):
        for name, tensor in list(tensors.items()):
            if fp8(name, tensor):
                tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = to_fp8(tensor)
        edit(tensors)

    return rewrite(bf16, out, convert, quantization)


def dequantized_by_compressed_tensors(fp8: str, out: str) -> str:
    """The bf16 checkpoint that compressed-tensors' FP8BlockDequantizer makes of ``fp8``."""
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    dequantizer = FP8BlockDequantizer()

    def convert(tensors):
        for scale in [name for name in tensors if name.endswith(".weight_scale_inv")]:
            weight = scale.removesuffix("_scale_inv")
            tensors[weight] = dequantizer._create_dequantized_weight(tensors[weight], tensors.pop(scale)).contiguous()

    return rewrite(fp8, out, convert, None)


@pytest.fixture(scope="module")
def fp8_case(family_case, tmp_path_factory):
    """(the deepseek_v3 family case, its source as an FP8 checkpoint)."""
    case = family_case("deepseek_v3")
    return case, write_fp8(case.source, str(tmp_path_factory.mktemp("fp8-source") / "fp8"))


def random_fp8(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Every e4m3 bit pattern but NaN (0x7f, 0xff): subnormals, zeros of both signs, 448."""
    bits = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0
    return bits.view(torch.float8_e4m3fn)


def random_scales(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * 2.0 ** torch.randint(-20, 4, shape, generator=generator)


@pytest.mark.parametrize("shape", [(256, 384), (384, 128), (48, 256), (128, 64), (100, 72)])
def test_dequantize_is_transformers_arithmetic(shape):
    """Where transformers' blocks are 128 x 128: every dimension a multiple of 128, or one block."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    generator = torch.Generator().manual_seed(sum(shape))
    weight, scale = random_fp8(shape, generator), random_scales(fp8_block.scale_shape(shape), generator)
    theirs = Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.bfloat16)
    ours = fp8_block.dequantize(weight, scale)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


@pytest.mark.parametrize("shape", [(300, 200), (160, 288), (576, 256), (256, 384), (48, 100)])
def test_dequantize_is_compressed_tensors_arithmetic_partial_blocks_too(shape):
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    generator = torch.Generator().manual_seed(sum(shape))
    weight, scale = random_fp8(shape, generator), random_scales(fp8_block.scale_shape(shape), generator)
    theirs = FP8BlockDequantizer()._create_dequantized_weight(weight, scale)
    assert torch.equal(fp8_block.dequantize(weight, scale).view(torch.int16), theirs.view(torch.int16))


def test_units_are_dequantized_on_the_device_and_checked_there(tmp_path):
    """What calibration and quantization receive: bf16 weights, no scales; an e4m3 NaN
    becomes a bf16 NaN, which fails the unit naming the weight."""
    from nvfp4_ray.errors import InputError
    from nvfp4_ray.io.storage import Store
    from nvfp4_ray.io.tensors import read_file
    from nvfp4_ray.layer_quantizer import to_device_checked

    weight, scale = to_fp8(torch.randn(160, 288, generator=torch.Generator().manual_seed(0)))

    def unit(weight):
        save_file({"a.weight": weight, "a.weight_scale_inv": scale}, str(tmp_path / "unit.safetensors"))
        return read_file(Store(str(tmp_path)), "unit.safetensors")

    tensors = to_device_checked(unit(weight), torch.device("cpu"))
    assert list(tensors) == ["a.weight"] and torch.equal(tensors["a.weight"], fp8_block.dequantize(weight, scale))
    weight.view(torch.uint8)[3, 7] = 0x7F
    with pytest.raises(InputError, match="tensor 'a.weight' contains NaN or Inf"):
        to_device_checked(unit(weight), torch.device("cpu"))


@pytest.fixture(scope="module")
def fp8_quantized(fp8_case, tmp_path_factory):
    """(nvfp4-ray's checkpoint of the FP8 SOURCE, the bf16 checkpoint compressed-tensors'
    dequantizer makes of that SOURCE)."""
    case, fp8 = fp8_case
    folder = tmp_path_factory.mktemp("fp8-quantized")
    quantize(fp8, str(folder / "out"), case.calibration, ignore=IGNORE)
    return str(folder / "out"), dequantized_by_compressed_tensors(fp8, str(folder / "dequantized"))


def test_fp8_source_is_byte_identical_to_llmcompressor(fp8_case, fp8_quantized, tmp_path):
    case, fp8 = fp8_case
    out, dequantized = fp8_quantized
    ref = run_llmcompressor(dequantized, case.rows, IGNORE, str(tmp_path / "reference"))

    ours, theirs = load_tensors(out), load_tensors(ref)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert not any(name.endswith("_scale_inv") for name in ours)
    kv_b = "model.layers.2.self_attn.kv_b_proj.weight"  # ignored, FP8 in SOURCE: written dequantized
    assert load_tensors(fp8)[kv_b][0] == "torch.float8_e4m3fn" and ours[kv_b][0] == "torch.bfloat16"
    assert sum(".experts." in name and name.endswith(".input_global_scale") for name in ours) == 2 * 8 * 3
    for name in ("config.json", "recipe.yaml"):
        with open(os.path.join(out, name)) as mine, open(os.path.join(ref, name)) as expected:
            assert mine.read() == expected.read(), name
    config = json.load(open(os.path.join(out, "config.json")))
    source_config = json.load(open(os.path.join(fp8, "config.json")))
    assert {**config, "quantization_config": None} == {**source_config, "quantization_config": None}
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_evaluate_against_an_fp8_base_is_evaluate_against_its_bf16_dequantization(fp8_case, fp8_quantized, tmp_path):
    """DeepSeek-V3 is published in FP8 only: its users evaluate against that. The report
    against the FP8 BASE is the one against the bf16 checkpoint that compressed-tensors'
    dequantizer makes of it (what llm-compressor's users quantize), number for number."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from nvfp4_ray.quality.evaluate import EvaluateOptions, evaluate

    case, fp8 = fp8_case
    out, dequantized = fp8_quantized
    # held-out text within the random model's 2048-token vocabulary (the tokenizer is SmolLM2's)
    tokenizer = AutoTokenizer.from_pretrained(fp8)
    words = [w for w in topics["compound"].split() if max(tokenizer(" " + w)["input_ids"]) < 2048]
    (tmp_path / "text.txt").write_text(" ".join(words * 4))
    options = dict(quant=out, text=str(tmp_path / "text.txt"), seq_len=64, max_tokens=192)
    report = evaluate(EvaluateOptions(base=fp8, **options))
    assert report == evaluate(EvaluateOptions(base=dequantized, **options))
    assert report["text"]["tokens"] == 192 and report["weight_sqnr_db"]["linears"] > 0
    # a scale in another shard than its weight (the index says where each tensor is)
    moved = rewrite(fp8, str(tmp_path / "moved"), lambda tensors: None, FP8_CONFIG)
    index_path = os.path.join(moved, "model.safetensors.index.json")
    index = json.load(open(index_path))
    scale = f"{O_PROJ}.weight_scale_inv"
    shard = os.path.join(moved, index["weight_map"][scale])
    tensors = load_file(shard)
    save_file({scale: tensors.pop(scale)}, os.path.join(moved, "model-scales.safetensors"), metadata={"format": "pt"})
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"][scale] = "model-scales.safetensors"
    json.dump(index, open(index_path, "w"))
    assert evaluate(EvaluateOptions(base=moved, **options)) == report


def test_quantize_evaluate_from_an_fp8_source(fp8_case, smollm2, tmp_path):
    """``quantize --evaluate`` from an FP8 SOURCE (its vocabulary SmolLM2's, for the shipped
    held-out text): the report stored in the manifest is evaluate's against the bf16
    checkpoint compressed-tensors' dequantizer makes of SOURCE."""
    from models import build_model, save_model

    from nvfp4_ray.quality.evaluate import EvaluateOptions, evaluate

    case, _ = fp8_case
    bf16 = save_model(build_model("deepseek_v3", vocab_size=49152), str(tmp_path / "bf16"), smollm2)
    fp8 = write_fp8(bf16, str(tmp_path / "fp8"))
    out = str(tmp_path / "out")
    summary = quantize(fp8, out, case.calibration, ignore=IGNORE, evaluate=True)
    stored = json.load(open(os.path.join(out, "manifest.json")))["quality"]
    assert summary["quality"] == stored and stored["weight_sqnr_db"]["linears"] > 0
    dequantized = dequantized_by_compressed_tensors(fp8, str(tmp_path / "dequantized"))
    assert evaluate(EvaluateOptions(base=dequantized, quant=out)) == stored


def test_an_fp8_base_whose_bf16_copy_does_not_fit_under_tmpdir_is_refused(fp8_case, fp8_quantized, mount_tmpfs, monkeypatch):
    import tempfile

    _, fp8 = fp8_case
    out, _ = fp8_quantized
    monkeypatch.setattr(tempfile, "tempdir", mount_tmpfs("size=64k"))
    assert_input_error(run_cli("evaluate", fp8, out), "set TMPDIR to a folder with room")


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ({"quant_method": "awq"}, "already quantized (quantization_config: awq)"),
        ({"activation_scheme": "static"}, 'activation_scheme="static"'),
        ({"weight_block_size": [1, 128]}, "weight_block_size=[1, 128]"),
        ({"weight_block_size": None}, "weight_block_size=null"),
        ({"fmt": "e5m2"}, 'fmt="e5m2"'),
        ({"modules_to_convert": ["embed_tokens"]}, 'modules_to_convert=["embed_tokens"]'),
    ],
)
def test_other_quantization_configs_are_refused(setting, fragment, fp8_case, tmp_path):
    case, fp8 = fp8_case
    source = str(tmp_path / "source")
    shutil.copytree(fp8, source)
    config = json.load(open(os.path.join(source, "config.json")))
    config["quantization_config"] = {key: value for key, value in {**FP8_CONFIG, **setting}.items() if value is not None}
    json.dump(config, open(os.path.join(source, "config.json"), "w"))
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(source, dest, case.calibration)), fragment, dest)
    # as evaluate's BASE: an FP8 one is read as quantize reads it, anything else is refused
    as_base = "is quantized; give the unquantized (or FP8" if "quant_method" in setting else fragment
    assert_input_error(run_cli("evaluate", source, dest), as_base)


O_PROJ = "model.layers.1.self_attn.o_proj"


def without_scale(tensors):
    tensors.pop(f"{O_PROJ}.weight_scale_inv", None)


def with_wrong_scale_shape(tensors):
    if f"{O_PROJ}.weight_scale_inv" in tensors:
        tensors[f"{O_PROJ}.weight_scale_inv"] = tensors[f"{O_PROJ}.weight_scale_inv"][:1]


@pytest.mark.parametrize(
    "fp8, edit, quantization, fragment",
    [
        (is_deepseek_fp8, without_scale, FP8_CONFIG, f"FP8 weight '{O_PROJ}.weight' has no '{O_PROJ}.weight_scale_inv'"),
        (is_deepseek_fp8, with_wrong_scale_shape, FP8_CONFIG, "is F32 [1, 1], but a [160, 128] FP8 weight needs F32 [2, 1]"),
        (lambda name, t: is_deepseek_fp8(name, t) or name == "lm_head.weight", lambda t: None, FP8_CONFIG,
         "FP8 weight 'lm_head.weight' is outside the decoder layers"),
        (is_deepseek_fp8, lambda t: None, {**FP8_CONFIG, "modules_to_not_convert": ["o_proj"]},
         "modules_to_not_convert entry 'o_proj' says it is not"),
    ],
    ids=["missing-scale", "scale-shape", "fp8-lm-head", "modules-to-not-convert"],
)  # fmt: skip
def test_inconsistent_fp8_tensors_are_refused(fp8, edit, quantization, fragment, fp8_case, tmp_path):
    case, _ = fp8_case
    source = write_fp8(case.source, str(tmp_path / "source"), fp8, edit, quantization)
    dest = str(tmp_path / "dest")
    assert_input_error(run_cli(*quantize_args(source, dest, case.calibration)), fragment, dest)
    if "outside the decoder layers" not in fragment:  # evaluate dequantizes an FP8 lm_head as well
        assert_input_error(run_cli("evaluate", source, dest), fragment)
