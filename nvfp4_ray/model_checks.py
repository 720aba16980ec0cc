"""The checks describe_model makes before any work: every checkpoint tensor matched to a
parameter of the model built from config.json, with its shape; the recipe's targets
(decoder Linears of one float dtype, in_features a multiple of the group size); fused
siblings quantized together, with one scheme."""

from __future__ import annotations

import re

import torch

from nvfp4_ray.errors import InputError
from nvfp4_ray.experts import fuses_experts

# Siblings that vLLM fuses into one GEMM (llm-compressor's FUSED_LAYER_NAMES): they share a
# global scale, and must be all quantized or all ignored.
FUSED_SIBLINGS = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3"))
QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")


def checkpoint_to_model_names(model, checkpoint_tensors: dict) -> dict[str, str]:
    """Map every checkpoint tensor name to its parameter name, and insist on a full match."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    # the converters that fuse per-expert tensors into 3D parameters do not apply: the
    # experts are linearized (experts.py), one parameter per checkpoint tensor
    converters = [c for c in conversions if isinstance(c, WeightConverter) and not fuses_experts(c)]
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    unloaded = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    mapping: dict[str, str] = {}
    for name in checkpoint_tensors:
        renamed, converter = rename_source_key(name, renamings, converters)
        if converter is not None:
            raise InputError(f"tensor {name!r} needs a weight conversion ({converter}) that this tool does not support")
        target = renamed if renamed in params else name if name in params else None
        if target is None and any(re.search(p, name) for p in unloaded):
            continue  # transformers leaves it out (DeepSeek-V3's multi-token-prediction layer): so does the output
        if target is None:
            raise InputError(
                f"tensor {name!r} in the checkpoint matches no parameter of {type(model).__name__} "
                "built from config.json; is config.json the one for these weights?"
            )
        mapping[name] = target
    covered = set(mapping.values())
    tied = {n for n in params if _is_tied(model, n)}
    unique_params = dict(model.named_parameters())
    missing = [n for n in unique_params if n not in covered and n not in tied]
    if missing:
        raise InputError(f"the checkpoint has no tensor for parameter {missing[0]!r} ({len(missing)} missing in all)")
    return mapping


def _is_tied(model, name: str) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tie = getattr(model.config.get_text_config(), "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False)
    return bool(tie and output is not None and name.endswith("lm_head.weight"))


def check_shapes(model, checkpoint_tensors: dict, to_model: dict) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, tensor in checkpoint_tensors.items():
        if name not in to_model:  # not loaded, not written
            continue
        expected = tuple(params[to_model[name]].shape)
        found = tuple(tensor.entry.shape)
        if expected != found:
            raise InputError(f"tensor {name!r} has shape {list(found)} but config.json implies {list(expected)}")


def check_targets(model, targeted, layer_prefixes, weight_dtypes: dict, to_checkpoint) -> str:
    modules = dict(model.named_modules())
    dtypes = set()
    for name, scheme in targeted.items():
        module = modules[name]
        if not isinstance(module, torch.nn.Linear):
            raise InputError(f"{name} ({type(module).__name__}) is targeted, but only Linear layers can be quantized")
        if not any(name.startswith(p) for p in layer_prefixes):
            raise InputError(
                f"{name} would be quantized, but only Linears inside the decoder layers are supported; "
                f"add {name!r} to the ignore list"
            )
        group_size = scheme.weights.group_size if scheme.weights.strategy in ("group", "tensor_group") else None
        if group_size and module.in_features % group_size:
            raise InputError(
                f"{name}: in_features {module.in_features} is not divisible by the group size {group_size}; "
                f"add {name!r} to the ignore list"
            )
        dtypes.add(weight_dtypes[to_checkpoint[f"{name}.weight"]])
    if not targeted:
        raise InputError("no Linear layer matches the recipe's targets after the ignore list: nothing to quantize")
    bad = dtypes - set(QUANTIZABLE_DTYPES)
    if bad or len(dtypes) > 1:
        raise InputError(f"quantized weights must share one float dtype (BF16, F16 or F32), found {sorted(dtypes)}")
    return dtypes.pop()


def check_fused_groups(model, targeted) -> None:
    for parent_name, parent in model.named_modules():
        for siblings in FUSED_SIBLINGS:
            if not all(hasattr(parent, s) for s in siblings):
                continue
            names = [f"{parent_name}.{s}" if parent_name else s for s in siblings]
            quantized = [n for n in names if n in targeted]
            if quantized and len(quantized) != len(names):
                left = [n for n in names if n not in targeted]
                raise InputError(
                    f"the ignore list splits the fused group {', '.join(names)}: {', '.join(left)} ignored but "
                    f"{', '.join(quantized)} quantized; vLLM rejects such a checkpoint, ignore all or none of them"
                )
            schemes = [(targeted[n].weights, targeted[n].input_activations) for n in quantized]
            if any(s != schemes[0] for s in schemes[1:]):
                raise InputError(
                    f"fused group {', '.join(names)} mixes quantization schemes; vLLM runs fused siblings as one "
                    "GEMM and needs one scheme for all of them: give them the same config group"
                )
