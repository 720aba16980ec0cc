"""Tensors as raw bytes: reading them from a checkpoint, moving them between processes,
and writing them as safetensors shards.

A :class:`TensorBundle` is one contiguous uint8 numpy buffer plus a table of entries.
Ray stores numpy buffers in its shared-memory object store and hands them to every
process on the node without a copy, so one read of a layer serves all of a node's
workers; ``tensor()`` then views the bytes as a torch tensor, again without a copy.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import cache

import numpy as np

from nvfp4_ray.io.checkpoint import SourceTensor, read_header
from nvfp4_ray.io.safetensors_format import DTYPE_SIZES, build_file
from nvfp4_ray.io.storage import Store

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MERGE_GAP = 1 << 20  # read across gaps up to 1 MiB rather than issue another request


@cache
def _torch_dtypes() -> dict:
    # torch is imported on first use: processes that only move bytes start faster without it
    import torch

    return {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
        "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }  # fmt: skip


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (e.g. "BF16")."""
    return _torch_dtypes()[name]


def safetensors_dtype(dtype) -> str:
    return next(name for name, value in _torch_dtypes().items() if value == dtype)


@dataclass
class TensorBundle:
    buffer: np.ndarray  # uint8, read-only once it has been through Ray's object store
    entries: dict[str, tuple[int, str, tuple[int, ...]]]  # name -> (offset, dtype, shape)

    def raw(self, name: str) -> np.ndarray:
        offset, dtype, shape = self.entries[name]
        size = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        return self.buffer[offset : offset + size]

    def tensor(self, name: str):
        """A zero-copy torch view; treat it as read-only."""
        import torch

        _, dtype, shape = self.entries[name]
        data = self.raw(name)
        if data.size == 0:
            return torch.empty(shape, dtype=torch_dtype(dtype))
        with warnings.catch_warnings():  # torch warns about read-only buffers: views are never written
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(data, dtype=torch_dtype(dtype)).view(shape)

    def all_finite(self, name: str) -> bool:
        """No NaN or Inf in a float tensor, checked on its bits (no torch, bounded memory)."""
        _, dtype, _ = self.entries[name]
        if dtype not in FLOAT_DTYPES:
            return True
        raw = self.raw(name)
        step = 64 << 20
        for start in range(0, raw.size, step):
            chunk = raw[start : start + step]
            if dtype == "BF16":  # exponent bits all ones: Inf or NaN
                if np.any((chunk.view(np.uint16) & 0x7F80) == 0x7F80):
                    return False
            elif not np.isfinite(chunk.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])).all():
                return False
        return True

    def names(self) -> list[str]:
        return list(self.entries)


def read_tensors(store: Store, tensors: list[SourceTensor]) -> TensorBundle:
    """Read the given tensors (any files) into one bundle with as few requests as possible."""
    by_file: dict[str, list[SourceTensor]] = defaultdict(list)
    for tensor in tensors:
        by_file[tensor.file].append(tensor)
    total = sum(t.entry.nbytes for t in tensors)
    buffer = np.empty(total, dtype=np.uint8)
    view = memoryview(buffer)
    entries: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    offset = 0
    for file_name in sorted(by_file):
        members = sorted(by_file[file_name], key=lambda t: t.entry.start)
        # Coalesce neighbouring tensors into spans; bytes between them are read and dropped.
        spans: list[list] = []
        for tensor in members:
            if spans and tensor.entry.start - spans[-1][1] <= _MERGE_GAP:
                spans[-1][1] = max(spans[-1][1], tensor.entry.end)
                spans[-1][2].append(tensor)
            else:
                spans.append([tensor.entry.start, tensor.entry.end, [tensor]])
        for start, end, span_tensors in spans:
            if end - start == sum(t.entry.nbytes for t in span_tensors):
                target = view[offset : offset + end - start]
                store.read_into(file_name, [(start, end)], target)
                for t in span_tensors:
                    entries[t.name] = (offset + t.entry.start - start, t.entry.dtype, t.entry.shape)
                offset += end - start
            else:  # gaps inside the span: read it whole, keep only the tensors
                scratch = np.empty(end - start, dtype=np.uint8)
                store.read_into(file_name, [(start, end)], memoryview(scratch))
                for t in span_tensors:
                    buffer[offset : offset + t.entry.nbytes] = scratch[t.entry.start - start : t.entry.end - start]
                    entries[t.name] = (offset, t.entry.dtype, t.entry.shape)
                    offset += t.entry.nbytes
    return TensorBundle(buffer=buffer, entries=entries)


def read_file(store: Store, file_name: str) -> TensorBundle:
    """A whole (small) safetensors file as a bundle."""
    entries = read_header(store, file_name, store.info(file_name).size)
    return read_tensors(store, [SourceTensor(file_name, entry) for entry in entries.values()])


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (contiguous copy when needed)."""
    import torch

    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy()).cast("B")


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str
    tensors: dict[str, int]  # tensor name -> byte size, for the index


def encode_shard(name: str, tensors: list[tuple[str, str, tuple[int, ...], object]]) -> tuple[bytearray, WrittenFile]:
    """Serialize (name, dtype, shape, bytes) tuples as one safetensors file, in memory."""
    ordered = sorted(tensors, key=lambda t: t[0])
    buffers, size = build_file(ordered, {"format": "pt"})
    data = bytearray(size)
    offset = 0
    for part in buffers:
        data[offset : offset + len(part)] = part
        offset += len(part)
    sizes = {tensor: len(memoryview(raw).cast("B")) for tensor, _, _, raw in ordered}
    return data, WrittenFile(name=name, size=size, sha256=hashlib.sha256(data).hexdigest(), tensors=sizes)


def write_shard(store: Store, file_name: str, tensors: list[tuple[str, str, tuple[int, ...], object]]) -> WrittenFile:
    """Write (name, dtype, shape, bytes) tuples as one safetensors file, atomically."""
    data, written = encode_shard(file_name, tensors)
    store.write_bytes(file_name, data)
    return written


def torch_entry(name: str, tensor) -> tuple[str, str, tuple[int, ...], memoryview]:
    return (name, safetensors_dtype(tensor.dtype), tuple(tensor.shape), tensor_bytes(tensor))


def bundle_entry(bundle: TensorBundle, name: str, out_name: str | None = None):
    """A tensor copied byte for byte from a bundle into a shard."""
    _, dtype, shape = bundle.entries[name]
    return (out_name or name, dtype, shape, memoryview(bundle.raw(name)).cast("B"))
