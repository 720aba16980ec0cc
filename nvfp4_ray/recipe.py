"""Quantization recipes: llm-compressor's own parser, so users keep the recipes they have.

A recipe (``--recipe FILE.yaml``) or the ``--scheme``/``--ignore``/``--algorithm`` options
become one llm-compressor ``QuantizationModifier`` or ``GPTQModifier``; its resolved compressed-tensors config gives the
config groups (targets and scheme per group), the ignore patterns and the KV-cache
scheme. llm-compressor is imported here, on the driver only: workers receive plain data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nvfp4_ray.errors import InputError

os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")

# The presets whose weights and activations this tool computes (each tested against
# llm-compressor). A recipe's config groups must each equal one of them.
SUPPORTED_SCHEMES = ("NVFP4", "NVFP4A16", "FP8", "FP8_DYNAMIC")


# GPTQ: the schemes whose weights formats/gptq.py solves (tested against llm-compressor)
GPTQ_SCHEMES = ("NVFP4", "NVFP4A16")


@dataclass(frozen=True)
class GptqOptions:
    """A GPTQModifier's arguments, as plain data for the workers."""

    block_size: int
    dampening_frac: float
    ordered: bool  # actorder static (= weight): columns by descending Hessian diagonal

    def key(self) -> dict:
        return {"algorithm": "gptq", "block_size": self.block_size, "dampening_frac": self.dampening_frac,
                "actorder": "static" if self.ordered else None}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    modifier: object  # llmcompressor QuantizationModifier (driver only)
    quantization_config: object  # compressed_tensors QuantizationConfig, resolved
    config_groups: dict  # group name -> compressed_tensors QuantizationScheme
    ignore: list[str]
    yaml_text: str
    notes: tuple[str, ...] = ()  # things the user should know about how the recipe is run
    gptq: GptqOptions | None = None  # a GPTQModifier recipe; None: round-to-nearest

    @property
    def needs_calibration(self) -> bool:
        from nvfp4_ray.formats.linear import needs_calibration

        groups = self.config_groups.values()
        return self.gptq is not None or self.quantization_config.kv_cache_scheme is not None or any(
            needs_calibration(group.input_activations) for group in groups
        )


def load_recipe(
    recipe_path: str | None, scheme: str, ignore: list[str], always_ignore: list[str] = (), algorithm: str = "rtn"
) -> Recipe:
    """The recipe file, or one QuantizationModifier (``algorithm`` gptq: GPTQModifier with
    its defaults) built from --scheme/--ignore.

    ``always_ignore`` (the vision tower of multimodal models) is appended to the modifier's
    ignore list, so recipe.yaml and quantization_config say what was actually done.
    """
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.recipe import Recipe as LLMCRecipe

    if recipe_path is None:
        if scheme.upper() not in SUPPORTED_SCHEMES:
            raise InputError(f"scheme {scheme!r} is not supported (valid: {', '.join(SUPPORTED_SCHEMES)})")
        modifier_class = GPTQModifier if algorithm == "gptq" else QuantizationModifier
        try:
            modifier = modifier_class(targets="Linear", scheme=scheme.upper(), ignore=list(ignore))
        except Exception as exc:  # pydantic validation inside llm-compressor
            raise InputError(f"invalid quantization options: {_first_line(exc)}") from None
        llmc_recipe = LLMCRecipe.create_instance(modifier)
    else:
        llmc_recipe = _parse_recipe_file(recipe_path, LLMCRecipe)
        modifiers = [m for m in llmc_recipe.modifiers]
        names = [type(m).__name__ for m in modifiers]
        if len(modifiers) != 1 or not isinstance(modifiers[0], (QuantizationModifier, GPTQModifier)):
            raise InputError(
                f"recipe {recipe_path}: only a single QuantizationModifier or GPTQModifier is supported, found "
                f"{names or 'none'} (AWQ, SmoothQuant and other modifiers need llm-compressor's oneshot)"
            )
        modifier = modifiers[0]
    missing = [pattern for pattern in always_ignore if pattern not in modifier.ignore]
    if missing:
        modifier.ignore = list(modifier.ignore) + missing
        modifier._resolved_config = None
    try:
        resolved = modifier.resolved_config
    except Exception as exc:
        raise InputError(f"invalid quantization recipe: {_first_line(exc)}") from None
    for name, group in resolved.config_groups.items():
        if scheme_name(group) not in SUPPORTED_SCHEMES:
            raise InputError(
                f"recipe group {name!r} (targets {group.targets}) uses a scheme that is not supported "
                f"(valid: {', '.join(SUPPORTED_SCHEMES)})"
            )
    gptq = _gptq_options(modifier, resolved) if isinstance(modifier, GPTQModifier) else None
    kv = resolved.kv_cache_scheme
    if kv is not None and not _is_fp8_static_tensor(kv):
        raise InputError(
            "kv_cache_scheme must be static per-tensor FP8 (num_bits 8, type float, strategy tensor, "
            "dynamic false, symmetric): the scales vLLM reads as k_scale/v_scale"
        )
    notes = ()
    if kv is not None and kv.observer != "static_minmax":
        notes = (
            f"kv_cache_scheme observer {kv.observer or 'minmax (the default)'}: llm-compressor would average "
            "k/v ranges over its randomly shuffled samples, which it cannot reproduce either; nvfp4-ray uses "
            "the running max (observer: static_minmax), exact and independent of sample order, and "
            "recipe.yaml and config.json say so",
        )
        # what was done, in the recipe and quantization_config written to DEST
        for args in (kv, modifier.kv_cache_scheme):  # the resolved config's and the recipe's
            if args is not None:
                args.observer = "static_minmax"
    return Recipe(
        modifier=modifier,
        quantization_config=resolved,
        config_groups=dict(resolved.config_groups),
        ignore=list(modifier.ignore),
        yaml_text=llmc_recipe.yaml(),
        notes=notes,
        gptq=gptq,
    )


