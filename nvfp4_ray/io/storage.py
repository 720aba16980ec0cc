"""One directory-like location (a local path or any fsspec URL such as ``s3://bucket/prefix``).

Everything the job reads or writes goes through :class:`Store`, so local disks and object
stores behave the same: byte-range reads, whole-object writes that are atomic (a local
file is written under a temporary name and renamed; an object store only shows an object
once its upload completes), exclusive creation for the commit marker, and listing.

Credentials never pass through here: fsspec/s3fs take them from the standard AWS sources
(environment, profiles, instance roles). ``redact`` scrubs secrets from any text we print.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

from nvfp4_ray.errors import InputError

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Reads of local files are split into chunks read by several threads: one sequential
# reader does not saturate an NVMe drive or a page-cache copy.
_LOCAL_CHUNK = 64 << 20
_LOCAL_READERS = 8


def redact(text: str) -> str:
    """Replace every credential value known to this process, and URL userinfo, with ***."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s]+:[^/@\s]+@", r"\1***@", text)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


@dataclass(frozen=True)
class FileInfo:
    """What identifies a file's content without reading it (for fingerprints and resume)."""

    size: int
    identity: str  # ETag on object stores; size+mtime locally


class Store:
    """A directory at ``url``; all paths given to methods are relative to it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if url != "/" else url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise InputError(f"cannot open {redact(url)}: {exc}") from None
        self.local = not is_remote(url)

    def __repr__(self) -> str:
        return f"Store({redact(self.url)!r})"

    def __reduce__(self):
        # Ship only the URL to Ray workers; each process builds its own filesystem client.
        return (Store, (self.url,))

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def display(self, relative: str = "") -> str:
        return redact(posixpath.join(self.url, relative) if relative else self.url)

    # ---- reading -------------------------------------------------------------------
    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def isdir(self, relative: str = "") -> bool:
        return self.fs.isdir(self.path(relative))

    def info(self, relative: str) -> FileInfo:
        raw = self.fs.info(self.path(relative))
        size = int(raw["size"])
        if self.local:
            identity = f"size={size};mtime_ns={os.stat(self.path(relative)).st_mtime_ns}"
        else:
            etag = raw.get("ETag") or raw.get("etag") or raw.get("md5") or ""
            identity = f"size={size};etag={str(etag).strip(chr(34))}"
        return FileInfo(size=size, identity=identity)

    def list_files(self, relative: str = "") -> list[str]:
        """Names of the files directly inside ``relative`` (no recursion)."""
        base = self.path(relative).rstrip("/")
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.get("type") == "file":
                names.append(posixpath.basename(entry["name"].rstrip("/")))
        return sorted(names)

    def read_bytes(self, relative: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(self.path(relative), start=start, end=end)

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_into(self, relative: str, ranges: list[tuple[int, int]], out: memoryview) -> None:
        """Read byte ranges of one file back to back into ``out`` (len == sum of ranges)."""
        pieces = []
        offset = 0
        for start, end in ranges:
            for chunk_start in range(start, end, _LOCAL_CHUNK):
                chunk_end = min(end, chunk_start + _LOCAL_CHUNK)
                pieces.append((chunk_start, chunk_end, offset))
                offset += chunk_end - chunk_start
        if offset != len(out):
            raise ValueError("ranges do not match the output buffer")
        if self.local:
            self._read_local(relative, pieces, out)
        else:
            path = self.path(relative)
            blobs = self.fs.cat_ranges(
                [path] * len(pieces), [p[0] for p in pieces], [p[1] for p in pieces], on_error="raise"
            )
            for (start, end, dst), blob in zip(pieces, blobs):
                if len(blob) != end - start:
                    raise OSError(f"{self.display(relative)}: short read at byte {start} (file truncated?)")
                out[dst : dst + len(blob)] = blob

    def _read_local(self, relative: str, pieces: list[tuple[int, int, int]], out: memoryview) -> None:
        fd = os.open(self.path(relative), os.O_RDONLY)
        try:

            def read_piece(piece):
                start, end, dst = piece
                view = out[dst : dst + end - start]
                done = 0
                while done < len(view):
                    n = os.preadv(fd, [view[done:]], start + done)
                    if n == 0:
                        raise OSError(f"{self.display(relative)}: short read at byte {start + done} (file truncated?)")
                    done += n

            with ThreadPoolExecutor(min(_LOCAL_READERS, len(pieces)) or 1) as pool:
                list(pool.map(read_piece, pieces))
        finally:
            os.close(fd)

    # ---- writing -------------------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes | bytearray | memoryview) -> None:
        """Write a whole file so that it is either complete or absent."""
        path = self.path(relative)
        if self.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # s3fs uploads large bodies as a multipart upload with concurrent parts and aborts
            # it on failure; the object only becomes visible once the upload completes.
            self.fs.pipe_file(path, bytes(data) if isinstance(data, memoryview) else data)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Create a file only if it does not exist yet; False if it already existed."""
        path = self.path(relative)
        if self.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        if self.fs.exists(path):
            return False
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as exc:  # servers without conditional writes answer 501/400
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            if "NotImplemented" not in str(exc) and "501" not in str(exc):
                raise
            self.fs.pipe_file(path, data)
        return True

    def delete(self, relative: str) -> None:
        path = self.path(relative)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=self.fs.isdir(path))

    def makedirs(self, relative: str = "") -> None:
        if self.local:
            os.makedirs(self.path(relative), exist_ok=True)
