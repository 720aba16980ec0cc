"""``nvfp4-ray export DEST TARGET``: copy exactly the checkpoint committed at DEST.

DEST holds more than the checkpoint: the job's state (``.nvfp4/``: completion records,
calibration statistics, hidden-state snapshots, kept versions) and, with ``--retention``,
the unit files of earlier versions beside the current ones. Publishing DEST as it is
(``aws s3 sync``, ``huggingface-cli upload``) would publish all of that. Export copies the
files the current version's manifest lists, then ``manifest.json``, then a ``_SUCCESS``
marker equal to DEST's: a TARGET without ``_SUCCESS`` holds an export cut short, and a
TARGET with it is itself a committed checkpoint (it can be exported again).

DEST is left as it is, rather than laid out with the old versions elsewhere: resume,
retention and rollback rely on unit files shared by versions under one name.

Every file is hashed while it is copied and checked against the manifest's sha256 before
it appears at TARGET, so a DEST changed meanwhile (a commit, a rollback) cannot leave a
mixed checkpoint that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time

from nvfp4_ray.errors import InputError, JobError
from nvfp4_ray.io.destination import INDEX, MANIFEST, STATE_DIR, SUCCESS
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.storage_errors import StorageError, as_input_errors

CHUNK = 64 << 20  # bytes read from DEST per request batch (cut into pieces and read concurrently)
PROBE = ".nvfp4-export-probe"  # written and deleted before any copy, to find an unwritable TARGET


def export(dest_url: str, target_url: str, events=None) -> dict:
    """Copy DEST's committed checkpoint to TARGET; the summary. Bad input raises InputError
    before anything is written; a failed copy raises JobError or OSError (run again)."""
    from nvfp4_ray.pipeline.events import Events

    events = events or Events("text")
    started = time.monotonic()
    dest, target = Store(dest_url), Store(target_url)
    with as_input_errors():  # credentials, missing buckets, unreachable stores: before any work
        marker, manifest_bytes = _committed(dest)
        files = json.loads(manifest_bytes)["files"]
        _check_target(dest, target, set(files))
    names = sorted(files, key=lambda name: (name == INDEX, name))  # the index last, as in a commit
    events.progress("export", len(names) + 1, unit="file")
    for name in names:
        _copy(dest, target, name, files[name]["size"], files[name]["sha256"])
        events.advance("export")
    target.write_bytes(MANIFEST, manifest_bytes)
    events.advance("export")
    if not target.create_exclusive(SUCCESS, marker):
        raise JobError(f"TARGET {target.display()} got a _SUCCESS from another writer while this export ran")
    events.close_progress("export")
    return {
        "status": "exported",
        "dest": dest.display(),
        "target": target.display(),
        "version": json.loads(marker)["version"],
        "files": len(names) + 1,
        "bytes": sum(info["size"] for info in files.values()) + len(manifest_bytes),
        "total_s": round(time.monotonic() - started, 3),
    }


def _committed(dest: Store) -> tuple[bytes, bytes]:
    """DEST's ``_SUCCESS`` and the manifest it names (checked by its sha256)."""
    if not dest.exists(""):
        raise InputError(f"DEST {dest.display()} does not exist")
    if not dest.exists(SUCCESS):
        raise InputError(
            f"DEST {dest.display()} holds no committed checkpoint (no {SUCCESS}): its run has not finished, "
            "or it is not an nvfp4-ray output"
        )
    marker = dest.read_bytes(SUCCESS)
    try:
        expected = json.loads(marker)["manifest_sha256"]
        manifest_bytes = dest.read_bytes(MANIFEST)
        files = json.loads(manifest_bytes)["files"]
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        raise InputError(f"DEST {dest.display()} has no readable {SUCCESS} and {MANIFEST}") from None
    if hashlib.sha256(manifest_bytes).hexdigest() != expected:
        raise JobError(
            f"DEST {dest.display()}: {MANIFEST} is not the one {SUCCESS} names (a commit or rollback is under way?); "
            "run the same command again once it has finished"
        )
    for name in files:  # DEST's own manifest, but what it names is written outside DEST's state
        clean = posixpath.normpath(name)
        if clean != name or name.startswith(("/", "../", f"{STATE_DIR}/")) or name in (MANIFEST, SUCCESS):
            raise InputError(f"DEST {dest.display()}: {MANIFEST} names a file outside the checkpoint: {name!r}")
    return marker, manifest_bytes


def _check_target(dest: Store, target: Store, wanted: set[str]) -> None:
    """TARGET must be new or empty, or hold an export of this checkpoint cut short (no
    ``_SUCCESS``, only the checkpoint's own file names), which is then completed. Never DEST
    or a folder inside it."""
    if type(target.fs) is type(dest.fs) and (target.root + "/").startswith(dest.root.rstrip("/") + "/"):
        raise InputError(f"TARGET {target.display()} is DEST or inside it; choose a TARGET outside DEST")
    if target.exists("") and not target.isdir(""):
        raise InputError(f"TARGET {target.display()} exists and is not a directory")
    allowed = wanted | {MANIFEST, PROBE}
    try:  # uploads or temporary files of an export that was killed: invisible, but stored
        target.abort_uploads(lambda name: name in allowed)
    except StorageError:
        pass  # not allowed to list uploads: a bucket lifecycle rule has to clean those up
    try:
        entries = target.fs.ls(target.path(""), detail=True)
    except FileNotFoundError:
        entries = []
    found = sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries)
    unfinished = SUCCESS not in found and all(
        entry["type"] == "file" and posixpath.basename(entry["name"]) in allowed for entry in entries
    )
    if found and not unfinished:
        raise InputError(
            f"TARGET {target.display()} is not empty (found {', '.join(found[:3])}); choose a new or empty TARGET"
        )
    try:
        target.write_bytes(PROBE, b"ok")
        target.delete(PROBE)
    except (StorageError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"TARGET {target.display()} is not writable: {reason}") from None


def _copy(dest: Store, target: Store, name: str, size: int, sha256: str) -> None:
    """One file, DEST to TARGET, streamed through one buffer; it appears at TARGET only if
    its bytes are the ones the manifest names."""

    def chunks():
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(min(size, CHUNK)))
        for start in range(0, size, CHUNK):
            view = buffer[: min(size, start + CHUNK) - start]
            dest.read_into(name, [(start, start + len(view))], view)
            digest.update(view)
            yield view  # written or copied before the next read refills the buffer
        if digest.hexdigest() != sha256:  # raised inside the write: the file never appears
            raise JobError(changed)

    changed = (
        f"DEST {dest.display(name)} is no longer the file its manifest names (a commit, rollback or clean-up ran "
        f"meanwhile?); TARGET has no {SUCCESS}; run the same command again"
    )
    try:
        target.write_parts(name, chunks(), size=size)
    except FileNotFoundError:
        if not dest.exists(name):
            raise JobError(changed) from None
        raise
