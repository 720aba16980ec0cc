"""Turn one unit's source tensors into its output tensors (no Ray, no storage).

Quantized Linears become what their scheme's compressor writes (``weight_packed`` and
scales for NVFP4, an fp8 ``weight`` and its scale for FP8, ...); every other tensor is
passed through as the exact bytes it had in the source.
"""

from __future__ import annotations

import math

import torch

from nvfp4_ray.architecture import LayerSpec
from nvfp4_ray.errors import InputError
from nvfp4_ray.formats import linear as formats
from nvfp4_ray.io.tensors import FLOAT_DTYPES, TensorBundle, bundle_entry, torch_dtype, torch_entry


def to_device_checked(
    bundle: TensorBundle, device: torch.device, check: bool = True, staging: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the unit on ``device``; with ``check``, a NaN or Inf in any
    floating-point one fails the unit (one host sync for all of them). ``staging``: a
    pinned byte buffer at least as large as the bundle, through which the bundle crosses
    to the GPU in one asynchronous copy (the tensors are views into it there); a bundle
    read into it already is not copied again."""
    if device.type == "cuda" and staging is not None:
        host = staging[: bundle.buffer.size]
        if not bundle.buffer.size or host.data_ptr() != bundle.buffer.ctypes.data:  # not read into it already
            host.copy_(bundle.as_tensor())
        whole = host.to(device, non_blocking=True)
        tensors = {name: _view(whole, bundle, name) for name in bundle.names()}
    else:
        tensors = {name: bundle.tensor(name).to(device, non_blocking=True) for name in bundle.names()}
    floats = [name for name in tensors if bundle.entries[name][1] in FLOAT_DTYPES] if check else []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in floats]).tolist() if floats else []
    for name, ok in zip(floats, finite):
        if not ok:
            raise InputError(f"tensor {name!r} contains NaN or Inf; the source checkpoint is broken")
    return tensors


def _view(whole: torch.Tensor, bundle: TensorBundle, name: str) -> torch.Tensor:
    offset, dtype, shape = bundle.entries[name]
    dtype = torch_dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    part = whole[offset : offset + size]
    if offset % dtype.itemsize:  # a view needs aligned elements
        part = part.clone()
    return part.view(dtype).view(shape)


def quantize_layer(spec: LayerSpec, bundle: TensorBundle, on_device: dict[str, torch.Tensor]) -> list[tuple]:
    """Output entries (name, dtype, shape, bytes) for one decoder layer, from its tensors
    already on the device (``to_device_checked``) and their source bytes."""
    entries = []
    replaced = set()
    for group in spec.groups:
        names = [f"{linear.checkpoint}.weight" for linear in group]
        weights = [on_device[name] for name in names]
        for linear, tensors in zip(group, formats.quantize_group(weights, group[0].scheme)):
            entries.extend(torch_entry(f"{linear.checkpoint}.{suffix}", t) for suffix, t in tensors.items())
        replaced.update(names)
    entries.extend(bundle_entry(bundle, name) for name in bundle.names() if name not in replaced)
    return entries


def scale_entries(layers: list[LayerSpec], layer_amax: list[dict[str, float]], kv_args, dtype: torch.dtype) -> list[tuple]:
    """Activation scale tensors (input_global_scale, input_scale, k_scale, v_scale) from the
    reduced calibration amax of every layer."""
    entries = []
    for layer, amax in zip(layers, layer_amax):
        for linear in layer.linears:
            if linear.calibrated:
                tensors = formats.activation_tensors("input", linear.scheme.input_activations, amax[linear.local], dtype)
                entries.extend(torch_entry(f"{linear.checkpoint}.{suffix}", t) for suffix, t in tensors.items())
        for attention in layer.attention:
            for kv in "kv":
                tensors = formats.activation_tensors(kv, kv_args, amax[f"{attention.local}.{kv}"], dtype)
                entries.extend(torch_entry(f"{attention.checkpoint}.{suffix}", t) for suffix, t in tensors.items())
    return entries
