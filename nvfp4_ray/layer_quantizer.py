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
from nvfp4_ray.formats import fp8_block
from nvfp4_ray.formats import linear as formats
from nvfp4_ray.io.tensors import FLOAT_DTYPES, LocalRead, TensorBundle, safetensors_dtype, to_device_in_pieces, torch_dtype


def to_device_checked(
    tensors: TensorBundle | LocalRead, device: torch.device, check: bool = True, pieces: list | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the unit on ``device``, an FP8 SOURCE's weights dequantized to bf16
    (their block scales dropped); with ``check``, a NaN or Inf in any floating-point one
    fails the unit (one host sync for all of them). To a GPU the unit crosses whole,
    through ``pieces`` (``to_device_in_pieces``), and its tensors are views of the copy
    there; on a CPU they are views of the bundle (a LocalRead is read first)."""
    if device.type == "cuda":
        whole = to_device_in_pieces(tensors, device, pieces)
        on_device = {name: _view(whole, entry) for name, entry in tensors.entries.items()}
    else:
        bundle = tensors.read() if isinstance(tensors, LocalRead) else tensors
        on_device = {name: bundle.tensor(name) for name in bundle.names()}
    on_device = fp8_block.dequantize_weights(on_device)  # what calibration and quantization both see
    floats = [name for name, tensor in on_device.items() if safetensors_dtype(tensor.dtype) in FLOAT_DTYPES] if check else []
    finite = torch.stack([torch.isfinite(on_device[name]).all() for name in floats]).tolist() if floats else []
    for name, ok in zip(floats, finite):
        if not ok:
            raise InputError(f"tensor {name!r} contains NaN or Inf; the source checkpoint is broken")
    return on_device


def _view(whole: torch.Tensor, entry: tuple) -> torch.Tensor:
    offset, dtype, shape = entry
    dtype = torch_dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    part = whole[offset : offset + size]
    if offset % dtype.itemsize:  # a view needs aligned elements
        part = part.clone()
    return part.view(dtype).view(shape)


def quantize_layer(spec: LayerSpec, on_device: dict[str, torch.Tensor], part: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Output tensors (name, tensor on the device) for one decoder layer, from its tensors
    on the device (``to_device_checked``). Tensors passed through keep their source bytes,
    as copies (norms and biases, small): a view would hold the whole layer's bytes while
    the output waits to be written. ``part``: ``on_device`` is one part of the layer
    (calibration/expert_groups.py), which holds whole fused groups: those outside it are
    another part's."""
    out = []
    replaced = set()
    for group in spec.groups:
        names = [f"{linear.checkpoint}.weight" for linear in group]
        if part and names[0] not in on_device:
            continue
        weights = [on_device[name] for name in names]
        for linear, tensors in zip(group, formats.quantize_group(weights, group[0].scheme)):
            out.extend((f"{linear.checkpoint}.{suffix}", t) for suffix, t in tensors.items())
        replaced.update(names)
    out.extend((name, t.clone()) for name, t in on_device.items() if name not in replaced)
    return out


def scale_tensors(layers: list[LayerSpec], layer_amax: list[dict[str, float]], kv_args, dtype: torch.dtype) -> list[tuple]:
    """Activation scale tensors (name, tensor: input_global_scale, input_scale, k_scale,
    v_scale) from the reduced calibration amax of every layer."""
    out = []
    for layer, amax in zip(layers, layer_amax):
        for linear in layer.linears:
            if linear.calibrated:
                tensors = formats.activation_tensors("input", linear.scheme.input_activations, amax[linear.local], dtype)
                out.extend((f"{linear.checkpoint}.{suffix}", t) for suffix, t in tensors.items())
        for attention in layer.attention:
            for kv in "kv":
                tensors = formats.activation_tensors(kv, kv_args, amax[f"{attention.local}.{kv}"], dtype)
                out.extend((f"{attention.checkpoint}.{suffix}", t) for suffix, t in tensors.items())
    return out
