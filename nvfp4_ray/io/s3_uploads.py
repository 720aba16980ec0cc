"""Atomic writes to S3: one PUT for a small body, else a multipart upload fed as the body
comes, several parts in flight, completed or aborted; and the abort of the uploads a
killed run left behind (they hold storage, invisible, until aborted)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from nvfp4_ray.io.range_reads import clamp_split

# Multipart uploads: up to PARTS_IN_FLIGHT parts per object at once, each at least S3's
# minimum part size (5 MiB); bodies under two parts go up in one PUT. At most 32 MiB a
# part: an upload holds at most 512 MiB, and S3's 10,000 parts still allow 312 GiB.
_PART_SIZE = (5 << 20, 32 << 20)
PARTS_IN_FLIGHT = 16


def upload(store, relative: str, parts: Iterable, size: int | None) -> None:
    """One PUT for a body of one part; otherwise a multipart upload, fed as the parts
    come, several in flight. The object only becomes visible once the upload completes;
    a failure aborts it (and what a killed writer leaves, the next run's abort_uploads).
    Only the requests' failures are storage errors of DEST: an error of ``parts`` (a
    source read, a NaN found in a copied tensor) goes through as it is."""
    path = store.path(relative)
    part_size = clamp_split(size, PARTS_IN_FLIGHT, _PART_SIZE) if size else _PART_SIZE[1]
    pieces = _pieces(parts, part_size)
    first, second = next(pieces), next(pieces, None)
    if second is None:
        with store.requests(relative):
            store.fs.pipe_file(path, bytes(first))
        return
    bucket, key, _ = store.fs.split_path(path)
    target = dict(Bucket=bucket, Key=key)
    with store.requests(relative):
        upload_id = store.fs.call_s3("create_multipart_upload", **target)["UploadId"]

    def put(number: int, body: bytearray) -> dict:
        with store.requests(relative):
            reply = store.fs.call_s3("upload_part", **target, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": reply["ETag"]}

    try:
        bodies = itertools.chain([first, second], pieces)
        del first, second  # each piece is held only until its part is sent
        with ThreadPoolExecutor(PARTS_IN_FLIGHT) as pool:
            sent: list = []
            for number, body in enumerate(bodies, 1):
                for future in sent:
                    if future.done() and future.exception() is not None:
                        future.result()  # a part failed: stop reading, abort
                pending = [future for future in sent if not future.done()]
                if len(pending) >= PARTS_IN_FLIGHT:  # the next piece waits: memory stays bounded
                    wait(pending, return_when=FIRST_COMPLETED)
                sent.append(pool.submit(put, number, body))
                del body
            done = [future.result() for future in sent]
        with store.requests(relative):
            store.fs.call_s3("complete_multipart_upload", **target, UploadId=upload_id, MultipartUpload={"Parts": done})
    except BaseException:
        try:
            store.fs.call_s3("abort_multipart_upload", **target, UploadId=upload_id)
        except Exception:  # unreachable now: the next run's abort_uploads removes it
            pass
        raise


def abort_uploads(store, ours: Callable[[str], bool]) -> int:
    """Abort the unfinished multipart uploads under ``store`` whose name (relative to it)
    ``ours`` accepts: left by a run that was killed, or whose abort could not reach the
    store. How many there were."""
    prefix = store.root[len(store.bucket) :].strip("/")
    prefix = f"{prefix}/" if prefix else ""
    aborted = 0
    marker: dict = {}
    with store.requests():
        while True:
            page = store.fs.call_s3("list_multipart_uploads", Bucket=store.bucket, Prefix=prefix, **marker)
            for unfinished in page.get("Uploads", []):
                if not ours(unfinished["Key"][len(prefix) :]):
                    continue
                store.fs.call_s3(
                    "abort_multipart_upload", Bucket=store.bucket, Key=unfinished["Key"], UploadId=unfinished["UploadId"]
                )
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


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
