"""Mixture-of-Experts layers as llm-compressor 0.14 calibrates them: one Linear per expert.

transformers 5 holds a layer's routed experts as two fused 3D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]); checkpoints store one tensor per expert and
projection, and vLLM loads them by those names. So the meta model's experts modules are
replaced, before anything else looks at the model, by :class:`LinearExperts`: one
:class:`ExpertMLP` per expert holding its projections as ``nn.Linear`` under the
checkpoint's own names (``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w3``/
``w2``). compressed-tensors then attaches one scheme per expert Linear, each expert's
gate/up are fused siblings (one weight global scale), and checkpoint tensors map to
parameters by name, as for dense layers.

The forward computes what llm-compressor's ``LinearExperts2D`` computes under
``moe_calibrate_all_experts`` (its default): every expert runs on every token, so its
input statistics see all of them, while the output adds only the routed tokens' rows,
times their routing weights, in expert order: the same products and sums, so the same bits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from nvfp4_ray.errors import InputError


@dataclass(frozen=True)
class MoeFamily:
    projections: tuple[str, str, str]  # the checkpoint's names of an expert's gate, up and down
    experts_class: str  # transformers' fused experts class, in its modeling_<model_type> module


# Model types whose routed experts are linearized here (each tested against llm-compressor)
_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
MOE_MODEL_TYPES = {
    "qwen2_moe": MoeFamily(_GATE_UP_DOWN, "Qwen2MoeExperts"),
    "qwen3_moe": MoeFamily(_GATE_UP_DOWN, "Qwen3MoeExperts"),
    "glm4_moe": MoeFamily(_GATE_UP_DOWN, "Glm4MoeExperts"),
    "deepseek_v3": MoeFamily(_GATE_UP_DOWN, "DeepseekV3Experts"),
    "mixtral": MoeFamily(("w1", "w3", "w2"), "MixtralExperts"),
}


class ExpertMLP(torch.nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, with gate and up concatenated and split
    again as llm-compressor's ExpertMLPWithGate does (copies: the same bits)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act_fn, dtype: torch.dtype):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, torch.nn.Linear(hidden, intermediate, bias=False, dtype=dtype))
        self.add_module(up, torch.nn.Linear(hidden, intermediate, bias=False, dtype=dtype))
        self.add_module(down, torch.nn.Linear(intermediate, hidden, bias=False, dtype=dtype))
        self._act_fn = [act_fn]  # not a submodule: no state, and kept out of named_modules

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        gate_up = torch.cat([gate(hidden_states), up(hidden_states)], dim=-1)
        gate_out, up_out = gate_up.chunk(2, dim=-1)
        return down(self._act_fn[0](gate_out) * up_out)


class LinearExperts(torch.nn.ModuleList):
    """A layer's routed experts, one ExpertMLP each; called as the fused module it replaces:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``."""

    def __init__(self, experts: list[ExpertMLP], every_token: bool = True):
        """``every_token``: run each expert on every token (calibration); otherwise on its
        routed tokens only (inference: the same output, a fraction of the work)."""
        super().__init__(experts)
        self.num_experts = len(experts)
        self.every_token = every_token

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        if not self.every_token:
            return self._routed(final, hidden_states, top_k_index, top_k_weights)
        routing = self.routing(top_k_index, top_k_weights)
        self.add_experts(final, hidden_states, routing, range(self.num_experts))
        return final

    def routing(self, top_k_index, top_k_weights) -> torch.Tensor:
        """Each token's routing weight for every expert [T, E], 0 where it is not routed: the
        rows llm-compressor selects and adds with index_add_ get the same products and sums
        (an added 0 changes nothing), with no data-dependent shapes, so that a layer of 128
        experts replays as one CUDA graph instead of ~1500 kernel launches a sample."""
        routing = torch.zeros((top_k_index.shape[0], self.num_experts), dtype=top_k_weights.dtype, device=top_k_weights.device)
        return routing.scatter_(1, top_k_index, top_k_weights)

    def add_experts(self, final: torch.Tensor, hidden_states: torch.Tensor, routing: torch.Tensor, indices: range) -> None:
        """Add the routed output of experts ``indices`` to ``final``, in expert order; each
        runs on every token. Expert groups (calibration/expert_groups.py) call this a
        group at a time on the same ``final``: the same sums in the same order."""
        for index in indices:
            output = self[index](hidden_states)  # every token through every expert
            final += (output * routing[:, index, None]).to(final.dtype)

    def _routed(self, final, hidden_states, top_k_index, top_k_weights):
        """Each expert on its routed tokens only (transformers' eager experts)."""
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, self.num_experts).permute(2, 1, 0)
        for index in range(self.num_experts):
            top_k_pos, token_indices = torch.where(expert_mask[index])
            output = self[index](hidden_states[token_indices])
            final.index_add_(0, token_indices, (output * top_k_weights[token_indices, top_k_pos, None]).to(final.dtype))
        return final


