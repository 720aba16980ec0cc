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
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np

from nvfp4_ray.io.checkpoint import SourceTensor
from nvfp4_ray.errors import InputError
from nvfp4_ray.io.safetensors_format import DTYPE_SIZES, build_file, build_header, header_length, parse_header
from nvfp4_ray.io.storage import Store

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MERGE_GAP = 1 << 20  # read across gaps up to 1 MiB rather than issue another request
_COPY_CHUNK = 32 << 20  # bytes of a copied tensor in memory at once (two: one written, the next read)
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


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (contiguous copy when needed)."""
    import torch

    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str
    tensors: dict[str, int]  # tensor name -> byte size, for the index


def encode_shard(name: str, tensors: list[tuple[str, str, tuple[int, ...], object]]) -> tuple[list, WrittenFile]:
    """Serialize (name, dtype, shape, bytes) tuples as one safetensors file: the parts to
    write back to back (the header, then views of the tensors' own bytes: nothing large is
    copied) and what the file is."""
    ordered = sorted(tensors, key=lambda t: t[0])
    parts, size = build_file(ordered, {"format": "pt"})
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    sizes = {tensor: len(memoryview(raw).cast("B")) for tensor, _, _, raw in ordered}
    return parts, WrittenFile(name=name, size=size, sha256=digest.hexdigest(), tensors=sizes)


class CopiedShard:
    """Tensors copied byte for byte from a checkpoint into one safetensors file, a chunk at
    a time, so that a local write holds one chunk in memory whatever the tensors' size.
    ``parts()`` reads each chunk, checks it (no NaN or Inf in a float tensor) and yields it;
    ``written`` says what the file is once every part has been taken."""

    def __init__(self, name: str, source: Store, tensors: list[SourceTensor]):
        self.name, self.source = name, source
        self.tensors = sorted(tensors, key=lambda t: t.name)  # the order encode_shard writes
        layout = [(t.name, t.entry.dtype, t.entry.shape, t.entry.nbytes) for t in self.tensors]
        self.header, self.size = build_header(layout, {"format": "pt"})
        self.written: WrittenFile | None = None

    def parts(self):
        digest = hashlib.sha256(self.header)
        yield self.header
        pieces = [
            (tensor, start, min(_COPY_CHUNK, tensor.entry.end - start))
            for tensor in self.tensors
            for start in range(tensor.entry.start, tensor.entry.end, _COPY_CHUNK)
        ]
        # The next chunk is read, checked and hashed (in order: one thread) while this one
        # is written: one step after the other, a 2.1 GB copy took 5 s (H200 host, record 1649).
        with ThreadPoolExecutor(1, thread_name_prefix="copy-read") as reader:
            ahead = reader.submit(self._chunk, *pieces[0], digest) if pieces else None
            for i in range(len(pieces)):
                chunk = ahead.result()
                ahead = reader.submit(self._chunk, *pieces[i + 1], digest) if i + 1 < len(pieces) else None
                yield memoryview(chunk)
        self.written = WrittenFile(self.name, self.size, digest.hexdigest(), {t.name: t.entry.nbytes for t in self.tensors})

    def _chunk(self, tensor: SourceTensor, start: int, size: int, digest) -> np.ndarray:
        # a new buffer per chunk: a writer may hold on to the parts (some object stores take
        # a file as one body)
        chunk = np.empty(size, dtype=np.uint8)
        try:
            self.source.read_many([(tensor.file, start, start + size)], memoryview(chunk))
        except OSError as exc:
            if exc.errno is None:
                raise  # an object store's error, which names SOURCE already
            # without the errno: a full disk or a permission of SOURCE is not DEST's
            raise OSError(f"{self.source.display(tensor.file)}: {exc.strerror}") from exc
        if not finite(tensor.entry.dtype, chunk):
            raise InputError(f"tensor {tensor.name!r} contains NaN or Inf; the source checkpoint is broken")
        digest.update(chunk)
        return chunk


def write_shard(store: Store, file_name: str, tensors: list[tuple[str, str, tuple[int, ...], object]]) -> WrittenFile:
    """Write (name, dtype, shape, bytes) tuples as one safetensors file, atomically."""
    parts, written = encode_shard(file_name, tensors)
    store.write_parts(file_name, parts, size=written.size)
    return written


class TensorShard:
    """Torch tensors as one safetensors file. A GPU's tensors are copied out a chunk at a
    time through ``buffer`` (a pinned uint8 host tensor; on a CPU too, where given), on
    ``stream`` (not the compute stream's queue; one of torch's pool if not given), which
    first waits for ``ready`` (a CUDA event after the kernels that made them): the host
    holds one chunk, whatever the tensors' size, and the tensors wait on the GPU until
    written. Without a buffer a CPU tensor's own bytes are the parts. ``parts()`` yields
    the file (each part valid until the next is asked for: a writer writes or copies it
    first, as Store.write_parts does); ``written`` says what the file is once every part
    has been taken."""

    def __init__(self, name: str, tensors: list[tuple[str, object]], buffer=None, ready=None, stream=None):
        self.name, self.buffer, self.ready, self.stream = name, buffer, ready, stream
        self.tensors = sorted(tensors, key=lambda t: t[0])  # the order encode_shard writes
        self.sizes = {tensor_name: t.numel() * t.element_size() for tensor_name, t in self.tensors}
        layout = [(n, safetensors_dtype(t.dtype), tuple(t.shape), self.sizes[n]) for n, t in self.tensors]
        self.header, self.size = build_header(layout, {"format": "pt"})
        self.written: WrittenFile | None = None

    def parts(self):
        digest = hashlib.sha256(self.header)
        yield self.header
        stream = self._stream()
        for _, tensor in self.tensors:
            for part in self._chunks(tensor, stream):
                digest.update(part)
                yield part
        self.written = WrittenFile(self.name, self.size, digest.hexdigest(), self.sizes)

    def sha256(self) -> str:
        """The digest of the file's bytes (the parts taken, not written)."""
        for _ in self.parts():
            pass
        return self.written.sha256

    def _stream(self):
        import torch

        on_gpu = [tensor for _, tensor in self.tensors if tensor.is_cuda]
        if not on_gpu:
            return None
        if self.buffer is None:
            raise ValueError("GPU tensors are written through a host buffer: give one")
        stream = self.stream or torch.cuda.Stream(on_gpu[0].device)
        if self.ready is not None:
            stream.wait_event(self.ready)
        return stream

    def _chunks(self, tensor, stream):
        import torch

        if self.buffer is None:
            yield tensor_bytes(tensor)
            return
        with torch.cuda.stream(stream) if tensor.is_cuda else nullcontext():  # a copy, if any, after ``ready``
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        room = self.buffer.numel()
        for start in range(0, flat.numel(), room):
            piece = self.buffer[: min(room, flat.numel() - start)]
            if not tensor.is_cuda:
                piece.copy_(flat[start : start + piece.numel()])
            else:  # the copy has run before the part is handed out, and before the next one
                with torch.cuda.stream(stream):
                    piece.copy_(flat[start : start + piece.numel()], non_blocking=True)
                stream.synchronize()
            yield memoryview(piece.numpy()).cast("B")