def _gptq_options(modifier, resolved) -> GptqOptions:
    """The GPTQModifier's arguments, refused where nvfp4-ray would not compute what
    llm-compressor computes."""
    from compressed_tensors.quantization import ActivationOrdering

    for name, group in resolved.config_groups.items():
        if scheme_name(group) not in GPTQ_SCHEMES:
            raise InputError(f"GPTQ recipe group {name!r}: GPTQ is implemented for {', '.join(GPTQ_SCHEMES)} only")
    if resolved.kv_cache_scheme is not None:
        raise InputError("GPTQ with a kv_cache_scheme is not implemented; quantize the KV cache with a QuantizationModifier")
    orders = {group.weights.actorder for group in resolved.config_groups.values()}
    if len(orders) != 1 or not orders <= {None, ActivationOrdering.WEIGHT}:  # STATIC is an alias of WEIGHT
        found = ", ".join(sorted(str(getattr(order, "value", order)) for order in orders))
        raise InputError(f"GPTQ actorder {found} is not implemented (valid: static, weight, null)")
    if not isinstance(modifier.block_size, int) or modifier.block_size < 1:
        raise InputError(f"GPTQ block_size must be a positive integer, not {modifier.block_size!r}")
    damp = modifier.dampening_frac
    if not isinstance(damp, (int, float)) or not 0 <= damp < 1:
        raise InputError(f"GPTQ dampening_frac must be a number in [0, 1), not {damp!r}")
    if modifier.batched_quantization not in ("auto", None, 1):
        raise InputError(
            f"GPTQ batched_quantization {modifier.batched_quantization} is not implemented (it changes llm-compressor's "
            "numerics); use auto, 1 or null: nvfp4-ray solves one Linear at a time, as llm-compressor does on CPUs"
        )
    return GptqOptions(modifier.block_size, float(damp), orders == {ActivationOrdering.WEIGHT})


def names_gptq(path: str) -> bool:
    """Whether the recipe file at ``path`` names a GPTQModifier (a recipe holds one modifier,
    by its class name); False if it can't be read (load_recipe says why)."""
    try:
        return "GPTQModifier" in _recipe_text(path)
    except Exception:
        return False


def _recipe_text(path: str) -> str:
    from nvfp4_ray.io.storage import Store

    folder, _, name = path.rpartition("/")
    store = Store(folder or ".")
    if not store.exists(name):
        raise InputError(f"recipe file {path} does not exist")
    return store.read_text(name)


def _parse_recipe_file(path: str, llmc_recipe_class):
    import yaml

    text = _recipe_text(path)
    try:
        if not isinstance(yaml.safe_load(text), dict):
            raise InputError(f"recipe {path} must be a YAML mapping (stage -> modifiers)")
        return llmc_recipe_class.create_instance(text)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"recipe {path} is not a valid llm-compressor recipe: {_first_line(exc)}") from None


def _is_fp8_static_tensor(args) -> bool:
    return (args.num_bits, args.type, args.strategy, args.dynamic, args.symmetric) == (8, "float", "tensor", False, True)


def scheme_name(scheme) -> str | None:
    """The preset a resolved scheme is equal to (ignoring targets/observers), or None."""
    from compressed_tensors.quantization import preset_name_to_scheme

    for name in SUPPORTED_SCHEMES:
        preset = preset_name_to_scheme(name, scheme.targets)
        if _same_args(preset.weights, scheme.weights) and _same_args(preset.input_activations, scheme.input_activations):
            if scheme.output_activations is None:
                return name
    return None


_WEIGHT_OBSERVERS = (None, "minmax", "static_minmax", "memoryless_minmax")  # all become memoryless_minmax
_INPUT_OBSERVERS = ("static_minmax",)  # a running max: exact under a max-reduce over sample shards


def _same_args(preset, given) -> bool:
    if preset is None or given is None:
        return preset is given
    keep = {"num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "block_structure", "scale_dtype"}
    if preset.model_dump(include=keep) != given.model_dump(include=keep):
        return False
    if given.dynamic is True:
        return True
    allowed = _INPUT_OBSERVERS if preset.observer in _INPUT_OBSERVERS else _WEIGHT_OBSERVERS
    return given.observer in allowed


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
