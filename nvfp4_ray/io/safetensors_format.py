"""The safetensors container: a strict header parser and a writer. No torch needed.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data
section; each header entry gives dtype, shape and [begin, end) offsets into the data.
The parser treats the file as hostile: every length, offset and shape is checked before
anything is allocated or read, and each error names the file, the tensor and the fix.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from nvfp4_ray.errors import InputError

# Bytes per element for every dtype the safetensors spec defines.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses larger headers too
_ALIGN = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte prefix and return the JSON header's length."""
    if file_size < 8 or len(prefix) < 8:
        raise InputError(f"{where}: not a safetensors file ({file_size} bytes; the 8-byte header length is missing)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise InputError(f"{where}: corrupt safetensors header: declared header length {length} exceeds {MAX_HEADER_BYTES}")
    if 8 + length > file_size:
        raise InputError(
            f"{where}: truncated safetensors file: header needs {8 + length} bytes, file has {file_size}; "
            "re-download or re-upload the shard"
        )
    return length


def parse_header(header_bytes: bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Parse and validate a header; ``file_size`` bounds every offset."""
    data_start = 8 + len(header_bytes)
    try:
        raw = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{where}: corrupt safetensors header: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: corrupt safetensors header: expected a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{where}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_size = file_size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, spec in raw.items():
        entries[name] = _parse_entry(name, spec, data_start, data_size, where)
    _check_no_overlap(entries, where)
    return SafetensorsHeader(entries=entries, metadata=metadata, data_start=data_start)


def _parse_entry(name: str, spec: object, data_start: int, data_size: int, where: str) -> TensorEntry:
    bad = f"{where}: tensor {name!r}:"
    if not isinstance(spec, dict):
        raise InputError(f"{bad} header entry is not an object")
    dtype = spec.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{bad} unknown dtype {dtype!r} (valid: {', '.join(sorted(DTYPE_SIZES))})")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{bad} shape must be a list of non-negative integers, got {shape!r}")
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InputError(f"{bad} data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InputError(f"{bad} data_offsets {offsets} are not an ordered, non-negative range")
    if end > data_size:
        raise InputError(
            f"{bad} data ends at byte {data_start + end} but the file has {data_start + data_size} bytes "
            "(truncated file); re-download or re-upload the shard"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InputError(f"{bad} {end - begin} bytes of data for shape {shape} {dtype} (expected {expected})")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=data_start + begin, end=data_start + end)


def _check_no_overlap(entries: dict[str, TensorEntry], where: str) -> None:
    previous = None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if previous is not None and entry.start < previous.end and entry.nbytes and previous.nbytes:
            raise InputError(f"{where}: corrupt safetensors header: tensors {previous.name!r} and {entry.name!r} overlap")
        previous = entry


def build_header(layout: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None):
    """The header of a safetensors file of tensors (name, dtype, shape, byte size) stored
    back to back in that order: its bytes (with the length prefix) and the file's size."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, size in layout:
        if size != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise ValueError(f"tensor {name!r}: {size} bytes do not match shape {shape} {dtype}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text, 8 + len(text) + offset


def build_file(tensors: list[tuple[str, str, tuple[int, ...], bytes | memoryview]], metadata: dict[str, str] | None = None):
    """Serialize tensors (name, dtype, shape, raw bytes) as one safetensors file.

    Returns the list of buffers to write back to back (header first) and the total size,
    so large tensors are never copied just to concatenate them.
    """
    views = [memoryview(data).cast("B") for _, _, _, data in tensors]
    header, size = build_header([(name, dtype, shape, len(view)) for (name, dtype, shape, _), view in zip(tensors, views)], metadata)
    return [header, *views], size
