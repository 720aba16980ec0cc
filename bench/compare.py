"""Two checkpoints, tensor by tensor, byte for byte, reading one chunk of each at a time
(an 8B checkpoint is compared in a few hundred MiB of memory)."""

from __future__ import annotations

import json
import os
import struct

import torch

CHUNK = 64 << 20
SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def safetensors_tensors(path: str) -> dict[str, tuple[str, tuple, int, int]]:
    """name -> (dtype, shape, first byte, end byte) in the file, from its header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {
        name: (entry["dtype"], tuple(entry["shape"]), base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for name, entry in header.items()
    }


def checkpoint_tensors(folder: str) -> dict[str, tuple[str, str, tuple, int, int]]:
    """name -> (file, dtype, shape, first byte, end byte) for every tensor of a checkpoint folder."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    tensors = {}
    for name in files:
        path = os.path.join(folder, name)
        for tensor, (dtype, shape, start, end) in safetensors_tensors(path).items():
            tensors[tensor] = (path, dtype, shape, start, end)
    return tensors


def _read(path: str, start: int, end: int):
    with open(path, "rb") as handle:
        handle.seek(start)
        while start < end:
            chunk = handle.read(min(CHUNK, end - start))
            start += len(chunk)
            yield chunk


def _same_bytes(a: tuple, b: tuple) -> bool:
    if a[3] - a[4] != b[3] - b[4]:
        return False
    return all(x == y for x, y in zip(_read(a[0], a[3], a[4]), _read(b[0], b[3], b[4])))


def _equal_bytes(a: tuple, b: tuple) -> int:
    """How many bytes at the same offsets of two tensors of one size are equal."""
    return sum(
        int((torch.frombuffer(bytearray(x), dtype=torch.uint8) == torch.frombuffer(bytearray(y), dtype=torch.uint8)).sum())
        for x, y in zip(_read(a[0], a[3], a[4]), _read(b[0], b[3], b[4]))
    )


def _scale(entry: tuple) -> float:
    (raw,) = _read(entry[0], entry[3], entry[4])
    return torch.frombuffer(bytearray(raw), dtype=SCALE_DTYPES[entry[1]]).float().item()


def bf16_steps(a: float, b: float) -> int:
    """How many bf16 values apart two floats are (after rounding each to bf16)."""
    bits = lambda v: int(torch.tensor([v], dtype=torch.bfloat16).view(torch.int16)[0])  # noqa: E731
    return abs(bits(a) - bits(b))


def compare_checkpoints(ours: str, reference: str) -> dict:
    """Every tensor of both checkpoints: same names, dtypes, shapes and bytes.
    ``outputs_equal``: weights byte-identical and input scales bit-identical."""
    mine, theirs = checkpoint_tensors(ours), checkpoint_tensors(reference)
    different, steps, packed, packed_equal = [], 0, 0, 0
    for name in sorted(set(mine) & set(theirs)):
        a, b = mine[name], theirs[name]
        equal = a[1:3] == b[1:3] and _same_bytes(a, b)
        if not equal:
            different.append(name)
        if name.endswith(".weight_packed") and a[1:3] == b[1:3]:
            packed += a[4] - a[3]
            packed_equal += a[4] - a[3] if equal else _equal_bytes(a, b)
        if name.endswith(".input_global_scale") and a[1:3] == b[1:3]:
            steps = max(steps, bf16_steps(_scale(a), _scale(b)))
    only_ours, only_reference = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    weights_equal = not only_ours and not only_reference and not [n for n in different if "input_global_scale" not in n]
    scales_equal = not [n for n in different if "input_global_scale" in n]
    return {
        "outputs_equal": weights_equal and scales_equal,
        "weights_equal": weights_equal,
        "input_scales_equal": scales_equal,
        "max_input_scale_diff_bf16_steps": steps,
        "tensors_compared": len(set(mine) & set(theirs)),
        "tensors_different_count": len(different),
        "tensors_different": different[:20],
        # of the FP4 weight bytes (two codes each), the share equal at the same place: GPTQ
        # outputs made with other summation orders agree on most codes, not all
        "weight_packed_bytes_equal_fraction": round(packed_equal / packed, 6) if packed else None,
        "tensors_only_in_ours": only_ours[:20],
        "tensors_only_in_reference": only_reference[:20],
    }


def quantized_weight_bytes(output: str, source: str) -> int:
    """Bytes of the source weights that were quantized: one per ``weight_packed`` in the output."""
    source_tensors = checkpoint_tensors(source)
    packed = [name for name in checkpoint_tensors(output) if name.endswith(".weight_packed")]
    return sum(source_tensors[n.removesuffix("_packed")][4] - source_tensors[n.removesuffix("_packed")][3] for n in packed)
