"""Turn one unit's source tensors into its output tensors (no Ray, no storage).

Quantized Linears become weight_packed / weight_scale / weight_global_scale; every other
tensor is passed through as the exact bytes it had in the source.
"""

from __future__ import annotations

import torch

from nvfp4_ray.architecture import LayerSpec
from nvfp4_ray.errors import InputError
from nvfp4_ray.formats import nvfp4
from nvfp4_ray.io.tensors import FLOAT_DTYPES, TensorBundle, bundle_entry, torch_entry


def check_finite(bundle: TensorBundle, names, device: torch.device) -> None:
    for name in names:
        _, dtype, _ = bundle.entries[name]
        if dtype in FLOAT_DTYPES and not bool(torch.isfinite(bundle.tensor(name).to(device)).all()):
            raise InputError(f"tensor {name!r} contains NaN or Inf; the source checkpoint is broken")


def quantize_layer(spec: LayerSpec, bundle: TensorBundle, device: torch.device) -> list[tuple]:
    """Output entries (name, dtype, shape, bytes) for one decoder layer."""
    check_finite(bundle, bundle.names(), device)
    entries = []
    replaced = set()
    for group in spec.groups:
        names = [f"{linear.checkpoint}.weight" for linear in group]
        weights = [bundle.tensor(name).to(device) for name in names]
        for linear, packed in zip(group, nvfp4.quantize_fused_group(weights)):
            entries.append(torch_entry(f"{linear.checkpoint}.weight_packed", packed.weight_packed))
            entries.append(torch_entry(f"{linear.checkpoint}.weight_scale", packed.weight_scale))
            entries.append(torch_entry(f"{linear.checkpoint}.weight_global_scale", packed.weight_global_scale))
        replaced.update(names)
    entries.extend(bundle_entry(bundle, name) for name in bundle.names() if name not in replaced)
    return entries


def input_scale_entries(amax: dict[str, float], dtype: torch.dtype) -> list[tuple]:
    """input_global_scale tensors from the reduced calibration amax of each Linear (checkpoint names)."""
    entries = []
    for name in sorted(amax):
        value = torch.tensor(amax[name], dtype=dtype)
        entries.append(torch_entry(f"{name}.input_global_scale", nvfp4.global_scale(value)))
    return entries
