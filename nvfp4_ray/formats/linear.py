"""Any compressed-tensors scheme, one Linear at a time: pure functions, no Ray, no I/O.

The steps and their order are llm-compressor 0.14's: a memoryless min/max observer over
the weight reshaped for the scheme's strategy; for tensor-group schemes (NVFP4) one global
scale from the largest amax of the fused siblings; ``calculate_qparams``; the scale stored
in the weight's dtype; then the scheme's compressor from compressed-tensors' registry,
which writes the checkpoint tensors (``weight_packed``, fp8 ``weight``, ...).
Activation scales come from the calibration amax through the same ``calculate_qparams``
/ ``generate_gparam`` calls.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import DynamicType, QuantizationArgs, QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from nvfp4_ray.formats import nvfp4

Tensors = dict[str, torch.Tensor]


def _observe(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale min and max, as llm-compressor's weight observer reshapes and reduces."""
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        observed = weight.reshape(1, 1, -1)
    elif strategy == QuantizationStrategy.CHANNEL:
        observed = weight.unsqueeze(-2).unsqueeze(0)
    elif strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        observed = weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    else:
        raise ValueError(f"weight strategy {strategy} is not supported")
    return torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1))


def _absmax(min_vals: torch.Tensor, max_vals: torch.Tensor) -> torch.Tensor:
    return torch.maximum(max_vals.max(), -min_vals.min())


def weight_qparams(weights: list[torch.Tensor], args: QuantizationArgs) -> tuple[torch.Tensor | None, list[tuple]]:
    """Fused siblings (or one Linear) -> their shared global scale (tensor-group schemes,
    else None) and each weight's (scale, zero point), the scale in the weight's dtype."""
    observed = [_observe(weight, args) for weight in weights]
    global_scale = None
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        # vLLM fuses q/k/v and gate/up into one GEMM: they share one global scale
        group_amax = _absmax(*observed[0])
        for stats in observed[1:]:
            group_amax = torch.maximum(group_amax, _absmax(*stats))
        global_scale = generate_gparam(-group_amax.reshape(1), group_amax.reshape(1))
    qparams = []
    for weight, (min_vals, max_vals) in zip(weights, observed):
        scale, zero_point = calculate_qparams(min_vals, max_vals, args, global_scale=global_scale)
        qparams.append((scale.to(weight.dtype), zero_point))  # stored in a parameter of the weight's dtype
    return global_scale, qparams


def quantize_group(
    weights: list[torch.Tensor], scheme: QuantizationScheme, qparams: tuple | None = None
) -> list[Tensors]:
    """Fused siblings (or one Linear) -> the weight tensors each writes, by suffix.
    ``qparams``: ``weight_qparams`` of other weights (GPTQ: the weights as loaded)."""
    args = scheme.weights
    global_scale, scales = qparams if qparams is not None else weight_qparams(weights, args)
    compressor = BaseCompressor.get_value_from_registry(scheme.format.value)
    outputs = []
    for weight, (scale, zero_point) in zip(weights, scales):
        if scheme.format == CompressionFormat.nvfp4_pack_quantized:
            packed = nvfp4.encode(weight, scale, global_scale)  # what the compressor computes, faster
            outputs.append({"weight_packed": packed, "weight_scale": scale.to(args.scale_dtype), "weight_global_scale": global_scale})
            continue
        state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        if global_scale is not None:
            state["weight_global_scale"] = global_scale
        outputs.append(dict(compressor.compress(state, scheme)))
    return outputs


def preset(name: str) -> QuantizationScheme:
    """A compressed-tensors preset scheme for Linears, with its compression format set."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(name, ["Linear"])
    scheme.format = infer_module_format(torch.nn.Linear, scheme)
    return scheme


def needs_calibration(args: QuantizationArgs | None) -> bool:
    """Static scales, and the global scale of locally dynamic (NVFP4) activations."""
    return args is not None and args.dynamic in (False, DynamicType.LOCAL)


def activation_tensors(prefix: str, args: QuantizationArgs | None, amax: float, dtype: torch.dtype) -> Tensors:
    """The scale tensors of one observed activation (``prefix``: input, k, v) from its amax."""
    if not needs_calibration(args):
        return {}
    value = torch.tensor([amax], dtype=dtype)
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        return {f"{prefix}_global_scale": generate_gparam(-value, value)}
    if args.strategy != QuantizationStrategy.TENSOR:
        raise ValueError(f"static activation strategy {args.strategy} is not supported")
    scale, _ = calculate_qparams(-value, value, args)
    return {f"{prefix}_scale": scale.to(dtype)}
