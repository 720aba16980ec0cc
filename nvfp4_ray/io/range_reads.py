"""Byte ranges of a Store's files read with many requests in flight.

One sequential reader saturates neither an NVMe drive nor an object store, which caps
each request's bandwidth (S3: ~100 MB/s), so throughput comes from requests in flight:
each range is cut into pieces, and the pieces of every file are read concurrently, each
into its place in one output buffer. Local files are also read ahead into the kernel's
page cache (``read_ahead``) while the workers compute.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

# Remote pieces are sized to keep up to REMOTE_READERS in flight, but no smaller than
# 2 MiB, where a request's latency would dominate its transfer. Local pieces of 16 MiB:
# a layer crosses to a GPU 64 MiB at a time (worker_loads.PIECE_BYTES), each read by four
# threads.
_LOCAL_CHUNK = 16 << 20
_LOCAL_READERS = 8
_AHEAD_PIECE = 8 << 20
_REMOTE_PIECE = (2 << 20, 8 << 20)
REMOTE_READERS = 32


def clamp_split(total: int, count: int, bounds: tuple[int, int]) -> int:
    """The size that cuts ``total`` into ``count`` pieces, kept within ``bounds``."""
    return min(bounds[1], max(bounds[0], -(-total // count)))


def read_piece_size(total: int) -> int:
    """Bytes per request when reading ``total`` bytes from a remote store."""
    return clamp_split(total, REMOTE_READERS, _REMOTE_PIECE)


def read_many(store, reads: list[tuple[str, int, int]], out: memoryview) -> None:
    """Read ``(file, start, end)`` ranges back to back into ``out``, all at once: each
    range is cut into pieces and the pieces of every file are read concurrently."""
    chunk = _LOCAL_CHUNK if store.local else read_piece_size(sum(end - start for _, start, end in reads))
    pieces = []
    offset = 0
    for relative, start, end in reads:
        for piece_start in range(start, end, chunk):
            piece_end = min(end, piece_start + chunk)
            pieces.append((relative, piece_start, piece_end, offset))
            offset += piece_end - piece_start
    if offset != len(out):
        raise ValueError("ranges do not match the output buffer")
    if store.local:
        _read_local(store, pieces, out)
    else:
        _run(lambda piece, out: _read_remote_piece(store, piece, out), pieces, out, REMOTE_READERS)


def _read_remote_piece(store, piece, out: memoryview) -> None:
    relative, start, end, dst = piece
    with store.requests(relative):
        blob = store.fs.cat_file(store.path(relative), start=start, end=end)
    if len(blob) != end - start:
        raise OSError(f"{store.display(relative)}: short read at byte {start} (file truncated or replaced?)")
    out[dst : dst + len(blob)] = blob


@contextmanager
def _open_local(store, relatives) -> Iterator[dict[str, int]]:
    """Each of the local files ``relatives`` opened once for reading: name -> fd."""
    fds = {}
    try:
        for relative in relatives:
            if relative not in fds:
                fds[relative] = os.open(store.path(relative), os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _read_local(store, pieces: list, out: memoryview) -> None:
    with _open_local(store, [piece[0] for piece in pieces]) as fds:

        def read_piece(piece, out):
            relative, start, end, dst = piece
            view = out[dst : dst + end - start]
            done = 0
            while done < len(view):
                n = os.preadv(fds[relative], [view[done:]], start + done)
                if n == 0:
                    raise OSError(f"{store.display(relative)}: short read at byte {start + done} (file truncated?)")
                done += n

        _run(read_piece, pieces, out, _LOCAL_READERS)


def read_ahead(store, reads: list[tuple[str, int, int]]) -> None:
    """Read ``(file, start, end)`` ranges of local files into the kernel's page cache,
    discarding the bytes: no process holds them afterwards, the kernel may evict them
    under memory pressure, and a later read_many of them is served from memory. Real
    reads, not posix_fadvise(WILLNEED): Linux reads only a read-ahead window (128 KiB
    by default) of each range for that. Object stores have no page cache: nothing to do."""
    if not store.local:
        return
    pieces = [
        (relative, piece, min(end, piece + _AHEAD_PIECE))
        for relative, start, end in reads
        for piece in range(start, end, _AHEAD_PIECE)
    ]
    scratch = threading.local()  # one buffer per reading thread, reused for every piece
    with _open_local(store, [piece[0] for piece in pieces]) as fds:

        def read_piece(piece, _out):
            relative, start, end = piece
            if not hasattr(scratch, "buffer"):
                scratch.buffer = memoryview(bytearray(_AHEAD_PIECE))
            os.preadv(fds[relative], [scratch.buffer[: end - start]], start)  # a short read is the real read's to report

        _run(read_piece, pieces, memoryview(b""), _LOCAL_READERS)


def _run(read_piece, pieces: list, out: memoryview, workers: int) -> None:
    if len(pieces) == 1:
        read_piece(pieces[0], out)
        return
    with ThreadPoolExecutor(min(workers, len(pieces)) or 1) as pool:
        list(pool.map(lambda piece: read_piece(piece, out), pieces))
