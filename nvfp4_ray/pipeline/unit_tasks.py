"""The Ray tasks that move bytes, and the unit write the workers share with them.

  read_tensors_task  reads tensors of an object-store SOURCE once on a node; the result
                     stays in that node's object store, shared zero-copy by its processes
  read_ahead_task    reads later layers of a local SOURCE into a node's page cache and drops
                     the bytes: the disk keeps going while the workers start and compute
  copy_unit_task     copies tensors outside the decoder layers, byte for byte
  write_unit         a unit file and its completion record (a worker's write threads too)
  retrying           a worker's write tried again after a storage hiccup (write_retrying:
                     a unit's; the hidden-state snapshots' files too)
"""

from __future__ import annotations

import errno
import sys
import time
from contextlib import contextmanager

import ray

from nvfp4_ray.errors import InputError, JobError
from nvfp4_ray.io import destination
from nvfp4_ray.io.shards import CopiedShard, TensorShard
from nvfp4_ray.io.storage import Store, redact
from nvfp4_ray.io.tensors import TensorBundle, read_tensors

# Storage hiccups (resets, throttling, timeouts) surface as OSError subclasses: retry those.
# InputError (a broken source) and JobError (e.g. a full disk) are never retried.
RETRYABLE = (OSError, ConnectionError, TimeoutError)
RETRIES = 4
RETRY = dict(max_retries=RETRIES, retry_exceptions=list(RETRYABLE))
_HOPELESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_unit(dest: Store, key: str, shard: TensorShard | CopiedShard):
    """Write a unit's file (``shard.name``) and its completion record."""
    with dest_write_errors(dest, shard.name):
        dest.write_parts(shard.name, shard.parts(), size=shard.size)
        destination.save_done(dest, key, shard.written)
    return shard.written


def write_retrying(dest: Store, key: str, shard: TensorShard):
    """write_unit, tried again after a storage hiccup, as Ray retries a task."""
    return retrying(dest.display(shard.name), lambda: write_unit(dest, key, shard))


def retrying(what: str, write):
    """``write()``, tried again after a storage hiccup (RETRIES times, waiting 0.5 to 4 s);
    each retry is a line in the process's stderr (a worker's log), naming ``what``."""
    for attempt in range(RETRIES + 1):
        try:
            return write()
        except RETRYABLE as exc:
            if attempt == RETRIES:
                raise
            pause = min(4.0, 0.5 * 2**attempt)
            warning = f"nvfp4-ray: warning: writing {what} failed ({exc}); retry {attempt + 1} of {RETRIES} in {pause} s"
            print(redact(warning), file=sys.stderr, flush=True)
            time.sleep(pause)


@contextmanager
def dest_write_errors(dest: Store, file_name: str):
    """Storage errors that a retry cannot fix (full disk, read-only or forbidden DEST) fail
    the job at once, naming the file."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _HOPELESS:
            raise JobError(
                f"cannot write {dest.display(file_name)}: {exc.strerror}; fix DEST and run the same command again to resume"
            ) from None
        raise


@ray.remote(num_cpus=0, **RETRY)
def read_tensors_task(source_url: str, tensors: list) -> TensorBundle:
    return read_tensors(Store(source_url), tensors)


@ray.remote(num_cpus=0, max_retries=0)
def read_ahead_task(source_url: str, reads: list) -> None:
    """Nobody takes its result: a failure (say, a file gone) is left to the real read, which
    names it, rather than to Ray's log of unhandled task errors."""
    try:
        Store(source_url).read_ahead(reads)
    except OSError:
        pass


@ray.remote(num_cpus=0, **RETRY)
def copy_unit_task(file_name: str, key: str, tensors: list, source_url: str, dest_url: str):
    """Plain arguments, not the plan's CopyUnit: unpickling that would import the planner,
    and with it torch and transformers (seconds of a cold start, in a process that copies bytes)."""
    return write_unit(Store(dest_url), key, CopiedShard(file_name, Store(source_url), tensors))


def task_error(error: Exception) -> Exception:
    """What to raise for a failed task: the InputError, JobError or OSError it raised (an
    OSError, say a full disk under a worker's hidden-state snapshot, reaches the CLI as a
    storage error, which says that the same command resumes), else a JobError with the
    last line of Ray's report."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, (InputError, JobError, OSError)):
        return cause
    lines = [line for line in str(error).splitlines() if line.strip()]
    return JobError(redact(f"a task failed: {lines[-1] if lines else type(error).__name__}"))

