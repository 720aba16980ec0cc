"""One directory-like location (a local path or any fsspec URL such as ``s3://bucket/prefix``).

Everything the job reads or writes goes through :class:`Store`, so local disks and object
stores behave the same: byte-range reads with many requests in flight (range_reads.py),
whole-object writes that are atomic (a local file is written under a temporary name and
renamed; an object only appears once its upload, multipart with concurrent parts for
large bodies, completes: s3_uploads.py), exclusive creation for the commit marker, and
listing.

Credentials never pass through here: fsspec/s3fs take them from the standard AWS sources
(environment, profiles, instance roles). ``redact`` scrubs secrets from any text we print,
and every failed request on a remote store is translated (storage_errors.py) into one line
that names the location, the reason and the fix.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec

from nvfp4_ray.errors import InputError
from nvfp4_ray.io import range_reads, s3_uploads
from nvfp4_ray.io.storage_errors import error_code, missing_bucket, translate

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """Replace every credential value known to this process, and URL userinfo, with ***."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s]+:[^/@\s]+@", r"\1***@", text)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def storage_options(url: str) -> dict:
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    return {
        # Other processes (Ray workers, an earlier run) change DEST: never answer from a
        # stale listing.
        "use_listings_cache": False,
        # botocore's pool (default 10) caps the requests in flight per process.
        "config_kwargs": {"max_pool_connections": 2 * max(range_reads.REMOTE_READERS, s3_uploads.PARTS_IN_FLIGHT)},
    }


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
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options(self.url))
        except (ImportError, ValueError) as exc:
            raise InputError(f"cannot open {redact(url)}: {exc}") from None
        self.local = not is_remote(url)
        self.bucket = self.root.split("/", 1)[0]

    def __repr__(self) -> str:
        return f"Store({redact(self.url)!r})"

    def __reduce__(self):
        # Ship only the URL to Ray workers; each process builds its own filesystem client.
        return (Store, (self.url,))

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def display(self, relative: str = "") -> str:
        return redact(posixpath.join(self.url, relative) if relative else self.url)

    @contextmanager
    def requests(self, relative: str = ""):
        """Turn a remote store's failures into StorageError / StorageUnavailable."""
        if self.local:
            yield
            return
        try:
            yield
        except Exception as exc:
            raise translate(exc, self.display(relative), self.bucket) from None

    # ---- reading -------------------------------------------------------------------
    def exists(self, relative: str) -> bool:
        if self.local:
            return self.fs.exists(self.path(relative))
        path = self.path(relative)
        with self.requests(relative):
            try:
                self.fs.info(path)
            except FileNotFoundError as exc:
                if path == self.bucket or error_code(exc) == "NoSuchBucket":
                    raise missing_bucket(self.display(relative), self.bucket) from None
                return False
        return True

    def isdir(self, relative: str = "") -> bool:
        with self.requests(relative):
            return self.fs.isdir(self.path(relative))

    def info(self, relative: str) -> FileInfo:
        with self.requests(relative):
            raw = self.fs.info(self.path(relative))
        if self.local:
            size = int(raw["size"])
            return FileInfo(size=size, identity=f"size={size};mtime_ns={os.stat(self.path(relative)).st_mtime_ns}")
        return _remote_info(raw)

    def list_infos(self, relative: str = "") -> dict[str, FileInfo]:
        """The files directly inside ``relative`` (no recursion), with what identifies them:
        one listing request on an object store instead of a request per file."""
        base = self.path(relative).rstrip("/")
        if self.local:
            if not os.path.isdir(base):
                return {}
            infos = {}
            for entry in os.scandir(base):
                if entry.is_file():
                    stat = entry.stat()
                    infos[entry.name] = FileInfo(stat.st_size, f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}")
            return dict(sorted(infos.items()))
        with self.requests(relative):
            try:
                entries = self.fs.ls(base, detail=True)
            except FileNotFoundError:
                return {}
        infos = {
            posixpath.basename(entry["name"].rstrip("/")): _remote_info(entry)
            for entry in entries
            if entry.get("type") == "file"
        }
        return dict(sorted(infos.items()))

    def list_files(self, relative: str = "") -> list[str]:
        """Names of the files directly inside ``relative`` (no recursion)."""
        return list(self.list_infos(relative))

    def read_bytes(self, relative: str, start: int | None = None, end: int | None = None) -> bytes:
        with self.requests(relative):
            return self.fs.cat_file(self.path(relative), start=start, end=end)

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_into(self, relative: str, ranges: list[tuple[int, int]], out: memoryview) -> None:
        """Read byte ranges of one file back to back into ``out`` (len == sum of ranges)."""
        self.read_many([(relative, start, end) for start, end in ranges], out)

    def read_many(self, reads: list[tuple[str, int, int]], out: memoryview) -> None:
        """Read ``(file, start, end)`` ranges back to back into ``out``, all at once
        (range_reads.py)."""
        range_reads.read_many(self, reads, out)

    def read_ahead(self, reads: list[tuple[str, int, int]]) -> None:
        """Read ``(file, start, end)`` ranges of local files into the kernel's page cache
        (range_reads.py); nothing on an object store."""
        range_reads.read_ahead(self, reads)

    # ---- writing -------------------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes | bytearray | memoryview) -> None:
        """Write a whole file so that it is either complete or absent."""
        self.write_parts(relative, [data], size=len(memoryview(data).cast("B")))

    def write_parts(self, relative: str, parts: Iterable, durable: bool = True, size: int | None = None) -> None:
        """Write buffers back to back as one file, complete or absent, taking them one at a
        time: an iterator of chunks stays bounded in memory (on S3: the parts of the upload
        in flight). ``size``, the file's length if known, sizes the upload's parts. A local
        file is fsynced before it is renamed into place; ``durable=False`` leaves that to a
        later ``sync`` (many files written, then one wait for the disk), for files that
        nothing trusts before a marker written after that sync. A part is written or
        copied before the next is taken: it may be a buffer that the next one refills."""
        path = self.path(relative)
        if self.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as handle:
                    for part in parts:
                        handle.write(part)
                    handle.flush()
                    if durable:
                        os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        if self._is_s3:
            s3_uploads.upload(self, relative, parts, size)
            return
        body = b"".join(bytes(part) for part in parts)  # other object stores take one body
        with self.requests(relative):
            self.fs.pipe_file(path, body)

    @property
    def _is_s3(self) -> bool:
        return hasattr(self.fs, "call_s3")

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
        with self.requests(relative):
            try:
                # A conditional PUT (If-None-Match: *): of two racing writers, one wins.
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except Exception as exc:
                code = error_code(exc)
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                if code not in ("NotImplemented", "501"):
                    raise
                # A store without conditional writes: check, then write (not race-free).
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
        return True

    def delete(self, relative: str) -> None:
        path = self.path(relative)
        if self.exists(relative):
            with self.requests(relative):
                self.fs.rm(path, recursive=self.fs.isdir(path))

    def makedirs(self, relative: str = "") -> None:
        if self.local:
            os.makedirs(self.path(relative), exist_ok=True)

    def abort_uploads(self, ours: Callable[[str], bool]) -> int:
        """Abort the unfinished multipart uploads under this location whose name (relative
        to it) ``ours`` accepts (s3_uploads.py); how many there were. On a local DEST: the
        temporary files of writes a killed run left behind."""
        if self.local:
            return self._remove_stale_temporaries(ours)
        return s3_uploads.abort_uploads(self, ours) if self._is_s3 else 0

    def _remove_stale_temporaries(self, ours: Callable[[str], bool]) -> int:
        removed = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                final, _, suffix = name.rpartition(".tmp-")
                relative = os.path.relpath(os.path.join(folder, final), self.root).replace(os.sep, "/")
                if final and _TEMPORARY.fullmatch(suffix) and ours(relative):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
        return removed


_TEMPORARY = re.compile(r"[0-9a-f]{8}")  # the suffix write_bytes gives a file while it is written


def _remote_info(raw: dict) -> FileInfo:
    size = int(raw["size"])
    etag = raw.get("ETag") or raw.get("etag") or raw.get("md5") or ""
    return FileInfo(size=size, identity=f"size={size};etag={str(etag).strip(chr(34))}")