def linearize(model: torch.nn.Module, model_type: str) -> None:
    """Replace every fused experts module of ``model`` (on any device, usually meta) by
    LinearExperts with empty weights."""
    names = MOE_MODEL_TYPES[model_type].projections
    fused = [(name, module) for name, module in model.named_modules() if _is_fused_experts(module)]
    for name, module in fused:
        if (module.has_gate, module.has_bias, module.is_transposed, module.is_concatenated) != (True, False, False, True):
            raise InputError(f"{name}: an experts layout this tool does not implement ({type(module).__name__})")
        count, double_intermediate, hidden = module.gate_up_proj.shape
        device, dtype = module.gate_up_proj.device, module.gate_up_proj.dtype
        with torch.device(device):
            experts = [ExpertMLP(names, hidden, double_intermediate // 2, module.act_fn, dtype) for _ in range(count)]
        model.set_submodule(name, LinearExperts(experts))


def _is_fused_experts(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter) and isinstance(
        getattr(module, "down_proj", None), torch.nn.Parameter
    )


def experts_modules(model: torch.nn.Module) -> dict[str, LinearExperts]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LinearExperts)}


def check_expert_schemes(model: torch.nn.Module, targeted: dict) -> None:
    """vLLM runs a layer's experts as one fused MoE kernel with one scheme: every expert
    Linear of a layer is quantized with the same scheme, or none of them is."""
    for name, experts in experts_modules(model).items():
        schemes = {}
        for index, expert in enumerate(experts):
            for projection in expert.names:
                scheme = targeted.get(f"{name}.{index}.{projection}")
                schemes[f"{index}.{projection}"] = None if scheme is None else (scheme.weights, scheme.input_activations)
        first = next(iter(schemes.values()))
        if any(value != first for value in schemes.values()):
            ignored = [key for key, value in schemes.items() if value is None]
            detail = f"{len(ignored)} of {len(schemes)} expert Linears ignored" if ignored else "different schemes"
            raise InputError(
                f"the experts of {name.rsplit('.', 1)[0]} are not all quantized alike ({detail}); vLLM runs a "
                "layer's experts as one kernel with one scheme: quantize all of them the same way, or ignore all"
            )


def fuses_experts(conversion) -> bool:
    """Whether a transformers weight conversion fuses per-expert tensors into the 3D
    parameters that linearized experts do not have."""
    from transformers.core_model_loading import WeightConverter

    return isinstance(conversion, WeightConverter) and any(".experts." in t for t in conversion.target_patterns)


@contextlib.contextmanager
def loading_linearized(model_type: str):
    """Inside: transformers' ``from_pretrained`` builds ``model_type``'s experts as
    LinearExperts and loads the checkpoint's per-expert tensors straight into them (its
    converters that fuse them into 3D parameters are left out); that is how an NVFP4 MoE
    checkpoint, one quantized Linear per expert, loads through compressed-tensors."""
    import importlib

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    if model_type not in MOE_MODEL_TYPES:
        yield
        return
    original = get_checkpoint_conversion_mapping(model_type) or []
    kept = [c for c in original if not fuses_experts(c)]
    # The class is swapped in its own modeling module only: transformers' patch mapping
    # walks every transformers module, importing all model families (some need torchvision).
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    class_name = MOE_MODEL_TYPES[model_type].experts_class
    fused_class = getattr(modeling, class_name)
    setattr(modeling, class_name, _config_built(model_type))
    register_checkpoint_conversion_mapping(model_type, kept, overwrite=True)
    try:
        yield
    finally:
        setattr(modeling, class_name, fused_class)
        register_checkpoint_conversion_mapping(model_type, original, overwrite=True)


def _config_built(model_type: str) -> type:
    """LinearExperts constructed as the fused class it stands for: ``cls(config)``."""
    names = MOE_MODEL_TYPES[model_type].projections

    class ConfigBuiltExperts(LinearExperts):
        def __init__(self, config):
            from transformers.activations import ACT2FN

            count = next(getattr(config, a) for a in ("num_local_experts", "num_experts", "n_routed_experts") if hasattr(config, a))
            size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
            dtype = torch.get_default_dtype()
            act_fn = ACT2FN[config.hidden_act]
            experts = [ExpertMLP(names, config.hidden_size, size, act_fn, dtype) for _ in range(count)]
            super().__init__(experts, every_token=False)
            # the family's _init_weights would look for the fused parameters: its experts'
            # Linears (initialized as Linears, then loaded) are all there is
            self._is_hf_initialized = True

    return ConfigBuiltExperts
