"""Tensors as raw bytes: reading them from a checkpoint and moving them between processes
(shards.py writes them as safetensors files).

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
from functools import cache, cached_property

import numpy as np

from nvfp4_ray.io.checkpoint import SourceTensor
from nvfp4_ray.io.safetensors_format import DTYPE_SIZES, header_length, parse_header
from nvfp4_ray.io.storage import Store

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MERGE_GAP = 1 << 20  # read across gaps up to 1 MiB rather than issue another request
_FINITE_STEP = 1 << 20  # bytes checked for NaN and Inf at once (a multiple of every item size)


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

    @property
    def size(self) -> int:
        return self.buffer.size

    def read_range(self, start: int, out: memoryview) -> None:
        """Bytes [start, start + len(out)) of the buffer, into ``out``."""
        out[:] = memoryview(self.buffer)[start : start + len(out)]

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

    def as_tensor(self):
        """The whole buffer as a zero-copy torch uint8 tensor; treat it as read-only."""
        import torch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self.buffer, dtype=torch.uint8) if self.buffer.size else torch.empty(0, dtype=torch.uint8)

    def names(self) -> list[str]:
        return list(self.entries)

    def subset(self, names: list[str]) -> TensorBundle:
        """A bundle of ``names`` alone, their bytes copied (each at a 64-byte offset)."""
        entries, pieces, offset = {}, [], 0
        for name in names:
            _, dtype, shape = self.entries[name]
            raw = self.raw(name)
            pad = -offset % 64
            pieces += [np.zeros(pad, dtype=np.uint8), raw]
            entries[name] = (offset + pad, dtype, shape)
            offset += pad + raw.size
        return TensorBundle(buffer=np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint8), entries=entries)


def finite(dtype: str, raw: np.ndarray) -> bool:
    """No NaN or Inf among the values of a float tensor's raw bytes (uint8, whole values).
    A step at a time, so that the temporaries stay in the CPU's cache: on a 128 MiB chunk,
    0.007 s against 0.17 s for one pass over the whole (timed by hand on a 2-core VM)."""
    if dtype not in FLOAT_DTYPES:
        return True
    for start in range(0, raw.size, _FINITE_STEP):
        part = raw[start : start + _FINITE_STEP]
        if dtype == "BF16":  # Inf or NaN: exponent bits all ones, the magnitude bits from 0x7F80 up
            if (part.view(np.uint16) & 0x7FFF).max(initial=0) >= 0x7F80:
                return False
        elif not np.isfinite(part.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])).all():
            return False
    return True


def _layout(tensors: list[SourceTensor]) -> tuple[list[list], dict, int]:
    """Where the given tensors lie in a bundle of them: the spans to read, each
    ``[file, start, end, offset in the bundle]`` and back to back; every tensor's entry;
    the bundle's size. Neighbouring tensors of a file are coalesced into one span (bytes
    between them, gaps up to _MERGE_GAP, are read too and left unused), for fewer, larger
    requests."""
    by_file: dict[str, list[SourceTensor]] = defaultdict(list)
    for tensor in tensors:
        by_file[tensor.file].append(tensor)
    spans: list[list] = []
    entries: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    offset = 0
    for file_name in sorted(by_file):
        span = None
        for tensor in sorted(by_file[file_name], key=lambda t: t.entry.start):
            entry = tensor.entry
            if span is not None and entry.start - span[2] <= _MERGE_GAP:
                span[2] = max(span[2], entry.end)
            else:
                span = [file_name, entry.start, entry.end, offset]
                spans.append(span)
            offset = span[3] + span[2] - span[1]
            entries[tensor.name] = (span[3] + entry.start - span[1], entry.dtype, entry.shape)
    return spans, entries, offset


def read_tensors(store: Store, tensors: list[SourceTensor]) -> TensorBundle:
    """Read the given tensors (any files) into one bundle, with every request in flight at once."""
    spans, entries, size = _layout(tensors)
    buffer = np.empty(size, dtype=np.uint8)
    store.read_many([(file, start, end) for file, start, end, _ in spans], memoryview(buffer))
    return TensorBundle(buffer=buffer, entries=entries)


@dataclass(frozen=True)
class LocalRead:
    """Tensors of a local SOURCE that the process using them reads itself, from the page
    cache the layer flow's read-ahead filled: no reading process, no object-store copy.
    Its ``entries`` and ``size`` are those of the bundle ``read`` returns."""

    source_url: str
    tensors: list[SourceTensor]

    @cached_property
    def _layout(self) -> tuple[list[list], dict, int]:
        return _layout(self.tensors)

    @property
    def entries(self) -> dict[str, tuple[int, str, tuple[int, ...]]]:
        return self._layout[1]

    @property
    def size(self) -> int:
        return self._layout[2]

    def read(self) -> TensorBundle:
        return read_tensors(Store(self.source_url), self.tensors)

    def read_range(self, start: int, out: memoryview) -> None:
        """Bytes [start, start + len(out)) of the bundle ``read`` would return, into ``out``."""
        end, reads = start + len(out), []
        for file_name, first, last, offset in self._layout[0]:
            low, high = max(start, offset), min(end, offset + last - first)
            if low < high:  # the spans lie back to back: these reads fill ``out`` in order
                reads.append((file_name, first + low - offset, first + high - offset))
        Store(self.source_url).read_many(reads, out)

    def to_device(self, name: str, device, pieces: list):
        """Tensor ``name`` read straight into ``device`` memory through ``pieces``
        (``to_device_in_pieces``): read whole into host memory first, the 8B model's 1 GiB
        embedding was that much of the job's host memory peak."""
        tensor = next(t for t in self.tensors if t.name == name)
        alone = LocalRead(self.source_url, [tensor])
        out = to_device_in_pieces(alone, device, pieces)
        return out.view(torch_dtype(tensor.entry.dtype)).view(tensor.entry.shape)


