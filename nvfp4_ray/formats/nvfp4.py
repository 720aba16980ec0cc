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
