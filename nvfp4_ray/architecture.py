"""What the model looks like: its decoder layers, the Linears to quantize, fused groups.

The model is built on the meta device from config.json (no memory, no weights) and its
module tree is matched against the checkpoint's tensor names with transformers' own key
conversions (e.g. Mistral3 checkpoints say ``language_model.model.layers`` where the
module is ``model.language_model.layers``: model_checks.py, with the other checks made
before any work). The result, :class:`ModelSpec`, is plain data that workers receive;
workers rebuild single decoder layers from the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nvfp4_ray.errors import InputError
from nvfp4_ray.experts import MOE_MODEL_TYPES, check_expert_schemes, linearize
from nvfp4_ray.formats import fp8_block
from nvfp4_ray.io.tensors import torch_dtype
from nvfp4_ray.model_checks import FUSED_SIBLINGS, check_fused_groups, check_shapes, check_targets, checkpoint_to_model_names

# Model families whose decoder layers we run and whose outputs are tested against
# llm-compressor. The value is the text model types allowed inside a composite model.
SUPPORTED_MODEL_TYPES = {
    "llama": None, "mistral": None, "qwen2": None, "qwen3": None, "ministral": None, "ministral3": None,
    "mistral3": ("ministral3", "mistral", "ministral"),
    **dict.fromkeys(MOE_MODEL_TYPES),
}  # fmt: skip
# Model types transformers does not know, naming another family's layers: Kimi-K2's
# config.json says kimi_k2 (for its remote code) over DeepSeek-V3's architecture.
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
# Never quantized, as vLLM loads them unquantized: the vision parts of multimodal models, and
# Qwen2-MoE's shared_expert_gate (a Linear of one output, which vLLM builds without a
# quantization method; llm-compressor would quantize it unless told not to).
ALWAYS_IGNORED = {
    "mistral3": ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
    "qwen2_moe": ["re:.*shared_expert_gate$"],
}
# llm-compressor 0.14 traces the model with `mask_function` on its tracing_ignore list; the
# backbones of these text model types build their causal mask through a local variable of
# that name, so the reference calibrates them with attention_mask=None: bidirectional
# attention. --exact reproduces that to stay byte-identical; the default mode does not.
REFERENCE_DROPS_CAUSAL_MASK = ("mistral", "ministral3", "mixtral", "qwen3_moe")


@dataclass(frozen=True)
class LinearSpec:
    module: str  # module name in the model, e.g. model.layers.3.mlp.up_proj
    checkpoint: str  # tensor-name prefix in the checkpoint (the source's naming)
    local: str  # name inside its decoder layer, e.g. mlp.up_proj
    in_features: int
    out_features: int
    scheme: object  # compressed_tensors QuantizationScheme, format set

    @property
    def calibrated(self) -> bool:
        """Whether the input activations need calibration statistics."""
        from nvfp4_ray.formats.linear import needs_calibration

        return needs_calibration(self.scheme.input_activations)


@dataclass(frozen=True)
class AttentionSpec:
    """An attention module whose KV cache gets static scales (k_scale, v_scale)."""

    local: str  # e.g. self_attn
    checkpoint: str  # tensor-name prefix in the checkpoint


@dataclass(frozen=True)
class LayerSpec:
    index: int
    module: str  # e.g. model.layers.3
    tensors: dict[str, str]  # checkpoint tensor name -> parameter name inside the layer
    groups: list[list[LinearSpec]]  # quantized Linears; fused siblings share a list
    attention: list[AttentionSpec] = field(default_factory=list)
    fp8_scales: list[str] = field(default_factory=list)  # block scales of its FP8 weights: read, not parameters

    @property
    def linears(self) -> list[LinearSpec]:
        return [linear for group in self.groups for linear in group]

    @property
    def recorded(self) -> list[str]:
        """Linears (names inside the layer) whose input amax calibration records."""
        return [linear.local for linear in self.linears if linear.calibrated]


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    architecture: str
    dtype: str  # safetensors dtype of the quantized weights (and of the activations)
    backbone: str  # module name of the text decoder (owner of embed_tokens and layers)
    embed_tensor: str  # checkpoint name of the input embedding
    layers: list[LayerSpec]
    other_tensors: list[str]  # everything outside the decoder layers, copied byte for byte
    ignored_linears: list[str] = field(default_factory=list)  # checkpoint names, for quantization_config
    dropped_tensors: list[str] = field(default_factory=list)  # in SOURCE, but not loaded by transformers: not written
    kv_args: object = None  # compressed_tensors QuantizationArgs of the KV cache, if quantized

    @property
    def needs_calibration(self) -> bool:
        return self.kv_args is not None or any(layer.recorded for layer in self.layers)


def build_meta_model(config: dict, attn_implementation: str = "eager", dtype: torch.dtype = torch.bfloat16):
    """The full model on the meta device (no memory), from a config dict."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    hf_config = CONFIG_MAPPING[family(config["model_type"])].from_dict(config)
    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM._model_mapping[type(hf_config)]
    with torch.device("meta"):
        model = model_class._from_config(hf_config, attn_implementation=attn_implementation, dtype=dtype)
    if text_model_type(config) in MOE_MODEL_TYPES:  # one Linear per expert, as the checkpoint stores them
        linearize(model, text_model_type(config))
    model.eval()
    return model


