"""An FP8 BASE for ``evaluate``: DeepSeek-V3 and Kimi-K2 are published only in FP8 (e4m3
weights, 128 x 128 block scales), which is what their users quantize from and compare with.

transformers 5.17 dequantizes such a checkpoint wrongly where a dimension is not a multiple
of 128, or raises (docs/moe.md), so BASE is first written out as the bf16 checkpoint that
quantize reads it as: each FP8 weight times its block scales (formats/fp8_block.py, the
arithmetic of compressed-tensors' FP8BlockDequantizer), the scales dropped, config.json
without its quantization_config. The copy goes to a temporary folder (the bf16 size of the
checkpoint, on the local disk), one shard at a time, and is removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4_ray.errors import InputError
from nvfp4_ray.formats import fp8_block
from nvfp4_ray.io.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4_ray.quality.weights import tensor_files


def check_fp8_base(folder: str, role: str) -> None:
    """Refuse, before any work, an FP8 BASE that quantize would refuse as SOURCE."""
    try:
        checkpoint = open_checkpoint(folder)
        fp8_block.scales_of(checkpoint.config.get("quantization_config"), checkpoint.tensors)
    except InputError as exc:
        message = str(exc).replace("SOURCE's", "its").replace("SOURCE", "it")  # the checks are quantize's
        raise InputError(f"{role} {folder}: {message}") from None


@contextmanager
def bf16_base(folder: str, config: dict) -> Iterator[str]:
    """``folder`` itself for a BASE without quantization_config; for an FP8 one (checked by
    check_fp8_base), a temporary bf16 copy of it."""
    if "quantization_config" not in config:
        yield folder
        return
    files = tensor_files(folder)
    with tempfile.TemporaryDirectory(prefix="nvfp4-base-") as copy:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.endswith(".safetensors") and name not in ("config.json", INDEX_NAME):
                shutil.copy(path, copy)
        with open(os.path.join(copy, "config.json"), "w") as handle:
            json.dump({key: value for key, value in config.items() if key != "quantization_config"}, handle, indent=2)
        weight_map = {}
        for shard in sorted(set(files.values())):
            tensors = load_file(shard)
            for name in [n for n in tensors if n.endswith(fp8_block.SCALE_SUFFIX)]:
                del tensors[name]  # taken with its weight below, from whichever shard holds it
            for name in [n for n in tensors if files.get(n.removesuffix(".weight") + fp8_block.SCALE_SUFFIX)]:
                scale_name = name.removesuffix(".weight") + fp8_block.SCALE_SUFFIX
                with safe_open(files[scale_name], "pt") as handle:
                    tensors[name] = fp8_block.dequantize(tensors[name], handle.get_tensor(scale_name))
            save_file(tensors, os.path.join(copy, os.path.basename(shard)), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, os.path.basename(shard)))
        with open(os.path.join(copy, INDEX_NAME), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle, indent=2)
        yield copy
