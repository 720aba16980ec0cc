"""One directory-like location (a local path or any fsspec URL such as ``s3://bucket/prefix``).

Everything the job reads or writes goes through :class:`Store`, so local disks and object
stores behave the same: byte-range reads with many requests in flight, whole-object
writes that are atomic (a local file is written under a temporary name and renamed; an
object only appears once its upload, multipart with concurrent parts for large bodies,
completes), exclusive creation for the commit marker, and listing.

Credentials never pass through here: fsspec/s3fs take them from the standard AWS sources
(environment, profiles, instance roles). ``redact`` scrubs secrets from any text we print,
and every failed request on a remote store is translated (storage_errors.py) into one line
that names the location, the reason and the fix.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import re
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.storage_errors import error_code, missing_bucket, translate

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Reads are split into pieces read concurrently: one sequential reader saturates neither
# an NVMe drive nor an object store, which caps each request's bandwidth (S3: ~100 MB/s),
# so throughput comes from requests in flight. Remote pieces are sized to keep up to
# _REMOTE_READERS in flight, but no smaller than 2 MiB, where a request's latency would
# dominate its transfer. Local pieces of 16 MiB: a layer crosses to a GPU 64 MiB at a
# time (worker_loads.PIECE_BYTES), each read by four threads.
_LOCAL_CHUNK = 16 << 20
_LOCAL_READERS = 8
_AHEAD_PIECE = 8 << 20
_REMOTE_PIECE = (2 << 20, 8 << 20)
_REMOTE_READERS = 32
# Multipart uploads: up to _PARTS_IN_FLIGHT parts per object at once, each at least S3's
# minimum part size (5 MiB); bodies under two parts go up in one PUT. At most 32 MiB a
# part: an upload holds at most 512 MiB, and S3's 10,000 parts still allow 312 GiB.
_PART_SIZE = (5 << 20, 32 << 20)
_PARTS_IN_FLIGHT = 16


def _clamp_split(total: int, count: int, bounds: tuple[int, int]) -> int:
    """The size that cuts ``total`` into ``count`` pieces, kept within ``bounds``."""
    return min(bounds[1], max(bounds[0], -(-total // count)))


def read_piece_size(total: int) -> int:
    """Bytes per request when reading ``total`` bytes from a remote store."""
    return _clamp_split(total, _REMOTE_READERS, _REMOTE_PIECE)


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
        "config_kwargs": {"max_pool_connections": 2 * max(_REMOTE_READERS, _PARTS_IN_FLIGHT)},
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
    def _requests(self, relative: str = ""):
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
        with self._requests(relative):
            try:
                self.fs.info(path)
            except FileNotFoundError as exc:
                if path == self.bucket or error_code(exc) == "NoSuchBucket":
                    raise missing_bucket(self.display(relative), self.bucket) from None
                return False
        return True

    def isdir(self, relative: str = "") -> bool:
        with self._requests(relative):
            return self.fs.isdir(self.path(relative))

    def info(self, relative: str) -> FileInfo:
        with self._requests(relative):
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
        with self._requests(relative):
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
        with self._requests(relative):
            return self.fs.cat_file(self.path(relative), start=start, end=end)

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_into(self, relative: str, ranges: list[tuple[int, int]], out: memoryview) -> None:
        """Read byte ranges of one file back to back into ``out`` (len == sum of ranges)."""
        self.read_many([(relative, start, end) for start, end in ranges], out)

    def read_many(self, reads: list[tuple[str, int, int]], out: memoryview) -> None:
        """Read ``(file, start, end)`` ranges back to back into ``out``, all at once: each
        range is cut into pieces and the pieces of every file are read concurrently."""
        chunk = _LOCAL_CHUNK if self.local else read_piece_size(sum(end - start for _, start, end in reads))
        pieces = []
        offset = 0
        for relative, start, end in reads:
            for piece_start in range(start, end, chunk):
                piece_end = min(end, piece_start + chunk)
                pieces.append((relative, piece_start, piece_end, offset))
                offset += piece_end - piece_start
        if offset != len(out):
            raise ValueError("ranges do not match the output buffer")
        if self.local:
            self._read_local(pieces, out)
        else:
            self._run(self._read_remote_piece, pieces, out, _REMOTE_READERS)

    def _read_remote_piece(self, piece, out: memoryview) -> None:
        relative, start, end, dst = piece
        with self._requests(relative):
            blob = self.fs.cat_file(self.path(relative), start=start, end=end)
        if len(blob) != end - start:
            raise OSError(f"{self.display(relative)}: short read at byte {start} (file truncated or replaced?)")
        out[dst : dst + len(blob)] = blob

    @contextmanager
    def _open_local(self, relatives) -> Iterator[dict[str, int]]:
        """Each of the local files ``relatives`` opened once for reading: name -> fd."""
        fds = {}
        try:
            for relative in relatives:
                if relative not in fds:
                    fds[relative] = os.open(self.path(relative), os.O_RDONLY)
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    def _read_local(self, pieces: list, out: memoryview) -> None:
        with self._open_local(piece[0] for piece in pieces) as fds:

            def read_piece(piece, out):
                relative, start, end, dst = piece
                view = out[dst : dst + end - start]
                done = 0
                while done < len(view):
                    n = os.preadv(fds[relative], [view[done:]], start + done)
                    if n == 0:
                        raise OSError(f"{self.display(relative)}: short read at byte {start + done} (file truncated?)")
                    done += n

            self._run(read_piece, pieces, out, _LOCAL_READERS)

    def read_ahead(self, reads: list[tuple[str, int, int]]) -> None:
        """Read ``(file, start, end)`` ranges of local files into the kernel's page cache,
        discarding the bytes: no process holds them afterwards, the kernel may evict them
        under memory pressure, and a later read_many of them is served from memory. Real
        reads, not posix_fadvise(WILLNEED): Linux reads only a read-ahead window (128 KiB
        by default) of each range for that. Object stores have no page cache: nothing to do."""
        if not self.local:
            return
        pieces = [
            (relative, piece, min(end, piece + _AHEAD_PIECE))
            for relative, start, end in reads
            for piece in range(start, end, _AHEAD_PIECE)
        ]
        scratch = threading.local()  # one buffer per reading thread, reused for every piece
        with self._open_local(piece[0] for piece in pieces) as fds:

            def read_piece(piece, _out):
                relative, start, end = piece
                if not hasattr(scratch, "buffer"):
                    scratch.buffer = memoryview(bytearray(_AHEAD_PIECE))
                os.preadv(fds[relative], [scratch.buffer[: end - start]], start)  # a short read is the real read's to report

            self._run(read_piece, pieces, memoryview(b""), _LOCAL_READERS)

    @staticmethod
    def _run(read_piece, pieces: list, out: memoryview, workers: int) -> None:
        if len(pieces) == 1:
            read_piece(pieces[0], out)
            return
        with ThreadPoolExecutor(min(workers, len(pieces)) or 1) as pool:
            list(pool.map(lambda piece: read_piece(piece, out), pieces))

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
            self._upload(relative, parts, size)
            return
        body = b"".join(bytes(part) for part in parts)  # other object stores take one body
        with self._requests(relative):
            self.fs.pipe_file(path, body)

    def _upload(self, relative: str, parts: Iterable, size: int | None) -> None:
        """One PUT for a body of one part; otherwise a multipart upload, fed as the parts
        come, several in flight. The object only becomes visible once the upload completes;
        a failure aborts it (and what a killed writer leaves, the next run's abort_uploads).
        Only the requests' failures are storage errors of DEST: an error of ``parts`` (a
        source read, a NaN found in a copied tensor) goes through as it is."""
        path = self.path(relative)
        part_size = _clamp_split(size, _PARTS_IN_FLIGHT, _PART_SIZE) if size else _PART_SIZE[1]
        pieces = _pieces(parts, part_size)
        first, second = next(pieces), next(pieces, None)
        if second is None:
            with self._requests(relative):
                self.fs.pipe_file(path, bytes(first))
            return
        bucket, key, _ = self.fs.split_path(path)
        upload = dict(Bucket=bucket, Key=key)
        with self._requests(relative):
            upload_id = self.fs.call_s3("create_multipart_upload", **upload)["UploadId"]

        def put(number: int, body: bytearray) -> dict:
            with self._requests(relative):
                reply = self.fs.call_s3("upload_part", **upload, UploadId=upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": reply["ETag"]}

        try:
            bodies = itertools.chain([first, second], pieces)
            del first, second  # each piece is held only until its part is sent
            with ThreadPoolExecutor(_PARTS_IN_FLIGHT) as pool:
                sent: list = []
                for number, body in enumerate(bodies, 1):
                    for future in sent:
                        if future.done() and future.exception() is not None:
                            future.result()  # a part failed: stop reading, abort
                    pending = [future for future in sent if not future.done()]
                    if len(pending) >= _PARTS_IN_FLIGHT:  # the next piece waits: memory stays bounded
                        wait(pending, return_when=FIRST_COMPLETED)
                    sent.append(pool.submit(put, number, body))
                    del body
                done = [future.result() for future in sent]
            with self._requests(relative):
                self.fs.call_s3("complete_multipart_upload", **upload, UploadId=upload_id, MultipartUpload={"Parts": done})
        except BaseException:
            try:
                self.fs.call_s3("abort_multipart_upload", **upload, UploadId=upload_id)
            except Exception:  # unreachable now: the next run's abort_uploads removes it
                pass
            raise

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
        with self._requests(relative):
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
            with self._requests(relative):
                self.fs.rm(path, recursive=self.fs.isdir(path))

    def makedirs(self, relative: str = "") -> None:
        if self.local:
            os.makedirs(self.path(relative), exist_ok=True)

    def abort_uploads(self, ours: Callable[[str], bool]) -> int:
        """Abort the unfinished multipart uploads under this location whose name (relative
        to it) ``ours`` accepts: left by a run that was killed, or whose abort could not
        reach the store. How many there were. On a local DEST: the temporary files of
        writes a killed run left behind."""
        if self.local:
            return self._remove_stale_temporaries(ours)
        if not self._is_s3:
            return 0
        prefix = self.root[len(self.bucket) :].strip("/")
        prefix = f"{prefix}/" if prefix else ""
        aborted = 0
        marker: dict = {}
        with self._requests():
            while True:
                page = self.fs.call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix, **marker)
                for upload in page.get("Uploads", []):
                    if not ours(upload["Key"][len(prefix) :]):
                        continue
                    self.fs.call_s3(
                        "abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
                if not page.get("IsTruncated"):
                    return aborted
                marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

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


def _pieces(parts: Iterable, size: int):
    """The bytes of ``parts`` back to back, cut into pieces of ``size`` (the last shorter;
    at least one piece, empty for an empty file)."""
    buffer, given = bytearray(), False
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            take = min(len(view), size - len(buffer))
            buffer += view[:take]
            view = view[take:]
            if len(buffer) == size:
                yield buffer
                buffer, given = bytearray(), True
    if buffer or not given:
        yield buffer


_TEMPORARY = re.compile(r"[0-9a-f]{8}")  # the suffix write_bytes gives a file while it is written


def _remote_info(raw: dict) -> FileInfo:
    size = int(raw["size"])
    etag = raw.get("ETag") or raw.get("etag") or raw.get("md5") or ""
    return FileInfo(size=size, identity=f"size={size};etag={str(etag).strip(chr(34))}")
