"""Plan the job from headers alone, validating everything before any work starts.

The plan splits the output into units, each one safetensors file named after a content
key: a hash of exactly what its bytes depend on. A unit whose file (and completion
record) already exists at DEST is done, whichever run produced it; that single rule
gives resume after a crash, idempotent re-runs, and partial recomputation when only
some source shards change.

  layer unit  decoder layer i: its quantized Linears and its other tensors
  copy unit   tensors outside the decoder layers (embeddings, norm, lm_head, vision
              tower, projector), copied byte for byte
  scales unit every input_global_scale (depends on the calibration, nothing else)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import compressed_tensors
import torch
import transformers

from nvfp4_ray.architecture import (
    ALWAYS_IGNORED,
    REFERENCE_DROPS_CAUSAL_MASK,
    LayerSpec,
    ModelSpec,
    describe_model,
    text_model_type,
)
from nvfp4_ray.calibration.data import read_samples, samples_hash
from nvfp4_ray.calibration.rotary import layer_config, rotary_tables
from nvfp4_ray.config import QuantizeConfig
from nvfp4_ray.errors import InputError
from nvfp4_ray.io.checkpoint import SourceCheckpoint, SourceTensor, open_checkpoint, with_config_overrides
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.storage_errors import as_input_errors
from nvfp4_ray.io import destination
from nvfp4_ray.recipe import Recipe, load_recipe

# Bump when the bytes a unit produces could change for the same inputs.
FORMAT_VERSION = "1"
COPY_UNIT_BYTES = 2 << 30  # tensors outside the layers go into files of about this size
# config.json fields that cannot change what the decoder layers compute.
_METADATA_KEYS = {
    "_name_or_path", "transformers_version", "architectures", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torch_dtype", "dtype",
}  # fmt: skip


@dataclass(frozen=True)
class LayerUnit:
    spec: LayerSpec
    tensors: list[SourceTensor]
    key: str
    file: str

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CopyUnit:
    index: int
    tensors: list[SourceTensor]
    key: str
    file: str


@dataclass
class Plan:
    config: QuantizeConfig
    source: SourceCheckpoint
    recipe: Recipe
    spec: ModelSpec
    layer_units: list[LayerUnit]
    copy_units: list[CopyUnit]
    samples: list[list[int]] | None
    calibration_base: dict  # what every layer's calibration depends on, before device facts
    config_json: bytes
    fingerprint: dict
    previous: dict | None = None  # manifest of the checkpoint committed at DEST, if any

    @property
    def needs_calibration(self) -> bool:
        return self.samples is not None

    @property
    def reference_drops_causal_mask(self) -> bool:
        return reference_drops_causal_mask(self.config, self.source.config)

    def record_sets(self) -> list[list[str]]:
        """Per layer: what calibration records (Linear inputs, and k/v of KV-cache scales)."""
        return [unit.spec.recorded + [f"{a.local}.{kv}" for a in unit.spec.attention for kv in "kv"] for unit in self.layer_units]


def digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tensor_identity(source: SourceCheckpoint, tensor: SourceTensor) -> list:
    entry = tensor.entry
    return [entry.name, source.files[tensor.file].identity, entry.start, entry.end, entry.dtype, list(entry.shape)]


@dataclass
class Inputs:
    """Everything the output depends on, read and checked; enough to decide "unchanged"."""

    source: SourceCheckpoint
    recipe: Recipe
    spec: ModelSpec
    quantized_model: object  # meta-device model with the recipe's schemes (for config.json)
    samples: list[list[int]] | None
    fingerprint: dict
    previous: dict | None  # manifest of the checkpoint committed at DEST, if any
    notes: list[str]  # warnings for the log: options applied in a way the user may not expect

    @property
    def unchanged(self) -> bool:
        return self.previous is not None and self.previous.get("fingerprint") == self.fingerprint


@as_input_errors()  # unreachable store, wrong credentials, missing bucket: found before any work
def read_inputs(config: QuantizeConfig) -> Inputs:
    source, notes = with_config_overrides(open_checkpoint(config.source), config.config_override or [])
    _check_preprocessor_option(config, source)
    model_type = source.config.get("model_type")
    recipe = load_recipe(
        config.recipe, config.scheme, config.ignore_patterns, ALWAYS_IGNORED.get(model_type, []), config.algorithm
    )
    if recipe.gptq is not None and config.batch_tokens is not None:
        raise InputError("GPTQ computes one sample per forward, as llm-compressor does; drop --batch-tokens")
    spec, quantized_model = describe_model(source.config, source.tensors, recipe)
    dest = Store(config.dest)
    previous = destination.check_dest(dest, config.overwrite)
    samples = None
    if recipe.needs_calibration:
        if config.calibration is None:
            raise InputError("--calibration is required: this recipe has GPTQ, static activation or KV-cache scales, which need calibration data")
        text_config = source.config.get("text_config") or source.config
        samples = read_samples(
            config.calibration, config.num_samples, config.max_seq_len, int(text_config["vocab_size"]), source
        )
    fingerprint = {
        "format": _scheme_tag(),
        "source": {name: info.identity for name, info in sorted(source.files.items())},
        "config_sha256": hashlib.sha256(source.config_bytes).hexdigest(),
        "config_overrides": list(config.config_override or []),
        "write_preprocessor_config": config.write_preprocessor_config,
        "copied_files": {name: info.identity for name, info in sorted(source.copied_files.items())},
        "recipe_sha256": hashlib.sha256(recipe.yaml_text.encode()).hexdigest(),
        "calibration": samples_hash(samples) if samples is not None else None,
        "calibration_options": _calibration_options(config, source),
        # GPTQ: its Hessians are summed in one block with --exact, in fixed blocks otherwise,
        # and its passes' attention follows (a checkpoint of eager passes is another one)
        **({"gptq": {**recipe.gptq.key(), "exact": config.exact, "attention": attention_of(config, True)}}
           if recipe.gptq else {}),
        # calibration numerics follow torch and transformers: an upgrade is a change
        "software": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if spec.dropped_tensors:
        notes = [*notes, f"{len(spec.dropped_tensors)} tensors of SOURCE that transformers does not load (such as "
                 f"{spec.dropped_tensors[0]}: a multi-token-prediction layer) are left out of DEST, as llm-compressor leaves them out"]  # fmt: skip
    inputs = Inputs(source, recipe, spec, quantized_model, samples, fingerprint, previous, [*notes, *recipe.notes])
    if previous is not None and not inputs.unchanged and not (config.overwrite or config.if_changed):
        raise InputError(
            f"DEST {dest.display()} already holds a checkpoint made from other inputs; "
            "pass --overwrite (or --if-changed) to replace it"
        )
    return inputs


def _check_preprocessor_option(config: QuantizeConfig, source: SourceCheckpoint) -> None:
    if config.write_preprocessor_config and "preprocessor_config.json" not in source.copied_files:
        if "processor_config.json" not in source.copied_files:
            raise InputError("--write-preprocessor-config needs a processor_config.json in SOURCE; it has none")
        block = json.loads(source.store.read_bytes("processor_config.json")).get("image_processor")
        if not isinstance(block, dict):
            raise InputError("--write-preprocessor-config: processor_config.json has no 'image_processor' object")


def _scheme_tag() -> dict:
    return {"format": FORMAT_VERSION, "compressed_tensors": compressed_tensors.__version__}


def reference_drops_causal_mask(config: QuantizeConfig, model_config: dict) -> bool:
    return config.exact and text_model_type(model_config) in REFERENCE_DROPS_CAUSAL_MASK


def attention_of(config: QuantizeConfig, gptq: bool) -> str:
    """Calibration's attention: eager, as the reference computes it, except where the bytes
    are nvfp4-ray's own anyway: padded batches (--batch-tokens), and GPTQ's default mode,
    whose Hessians are summed in other roundings than llm-compressor's. There PyTorch's
    fused SDPA kernel spares each forward the heads x T x T scores that eager attention
    writes and reads again (in bf16, then in fp32 for the softmax): docs/gptq.md#speed.
    GPTQ's fingerprint holds it; round-to-nearest's batch_tokens determine it."""
    return "sdpa" if config.batch_tokens is not None or (gptq and not config.exact) else "eager"


def _calibration_options(config: QuantizeConfig, source: SourceCheckpoint) -> dict:
    return {
        "drops_causal_mask": reference_drops_causal_mask(config, source.config),
        "batch_tokens": config.batch_tokens,
    }


@as_input_errors()
def build_plan(config: QuantizeConfig, inputs: Inputs) -> Plan:
    source, recipe, samples, spec = inputs.source, inputs.recipe, inputs.samples, inputs.spec

    from nvfp4_ray.checkpoint_metadata import output_config_json

    config_json = output_config_json(source.config_bytes, inputs.quantized_model, spec)
    scheme_tag = _scheme_tag()
    width = max(3, len(str(len(spec.layers) - 1)))
    layer_units = []
    for layer in spec.layers:
        tensors = [source.tensors[name] for name in sorted([*layer.tensors, *layer.fp8_scales])]
        key = digest(
            {
                **scheme_tag,
                "kind": "layer",
                "tensors": [tensor_identity(source, t) for t in tensors],
                "groups": [[(linear.checkpoint, linear.scheme.model_dump_json()) for linear in group] for group in layer.groups],
                **({"gptq": inputs.fingerprint["gptq"]} if recipe.gptq else {}),
            }
        )
        layer_units.append(LayerUnit(layer, tensors, key, f"model-layer-{layer.index:0{width}d}-{key}.safetensors"))
    copy_units = _copy_units(source, spec, scheme_tag)

    calibration_base = {}
    if samples is not None:
        forward_config = {k: v for k, v in source.config.items() if k not in _METADATA_KEYS}
        tables = rotary_tables(inputs.quantized_model, max(len(sample) for sample in samples))
        calibration_base = {
            **scheme_tag,
            **_calibration_options(config, source),
            "samples": inputs.fingerprint["calibration"],
            "embed": tensor_identity(source, source.tensors[spec.embed_tensor]),
            "config": digest(layer_config(forward_config, text_model_type(source.config), tables is not None)),
            "rotary": tables,
            **({"gptq": inputs.fingerprint["gptq"]} if recipe.gptq else {}),  # later layers see solved weights
        }
    destination.probe_writable(Store(config.dest))
    return Plan(
        config, source, recipe, spec, layer_units, copy_units, samples, calibration_base, config_json,
        inputs.fingerprint, inputs.previous,
    )  # fmt: skip


def _copy_units(source: SourceCheckpoint, spec: ModelSpec, scheme_tag: dict) -> list[CopyUnit]:
    units, current, size = [], [], 0
    for name in spec.other_tensors:
        tensor = source.tensors[name]
        if current and size + tensor.entry.nbytes > COPY_UNIT_BYTES:
            units.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.entry.nbytes
    if current:
        units.append(current)
    result = []
    for index, tensors in enumerate(units):
        key = digest({**scheme_tag, "kind": "copy", "tensors": [tensor_identity(source, t) for t in tensors]})
        result.append(CopyUnit(index, tensors, key, f"model-other-{index:02d}-{key}.safetensors"))
    return result


def calibration_keys(plan: Plan, device_signature: str) -> list[str]:
    """One key per layer: what its recorded amax depends on (this layer and all before it)."""
    keys, previous = [], digest({**plan.calibration_base, "device": device_signature})
    for unit, record in zip(plan.layer_units, plan.record_sets()):
        previous = digest([previous, [tensor_identity(plan.source, t) for t in unit.tensors], record])
        keys.append(previous)
    return keys


def snapshot_layers(layers: int, count: int) -> list[int]:
    """The layers whose hidden states stay at DEST after the commit: ``count`` of them,
    evenly spaced, never the last one. A re-run after a change at layer c calibrates from
    the last one before c; each costs samples x seq_len x hidden x 2 bytes at DEST."""
    count = min(count, layers - 1)
    return sorted({layers * (i + 1) // (count + 1) - 1 for i in range(count)}) if count > 0 else []
