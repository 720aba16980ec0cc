"""NVFP4 checkpoint tensors back to weights (for the quality report; the job itself
quantizes through formats/linear.py).

NVFP4 (format ``nvfp4-pack-quantized``): FP4 e2m1 codes two per byte (even column in the
low nibble), one FP8 e4m3 scale per 16 input columns, one FP32 global scale per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize

WEIGHT_ARGS = preset_name_to_scheme("NVFP4", ["Linear"]).weights


@dataclass(frozen=True)
class PackedWeight:
    """The three tensors a quantized Linear's weight becomes in the checkpoint."""

    weight_packed: torch.Tensor  # uint8 [out, in/2], even column in the low nibble
    weight_scale: torch.Tensor  # float8_e4m3fn [out, in/16]
    weight_global_scale: torch.Tensor  # float32 [1]


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight an NVFP4 checkpoint serves: codes x group scale / global scale."""
    rows, half_columns = packed.weight_packed.shape
    codes = unpack_fp4_from_uint8(packed.weight_packed, rows, half_columns * 2, dtype=torch.float32)
    weight = dequantize(
        x_q=codes,
        scale=packed.weight_scale.to(torch.float32),
        args=WEIGHT_ARGS,
        global_scale=packed.weight_global_scale,
        dtype=torch.float32,
    )
    return weight.to(dtype)


def encode(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Pack a weight [out, in] into FP4 e2m1 codes, two per byte (even column low), given
    its per-16 group scales (in the weight's dtype) and its global scale.

    The same numbers as compressed-tensors' NVFP4 compressor (``quantize`` with a zero
    zero-point, round half to even, then ``pack_fp4_to_uint8``), in a handful of passes
    instead of its CPU fallback's dozens: the magnitude's code is the count of grid
    midpoints it lies above (ties go to the even code, so the comparisons alternate
    strict and inclusive), and the sign bit is that of the scaled value, so a negative
    value that rounds to zero keeps its sign as in the reference. tests/test_formats.py
    holds it to compressed-tensors on generated weights.
    """
    effective = (scale.to(torch.float32) / global_scale).unsqueeze(-1)  # per group, broadcast over its 16
    scaled = weight.unflatten(-1, (-1, 16)).to(torch.float32) / effective
    scaled = (scaled + 0.0).clamp(-6.0, 6.0).flatten(-2)  # + the reference's zero zero-point: -0.0 -> +0.0
    magnitude = scaled.abs()
    code = (magnitude > 0.25).to(torch.uint8)
    for threshold, inclusive in ((0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        code += (magnitude >= threshold) if inclusive else (magnitude > threshold)
    code |= torch.signbit(scaled).to(torch.uint8) << 3
    return code[:, 0::2] | (code[:, 1::2] << 4)
