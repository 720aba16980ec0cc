"""An FP8 BASE for ``evaluate``: DeepSeek-V3 and Kimi-K2 are published only in FP8 (e4m3
weights, 128 x 128 block scales), which is what their users quantize from and compare with.

transformers 5.17 dequantizes such a checkpoint wrongly where a dimension is not a multiple
of 128, or raises (docs/moe.md), so BASE is first written out as the bf16 checkpoint that
quantize reads it as: each FP8 weight times its block scales (formats/fp8_block.py, the
arithmetic of compressed-tensors' FP8BlockDequantizer), the scales dropped, config.json
without its quantization_config. The copy goes to a temporary folder under TMPDIR (the
bf16 size of the checkpoint; checked before any work), one shard at a time, and is
removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from typing import Iterator

from nvfp4_ray.errors import InputError
from nvfp4_ray.formats import fp8_block
from nvfp4_ray.io.checkpoint import INDEX_NAME, SourceCheckpoint, open_checkpoint


def check_fp8_base(folder: str, config: dict, role: str) -> None:
    """Refuse, before any work, an FP8 BASE whose quantization_config or tensors quantize
    would refuse in a SOURCE (an FP8 lm_head aside, which is dequantized here too), and one
    whose bf16 copy would not fit under TMPDIR."""
    fp8_block.check_source_config(config["quantization_config"], role)
    checkpoint = _open(folder, role)
    fp8_block.scales_of(config["quantization_config"], checkpoint.tensors, role)
    need, where = _bf16_bytes(checkpoint), tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if need > free:
        raise InputError(
            f"{role} {folder} is FP8: evaluate loads a bf16 copy of it, {need / 2**30:.1f} GiB, written to {where}, "
            f"which has {free / 2**30:.1f} GiB free; set TMPDIR to a folder with room"
        )


@contextmanager
def bf16_base(folder: str, config: dict) -> Iterator[str]:
    """``folder`` itself for a BASE without quantization_config; for an FP8 one (checked by
    check_fp8_base), a temporary bf16 copy of it."""
    if "quantization_config" not in config:
        yield folder
        return
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint = _open(folder, "BASE")
    shard_of = {name: tensor.file for name, tensor in checkpoint.tensors.items()}
    handles = {}  # shard -> open file, for a scale kept in another shard than its weight
    with tempfile.TemporaryDirectory(prefix="nvfp4-base-") as copy, ExitStack() as opened:
        for name in checkpoint.copied_files:  # tokenizer & co, as quantize copies them
            os.makedirs(os.path.dirname(os.path.join(copy, name)), exist_ok=True)
            shutil.copy(os.path.join(folder, name), os.path.join(copy, name))
        with open(os.path.join(copy, "config.json"), "w") as handle:
            json.dump({key: value for key, value in config.items() if key != "quantization_config"}, handle, indent=2)
        weight_map = {}
        for shard in checkpoint.files:
            tensors = load_file(os.path.join(folder, shard))
            for name in list(tensors):  # each weight's scale beside it, wherever it is kept
                prefix = name.removesuffix(fp8_block.SCALE_SUFFIX).removesuffix(".weight")
                if name.endswith(fp8_block.SCALE_SUFFIX) and shard_of[f"{prefix}.weight"] != shard:
                    del tensors[name]
                scale_name = prefix + fp8_block.SCALE_SUFFIX
                if name.endswith(".weight") and shard_of.get(scale_name, shard) != shard:
                    where = shard_of[scale_name]
                    if where not in handles:
                        handles[where] = opened.enter_context(safe_open(os.path.join(folder, where), "pt"))
                    tensors[scale_name] = handles[where].get_tensor(scale_name)
            tensors = fp8_block.dequantize_weights(tensors)  # quantize's own step: the scales dropped
            os.makedirs(os.path.dirname(os.path.join(copy, shard)), exist_ok=True)
            save_file(tensors, os.path.join(copy, shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
        with open(os.path.join(copy, INDEX_NAME), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle, indent=2)
        yield copy


def _open(folder: str, role: str) -> SourceCheckpoint:
    try:
        return open_checkpoint(folder)
    except InputError as exc:  # its messages say SOURCE: this checkpoint is another role's
        raise InputError(f"{role} {folder} cannot be read: {exc}") from None


def _bf16_bytes(checkpoint: SourceCheckpoint) -> int:
    """The size of the bf16 copy: FP8 weights at 2 bytes an element, without their scales."""
    total = 0
    for name, tensor in checkpoint.tensors.items():
        entry = tensor.entry
        if not name.endswith(fp8_block.SCALE_SUFFIX):
            total += 2 * entry.numel if entry.dtype == "F8_E4M3" else entry.nbytes
    return total
