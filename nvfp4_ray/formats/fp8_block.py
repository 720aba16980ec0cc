"""FP8 SOURCE checkpoints with 128 x 128 block scales (DeepSeek-V3, Kimi-K2), dequantized
to bf16 on the fly, as transformers loads them with ``FineGrainedFP8Config(dequantize=True)``
and compressed-tensors' ``FP8BlockDequantizer`` converts them (what llm-compressor 0.14 has
its users run first: its oneshot refuses an FP8 checkpoint).

Such a checkpoint stores a Linear's weight as F8_E4M3 and, next to it, ``weight_scale_inv``:
one F32 factor per 128 x 128 block, ``[ceil(out / 128), ceil(in / 128)]`` (the last row and
column of blocks are partial when a dimension is not a multiple of 128). The weight is
``fp8 * scale`` per block. The plan checks the checkpoint (``check_source_config``,
``scales_of``); every unit is dequantized in one place, ``dequantize_weights``, as soon as
it is on the device, so calibration and quantization both see the bf16 weights.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from nvfp4_ray.errors import InputError

if TYPE_CHECKING:
    import torch

BLOCK = 128
SCALE_SUFFIX = ".weight_scale_inv"
# The quantization_config settings read here and the values accepted; a missing
# weight_block_size is refused (per-tensor FP8), any other key too, but for these:
_ACCEPTED = {
    "quant_method": ("fp8",),
    "weight_block_size": ([BLOCK, BLOCK],),
    "fmt": ("e4m3",),
    "activation_scheme": ("dynamic",),  # "static" comes with activation_scale tensors
    "scale_fmt": ("float", "ue8m0"),  # F32 scales either way (ue8m0: powers of two), multiplied alike
}
_UNREAD = ("modules_to_not_convert", "ignored_layers", "dequantize")  # the tensors say what is FP8


def check_source_config(quantization: object, role: str = "SOURCE") -> None:
    """Refuse a quantization_config other than FP8 with 128 x 128 block scales; ``role``:
    what the checkpoint is to the command (SOURCE, or evaluate's BASE)."""
    method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
    if method != "fp8":
        raise InputError(
            f"{role} is already quantized (quantization_config: {method}); start from the unquantized checkpoint "
            "(or an FP8 one with 128 x 128 block scales, as DeepSeek-V3 and Kimi-K2 are published)"
        )
    for key, value in {"weight_block_size": None, **quantization}.items():
        accepted = value in _ACCEPTED[key] if key in _ACCEPTED else key in _UNREAD or (key == "modules_to_convert" and not value)
        if not accepted:
            raise InputError(
                f"{role}'s FP8 quantization_config has {key}={json.dumps(value)}; only e4m3 weights with 128 x 128 "
                "block scales and dynamic activations are read: start from the unquantized checkpoint"
            )


def scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = weight_shape
    return math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)


def scales_of(quantization: dict | None, tensors: dict, role: str = "SOURCE") -> dict[str, str]:
    """The ``weight_scale_inv`` tensors of an FP8 SOURCE, each with the name of its weight,
    after checking that every F8_E4M3 tensor is a 2D weight with its F32 block scales
    (``tensors``: name -> SourceTensor); {} for a checkpoint without quantization_config."""
    if quantization is None:
        return {}
    not_converted = quantization.get("modules_to_not_convert") or quantization.get("ignored_layers") or []
    pairs = {}
    for name, tensor in tensors.items():
        entry = tensor.entry
        if name.endswith(SCALE_SUFFIX):
            weight = tensors.get(name.removesuffix("_scale_inv"))
            if weight is None or weight.entry.dtype != "F8_E4M3":
                raise InputError(f"tensor {name!r} scales no F8_E4M3 weight; the FP8 checkpoint is inconsistent")
            pairs[name] = weight.name
            continue
        if entry.dtype.startswith("F8_") and entry.dtype != "F8_E4M3":
            raise InputError(f"tensor {name!r} is {entry.dtype}; an FP8 {role} is read with e4m3 weights only")
        if entry.dtype != "F8_E4M3":
            continue
        if not name.endswith(".weight") or len(entry.shape) != 2:
            raise InputError(f"tensor {name!r} is F8_E4M3 but not a Linear weight; only Linear weights are read as FP8")
        module = name.removesuffix(".weight")
        scale = tensors.get(module + SCALE_SUFFIX)
        if scale is None:
            raise InputError(f"FP8 weight {name!r} has no {module + SCALE_SUFFIX!r}; the FP8 checkpoint is incomplete")
        expected = scale_shape(entry.shape)
        if scale.entry.dtype != "F32" or tuple(scale.entry.shape) != expected:
            raise InputError(
                f"tensor {scale.name!r} is {scale.entry.dtype} {list(scale.entry.shape)}, but a {list(entry.shape)} "
                f"FP8 weight needs F32 {list(expected)}: one scale per 128 x 128 block"
            )
        listed = [pattern for pattern in not_converted if _names_module(pattern, module)]
        if listed:
            raise InputError(
                f"tensor {name!r} is F8_E4M3, but quantization_config's modules_to_not_convert entry {listed[0]!r} "
                "says it is not; is config.json the one for these weights?"
            )
    return pairs


def _names_module(pattern: str, module: str) -> bool:
    """Whether a modules_to_not_convert entry covers ``module``, as transformers matches them
    (``should_convert_module``): a prefix, a regex match at the start, or a suffix."""
    return bool(re.match(f"{pattern}\\.", module) or re.match(pattern, module) or module.endswith(pattern))


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A [out, in] float8_e4m3fn weight times its F32 block scales, as bf16.

    The arithmetic of transformers' ``Fp8Dequantize`` and compressed-tensors'
    ``FP8BlockDequantizer``: the weight converted to float32, multiplied by its block's
    float32 scale (one rounding), rounded to bf16. Edge blocks are partial: element [r, c]
    takes scale [r // 128, c // 128], as in compressed-tensors and DeepSeek's own kernels.
    (transformers 5.17 splits each dimension into as many equal blocks as the scale grid
    has: the same where a dimension is a multiple of 128 or one block long; elsewhere it
    raises, or computes other weights.)"""
    import torch  # here: the plan imports this module with the checkpoint, before torch is needed

    rows, cols = weight.shape
    per_element = scale.repeat_interleave(BLOCK, dim=0)[:rows].repeat_interleave(BLOCK, dim=1)[:, :cols]
    values = weight.to(torch.float32)
    values *= per_element  # in place: one float32 copy of the weight less at the peak
    return values.to(torch.bfloat16)


def dequantize_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A unit's tensors with every FP8 weight that has block scales dequantized to bf16 and
    the scales dropped (the plan has checked the pairs); the same dict if there are none."""
    scales = [name for name in tensors if name.endswith(SCALE_SUFFIX)]
    if not scales:
        return tensors
    out = dict(tensors)
    for name in scales:
        weight = name.removesuffix("_scale_inv")
        out[weight] = dequantize(out[weight], out.pop(name))
    return out
