"""What calibration takes from the rope part of config.json: the rotary tables, not the numbers.

Rope parameters (``rope_theta``, ``rope_scaling`` / ``rope_parameters``,
``max_position_embeddings``) reach the decoder layers only through the rotary embedding,
whose cos/sin are a function of its inverse frequencies and attention scaling alone, as
long as it does not recompute them in the forward (dynamic NTK scaling past the original
length; longrope). A config fix that leaves those unchanged for the calibration lengths
(a corrected ``max_position_embeddings``, dynamic scaling that only acts past the
calibration length) cannot change any amax: the calibration key hashes the tables.
"""

from __future__ import annotations

import hashlib

import torch

from nvfp4_ray.architecture import find_backbone

ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")
# Text model types whose decoder layers read rope parameters outside the rotary embedding:
# Ministral3's attention scales queries by rope_parameters' llama_4_scaling_beta.
ROPE_READ_BY_LAYERS = {"ministral3": ("rope_theta", "rope_scaling", "rope_parameters")}


def layer_config(config: dict, text_type: str, rotary_is_static: bool) -> dict:
    """config.json without the keys that reach the layers only through static rotary tables."""
    if not rotary_is_static:
        return config
    dropped = [key for key in ROPE_KEYS if key not in ROPE_READ_BY_LAYERS.get(text_type, ())]

    def strip(block: dict) -> dict:
        return {key: value for key, value in block.items() if key not in dropped}

    if isinstance(config.get("text_config"), dict):
        return {**strip(config), "text_config": strip(config["text_config"])}
    return strip(config)


def rotary_tables(model, max_len: int) -> str | None:
    """A digest of what the rotary embedding computes for positions below ``max_len``, or
    None when that depends on more than its tables (it recomputes them in the forward)."""
    rotary = getattr(find_backbone(model)[1], "rotary_emb", None)
    if rotary is None:
        return None
    rope_type = str(getattr(rotary, "rope_type", "default"))
    with torch.device("cpu"):  # as the calibration runner builds it
        rotary = type(rotary)(config=rotary.config)
    if rope_type == "longrope" or ("dynamic" in rope_type and max_len > rotary.original_max_seq_len):
        return None
    digest = hashlib.sha256(f"{type(rotary).__name__}:{float(rotary.attention_scaling)!r}:".encode())
    digest.update(rotary.inv_freq.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