def to_device_in_pieces(source: TensorBundle | LocalRead, device, pieces: list):
    """The bytes of ``source`` in a new uint8 tensor on ``device``, crossed through
    ``pieces`` (equal uint8 host buffers, pinned for a GPU) a piece at a time: each piece is
    filled while the copy out of the previous one runs, and filled again only once the copy
    out of it has finished. The host memory a crossing holds is the pieces, whatever the
    size of the layer (a whole-layer pinned buffer was 0.5 GiB on the 8B model, and grows
    with the model's width). The copies are on the current stream; it returns once they
    have run, the pieces free for the next crossing."""
    import torch

    out = torch.empty(source.size, dtype=torch.uint8, device=device)
    piece_bytes = pieces[0].numel()
    copied: list = [None] * len(pieces)  # per piece: a CUDA event after the last copy out of it
    for n, start in enumerate(range(0, source.size, piece_bytes)):
        i, length = n % len(pieces), min(piece_bytes, source.size - start)
        if copied[i] is not None:
            copied[i].synchronize()
        source.read_range(start, memoryview(pieces[i].numpy())[:length])
        out[start : start + length].copy_(pieces[i][:length], non_blocking=True)
        if out.is_cuda:
            copied[i] = torch.cuda.Event()
            copied[i].record()
    for event in copied:
        if event is not None:
            event.synchronize()
    return out


def read_file(store: Store, file_name: str, sha256: str | None = None) -> TensorBundle | None:
    """A whole (small) safetensors file as a bundle; None if ``sha256`` is given and the
    file's bytes do not have it."""
    data = store.read_bytes(file_name)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        return None
    where = store.display(file_name)
    header = parse_header(data[8 : 8 + header_length(data, len(data), where)], len(data), where)
    entries = {name: (entry.start, entry.dtype, entry.shape) for name, entry in header.entries.items()}
    return TensorBundle(buffer=np.frombuffer(bytearray(data), dtype=np.uint8), entries=entries)  # writable, as read_tensors'
