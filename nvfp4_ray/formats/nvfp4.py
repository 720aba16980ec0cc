"""NVFP4 tensor math: pure functions, no Ray, no I/O.

NVFP4 (compressed-tensors preset ``NVFP4``, format ``nvfp4-pack-quantized``):
  * weights: FP4 e2m1 codes, one FP8 e4m3 scale per 16 consecutive input columns, and one
    FP32 global scale per tensor, shared by fused siblings (q/k/v, gate/up);
  * activations: one FP32 ``input_global_scale`` per Linear from the calibration amax.

Every function here calls compressed-tensors' own routines in the order llm-compressor
0.14 calls them, so each intermediate rounding (bf16 amax, bf16 ``448*6/amax``, bf16
``amax/6``, e4m3 scale) happens exactly where the reference does it. That is what makes
the output bit-identical; tests/test_formats.py holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

GROUP_SIZE = 16
SCALE_DTYPE = torch.float8_e4m3fn
_SCHEME = preset_name_to_scheme("NVFP4", ["Linear"])
WEIGHT_ARGS = _SCHEME.weights
INPUT_ARGS = _SCHEME.input_activations


@dataclass(frozen=True)
class PackedWeight:
    """The three tensors a quantized Linear's weight becomes in the checkpoint."""

    weight_packed: torch.Tensor  # uint8 [out, in/2], even column in the low nibble
    weight_scale: torch.Tensor  # float8_e4m3fn [out, in/16]
    weight_global_scale: torch.Tensor  # float32 [1]


def absmax(tensor: torch.Tensor) -> torch.Tensor:
    """max(|min|, |max|, 0) as a 0-dim tensor in the tensor's own dtype (exact for bf16).

    This is what the min/max observers reduce to; it is order-independent, so partial
    results from sample shards or weight slices combine exactly with ``torch.maximum``.
    """
    lo, hi = torch.aminmax(tensor)
    zero = torch.zeros((), dtype=tensor.dtype, device=tensor.device)
    return torch.maximum(torch.maximum(-lo, hi), zero)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP32 [1] global scale ``448*6/amax``, divided in amax's dtype (bf16) like the reference."""
    amax = amax.reshape(1)
    return generate_gparam(-amax, amax)


def quantize_weight(weight: torch.Tensor, weight_global_scale: torch.Tensor) -> PackedWeight:
    """Quantize one Linear weight [out, in] given its (possibly shared) global scale."""
    groups = weight.unflatten(-1, (-1, GROUP_SIZE))
    group_min, group_max = torch.aminmax(groups, dim=-1)
    scale, _ = calculate_qparams(group_min, group_max, WEIGHT_ARGS, global_scale=weight_global_scale)
    # llm-compressor stores the scale in a parameter of the weight's dtype before compressing.
    scale = scale.to(weight.dtype)
    codes = quantize(x=weight, scale=scale, zero_point=None, args=WEIGHT_ARGS, global_scale=weight_global_scale)
    return PackedWeight(
        weight_packed=pack_fp4_to_uint8(codes),
        weight_scale=scale.to(SCALE_DTYPE),
        weight_global_scale=weight_global_scale,
    )


def quantize_fused_group(weights: list[torch.Tensor]) -> list[PackedWeight]:
    """Quantize fused siblings with one global scale from the group's largest amax.

    vLLM fuses q/k/v and gate/up into one GEMM, so their global scales must be equal.
    """
    group_amax = absmax(weights[0])
    for weight in weights[1:]:
        group_amax = torch.maximum(group_amax, absmax(weight))
    shared_scale = global_scale(group_amax)
    return [quantize_weight(weight, shared_scale) for weight in weights]


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of quantize_weight (used by the quality report, never by the job)."""
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