def family(model_type: str | None) -> str | None:
    """The model type whose layers ``model_type`` has (an alias resolved)."""
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


def text_model_type(config: dict) -> str:
    """The family of the decoder layers (an alias resolved)."""
    return family((config.get("text_config") or config).get("model_type"))


def find_backbone(model) -> tuple[str, torch.nn.Module]:
    """The text decoder: the submodule owning both ``embed_tokens`` and a ``layers`` list."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList) and hasattr(module, "embed_tokens"):
            return name, module
    raise InputError(f"{type(model).__name__} has no decoder layers this tool can run")


def describe_model(config: dict, checkpoint_tensors: dict, recipe) -> tuple[ModelSpec, torch.nn.Module]:
    """Check the checkpoint against config.json and the recipe; return the layer plan and
    the meta-device model with the recipe's schemes attached (for config.json)."""
    model_type = config.get("model_type")
    _check_supported(config)
    try:
        model = build_meta_model(config)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"config.json cannot be turned into a {model_type} model: {exc}") from None
    backbone_name, backbone = find_backbone(model)
    # An FP8 SOURCE's block scales go with their weights, which every layer sees dequantized
    # to bf16, as the reference loads them (formats/fp8_block.py)
    scales = fp8_block.scales_of(config.get("quantization_config"), checkpoint_tensors)
    tensors_of_model = {name: tensor for name, tensor in checkpoint_tensors.items() if name not in scales}
    to_model = checkpoint_to_model_names(model, tensors_of_model)
    to_checkpoint = {m: c for c, m in to_model.items()}
    check_shapes(model, tensors_of_model, to_model)
    fp8_weights = set(scales.values())
    dtypes_seen = {name: "BF16" if name in fp8_weights else t.entry.dtype for name, t in tensors_of_model.items()}

    targeted, attention_kv = _attach_schemes(model, recipe)
    layer_prefixes = [f"{backbone_name}.layers.{i}." for i in range(len(backbone.layers))]
    dtype = check_targets(model, targeted, layer_prefixes, dtypes_seen, to_checkpoint)
    if dtype != "BF16":  # config.json records the dtype the reference loads the model in
        model = build_meta_model(config, dtype=torch_dtype(dtype))
        targeted, attention_kv = _attach_schemes(model, recipe)
    check_fused_groups(model, targeted)
    check_expert_schemes(model, targeted)

    modules = dict(model.named_modules())
    layers = []
    layer_of_tensor: dict[str, int] = {}
    for index, prefix in enumerate(layer_prefixes):
        tensors = {c: m[len(prefix) :] for c, m in to_model.items() if m.startswith(prefix)}
        layer_of_tensor.update({c: index for c in tensors})
        linears = {}
        for name in sorted(n for n in targeted if n.startswith(prefix)):
            module = modules[name]
            linears[name] = LinearSpec(
                module=name,
                checkpoint=to_checkpoint[f"{name}.weight"].removesuffix(".weight"),
                local=name[len(prefix) :],
                in_features=module.in_features,
                out_features=module.out_features,
                scheme=targeted[name],
            )
        attention = [
            AttentionSpec(local=name[len(prefix) :], checkpoint=_checkpoint_prefix(modules[name], name, to_checkpoint))
            for name in sorted(attention_kv)
            if name.startswith(prefix)
        ]
        fp8_scales = sorted(scale for scale, weight in scales.items() if weight in tensors)
        layers.append(LayerSpec(index, prefix[:-1], tensors, _fuse(linears), attention, fp8_scales))
    outside = [weight for weight in scales.values() if weight in to_model and weight not in layer_of_tensor]
    if outside:
        raise InputError(f"FP8 weight {outside[0]!r} is outside the decoder layers; only their Linears are read as FP8")
    other = sorted(c for c in tensors_of_model if c not in layer_of_tensor and c in to_model)
    ignored = [
        to_checkpoint.get(f"{name}.weight", f"{name}.weight").removesuffix(".weight")
        for name, module in model.named_modules()
        if _counts_as_linear(module) and name not in targeted
    ]
    embed_name = next(n for n, p in backbone.named_parameters() if n.startswith("embed_tokens."))
    spec = ModelSpec(
        model_type=model_type,
        architecture=type(model).__name__,
        dtype=dtype,
        backbone=backbone_name,
        embed_tensor=to_checkpoint[f"{backbone_name}.{embed_name}"],
        layers=layers,
        other_tensors=other,
        ignored_linears=ignored,
        dropped_tensors=sorted(c for c in tensors_of_model if c not in to_model),
        kv_args=next(iter(attention_kv.values()), None),
    )
    return spec, model


