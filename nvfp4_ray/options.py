"""Options of the commands other than ``quantize``: pydantic models the CLI builds its flags
from (see cli.add_config_options), merged with a ``--config FILE.yaml`` like QuantizeConfig."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from nvfp4_ray.config import load_yaml_options
from nvfp4_ray.errors import InputError


class CommandOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    POSITIONAL: ClassVar[tuple[str, ...]] = ()  # fields given as positional arguments, in order

    @classmethod
    def build(cls, values: dict, config_file: str | None = None):
        merged = load_yaml_options(config_file) if config_file is not None else {}
        merged.update({k: v for k, v in values.items() if v is not None})
        try:
            return cls(**merged)
        except ValidationError as exc:
            parts = []
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"]) or "options"
                message = error["msg"].removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = f"unknown option (valid: {', '.join(sorted(cls.model_fields))})"
                parts.append(f"{field}: {message}")
            raise InputError("invalid options: " + "; ".join(parts)) from None
