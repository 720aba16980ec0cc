"""The one job configuration, shared by the CLI, job YAML files and the Ray workers.

``nvfp4-ray quantize`` flags and a ``--config FILE.yaml`` fill the same model; values on
the command line override the file. Validation here is about the shape of the options;
everything that needs to look at SOURCE or the calibration data happens in the planner.
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.storage import is_remote

DEFAULT_IGNORE = ["lm_head"]


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Hugging Face checkpoint directory or URL (s3://...)")
    dest: str = Field(description="output directory or URL")
    calibration: str | None = Field(None, description="Parquet file with an input_ids or text column")
    num_samples: int = Field(256, ge=1, description="calibration rows used (the first N)")
    max_seq_len: int = Field(1024, ge=1, description="tokens kept per calibration row")
    ignore: list[str] | None = Field(
        None, description="module names or re: patterns left unquantized", json_schema_extra={"metavar": "PATTERN"}
    )
    scheme: str = Field("NVFP4", description="quantization scheme preset when no recipe is given")
    recipe: str | None = Field(None, description="llm-compressor recipe YAML (QuantizationModifier or GPTQModifier)")
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn", description="weights by round-to-nearest, or by GPTQ (llm-compressor's GPTQModifier with its defaults) "
        "when no recipe is given",
    )
    config_override: list[str] | None = Field(
        None,
        description="KEY=VALUE edits of the source's config.json (dotted keys, JSON values), e.g. a fixed rope parameter",
        json_schema_extra={"metavar": "KEY=VALUE"},
    )
    write_preprocessor_config: bool = Field(
        False, description="derive preprocessor_config.json from processor_config.json when SOURCE lacks it (vLLM, Mistral3)"
    )
    exact: bool = Field(
        False, description="also reproduce llm-compressor 0.14's quirks (no causal mask for Mistral-family models)"
    )
    overwrite: bool = Field(False, description="replace a checkpoint of another source already at DEST")
    if_changed: bool = Field(
        False, description="exit 0 'unchanged' if DEST holds a checkpoint of the same inputs; else replace it"
    )
    retention: int = Field(1, ge=0, description="earlier committed versions kept at DEST for rollback")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: start a local one")
    log_format: Literal["text", "json"] = "text"
    num_workers: int | None = Field(None, ge=1, description="calibration actors (default: one per GPU)")
    worker_device: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="auto: GPUs if the cluster has any now; gpu: wait for the autoscaler to add GPU nodes"
    )
    placement_timeout_minutes: float = Field(15.0, gt=0, description="how long to wait for workers to be placed")
    batch_tokens: int | None = Field(
        None, ge=1, description="pack samples into padded SDPA batches of this many tokens (input scales drift a little)"
    )
    no_cuda_graphs: bool = Field(
        False, description="on GPUs, launch each layer's kernels one by one instead of replaying the forward as CUDA "
        "graphs (every graph is checked bit for bit against an eager forward first)",
    )
    prefetch_gib: float | None = Field(
        None, gt=0, description="object-store SOURCE: read layers into Ray's object store while less than this (GiB "
        "per node) waits there, at least one; local SOURCE: layers whose loads may wait at the workers (default: 4 "
        "for an object store, 1 for a local SOURCE)",
    )
    readahead_gib: float = Field(
        8.0, ge=0, description="local SOURCE: have the kernel read this many GiB of layers past those loaded into "
        "its page cache, which the workers read them from; no process holds it and the kernel may reclaim it (0: off)",
    )
    device_memory_gib: float | None = Field(
        None, gt=0, description="device memory a worker may fill with layers, hidden states and its write queue; "
        "layers loaded ahead and queued writes shrink to fit (default: 90%% of the GPU's memory; CPU: no limit)",
    )
    hidden_snapshots: int = Field(
        3, ge=0, description="layers whose hidden states stay at DEST, evenly spaced, so that a re-run after a change "
        "at layer c calibrates only from the last one before c (each: samples x seq_len x hidden x 2 bytes)",
    )
    checkpoint_minutes: float = Field(
        5.0, ge=0, description="persist calibration state this often so a crash resumes mid-model (0: every layer)"
    )
    evaluate: bool = Field(
        False, description="measure quality against SOURCE before committing (nvfp4-ray evaluate); kept in the manifest"
    )

    @field_validator("config_override")
    @classmethod
    def _override_syntax(cls, overrides: list[str] | None) -> list[str] | None:
        for override in overrides or []:
            key, sep, _ = override.partition("=")
            if not sep or not key or any(not part for part in key.split(".")):
                raise ValueError(f"config override {override!r} must look like KEY=VALUE (KEY dotted, e.g. text_config.rope_theta)")
        return overrides

    @field_validator("ignore")
    @classmethod
    def _ignore_patterns(cls, patterns: list[str] | None) -> list[str] | None:
        import re

        for pattern in patterns or []:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"ignore pattern {pattern!r} is not a valid regex: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _recipe_or_scheme(self):
        if self.exact and self.batch_tokens is not None:
            raise ValueError("--exact computes one sample per forward like llm-compressor; drop --batch-tokens")
        if self.recipe is not None and "scheme" in self.model_fields_set:
            raise ValueError("give either --recipe or --scheme, not both (the recipe names its scheme)")
        if self.recipe is not None and "algorithm" in self.model_fields_set:
            raise ValueError("give either --recipe or --algorithm, not both (a GPTQ recipe holds a GPTQModifier)")
        if self.recipe is not None and self.ignore is not None:
            raise ValueError("give ignore patterns inside the recipe, not with --ignore, when --recipe is used")
        if self.evaluate and (is_remote(self.source) or is_remote(self.dest)):
            raise ValueError(
                "--evaluate loads SOURCE and DEST with transformers, which needs local directories; "
                "drop --evaluate and run nvfp4-ray evaluate on local copies"
            )
        return self

    @property
    def prefetch_bytes(self) -> int:
        if self.prefetch_gib is not None:
            return int(self.prefetch_gib * 2**30)
        return (4 if is_remote(self.source) else 1) * 2**30

    @property
    def ignore_patterns(self) -> list[str]:
        return list(DEFAULT_IGNORE if self.ignore is None else self.ignore)

    @classmethod
    def build(cls, values: dict, config_file: str | None = None) -> "QuantizeConfig":
        """Merge a YAML file (if any) with explicit values, raising InputError on any problem."""
        merged: dict = {}
        if config_file is not None:
            merged.update(load_yaml_options(config_file))
        merged.update({k: v for k, v in values.items() if v is not None})
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise InputError(format_validation_error(exc)) from None


def load_yaml_options(path: str) -> dict:
    from nvfp4_ray.io.storage import Store

    folder, _, name = path.rpartition("/")
    store = Store(folder or ".")
    if not store.exists(name):
        raise InputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(store.read_text(name))
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown option (valid: {', '.join(sorted(QuantizeConfig.model_fields))})"
        parts.append(f"{field}: {message}")
    return "invalid configuration: " + "; ".join(parts)