def _attach_schemes(model, recipe) -> tuple[dict, dict]:
    """Attach the recipe with compressed-tensors itself, so target precedence, the ignore
    list and each module's compression format are exactly the reference's."""
    from compressed_tensors.compressors.format import infer_model_format
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    apply_quantization_config(model, recipe.quantization_config, show_progress=False)
    infer_model_format(model)
    targeted, attention_kv = {}, {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        if is_cached_attention_module(module):
            attention_kv[name] = scheme.input_activations
        elif scheme.weights is not None:
            targeted[name] = scheme
    return targeted, attention_kv


def _checkpoint_prefix(module, name: str, to_checkpoint: dict) -> str:
    """A module's prefix in the checkpoint, from one of its parameters that is stored there
    (the quantization parameters compressed-tensors attached are not)."""
    parameter = next(n for n, _ in module.named_parameters() if f"{name}.{n}" in to_checkpoint)
    return to_checkpoint[f"{name}.{parameter}"].removesuffix(f".{parameter}")


def _counts_as_linear(module: torch.nn.Module) -> bool:
    """What compressed-tensors lists in ``ignore`` when left unquantized: Linears, and MoE
    routers (vLLM loads them as Linear layers), whatever their class."""
    from compressed_tensors.quantization.quant_config import get_vllm_module_type

    return isinstance(module, torch.nn.Linear) or get_vllm_module_type(type(module).__name__) == "Linear"


def _check_supported(config: dict) -> None:
    model_type = family(config.get("model_type"))
    valid = ", ".join(sorted([*SUPPORTED_MODEL_TYPES, *MODEL_TYPE_ALIASES]))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model type {model_type!r} is not supported: no decoder layers this tool can run (valid: {valid})")
    inner = SUPPORTED_MODEL_TYPES[model_type]
    if inner is not None:
        text_type = (config.get("text_config") or {}).get("model_type")
        if text_type not in inner:
            raise InputError(f"{model_type} with text model {text_type!r} is not supported (valid: {', '.join(inner)})")


def _fuse(linears: dict[str, LinearSpec]) -> list[list[LinearSpec]]:
    """Group a layer's quantized Linears: fused siblings together, the rest alone."""
    groups, used = [], set()
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf in siblings:
                members = [f"{parent}.{s}" for s in siblings]
                if all(m in linears for m in members) and name not in used:
                    groups.append([linears[m] for m in members])
                    used.update(members)
    for name, linear in linears.items():
        if name not in used:
            groups.append([linear])
    return sorted(groups, key=lambda g: g[0].local)
