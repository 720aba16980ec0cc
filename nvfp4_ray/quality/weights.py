"""Per-Linear weight SQNR: how much of each weight the NVFP4 checkpoint keeps.

SQNR = 10 log10(sum w^2 / sum (w - q)^2) in dB, with w the BASE weight and q the QUANT
weight dequantized from its packed FP4 codes and scales (nvfp4.dequantize_weight, in
float32, so the value NVFP4 represents and not a bf16 rounding of it); sums in float64.
About 6 dB per bit: NVFP4 weights typically land near 20 dB.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open

from nvfp4_ray.errors import InputError
from nvfp4_ray.formats.nvfp4 import PackedWeight, dequantize_weight

PACKED = ".weight_packed"


def tensor_files(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors path of a local checkpoint (sharded or single file)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            weight_map = json.load(handle)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise InputError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def quantized_linears(base_files: dict[str, str], quant_files: dict[str, str], quant: str) -> list[str]:
    """The checkpoint prefixes of QUANT's NVFP4 Linears (``tensor_files`` of both), in name
    order, each with a weight in BASE."""
    prefixes = sorted(name[: -len(PACKED)] for name in quant_files if name.endswith(PACKED))
    if not prefixes:
        raise InputError(f"QUANT {quant} holds no NVFP4 weights (no *{PACKED} tensors)")
    for prefix in prefixes:
        if f"{prefix}.weight" not in base_files:
            raise InputError(f"QUANT quantizes {prefix} but BASE has no {prefix}.weight; was QUANT made from BASE?")
    return prefixes


def weight_sqnr(base: str, quant: str) -> dict[str, float]:
    """Quantized Linear (checkpoint prefix) -> SQNR in dB (None when exact), in name order."""
    base_files, quant_files = tensor_files(base), tensor_files(quant)
    result = {}
    for prefix in quantized_linears(base_files, quant_files, quant):
        weight = _read(base_files, f"{prefix}.weight")
        suffixes = (PACKED, ".weight_scale", ".weight_global_scale")
        packed = PackedWeight(*(_read(quant_files, prefix + suffix) for suffix in suffixes))
        if packed.weight_packed.shape[0] != weight.shape[0] or packed.weight_packed.shape[1] * 2 != weight.shape[1]:
            raise InputError(
                f"{prefix}: BASE weight is {list(weight.shape)} but QUANT packs {list(packed.weight_packed.shape)}; "
                "was QUANT made from BASE?"
            )
        signal = weight.to(torch.float64)
        noise = signal - dequantize_weight(packed, torch.float32).to(torch.float64)
        noise_energy = float(noise.square().sum())
        # None: represented exactly (an all-zero weight, for one); there is no noise to rank.
        result[prefix] = 10.0 * math.log10(float(signal.square().sum()) / noise_energy) if noise_energy else None
    return result


def _read(files: dict[str, str], name: str) -> torch.Tensor:
    with safe_open(files[name], "pt") as handle:
        return handle.get_tensor(name)


def summarize(per_linear: dict[str, float | None], worst: int) -> dict:
    measured = [(name, db) for name, db in per_linear.items() if db is not None]
    ranked = sorted(measured, key=lambda item: (item[1], item[0]))
    return {
        "linears": len(per_linear),
        "mean": math.fsum(db for _, db in ranked) / len(ranked) if ranked else None,
        "min": ranked[0][1] if ranked else None,
        "worst": [{"name": name, "sqnr_db": value} for name, value in ranked[:worst]],
        "per_linear": per_linear,
    }
