"""Safetensors files written from tensors, a part at a time, with what each file is (its
size, sha256 and tensors: WrittenFile, the record a resume checks a unit against).

  write_shard   (name, dtype, shape, bytes) tuples, encoded whole (encode_shard)
  CopiedShard   tensors copied byte for byte from a checkpoint, a chunk at a time
  TensorShard   torch tensors, a GPU's copied out through a pinned host buffer
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.checkpoint import SourceTensor
from nvfp4_ray.io.safetensors_format import build_file, build_header
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import finite, safetensors_dtype

_COPY_CHUNK = 32 << 20  # bytes of a copied tensor in memory at once (two: one written, the next read)


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
