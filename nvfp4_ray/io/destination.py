"""The layout of DEST, and what makes a checkpoint there finished.

  DEST/model-*-<key>.safetensors     unit files; a key names exactly what the bytes depend on
  DEST/model.safetensors.index.json  tensor -> file; only files it names are the checkpoint
  DEST/config.json, recipe.yaml, tokenizer & co, manifest.json
  DEST/_SUCCESS                      written last: without it DEST holds no checkpoint
  DEST/.nvfp4/units/<key>.json       completion record of a unit file (size, sha256, identity, tensors)
  DEST/.nvfp4/calibration/...        calibration state persisted for resume
  DEST/.nvfp4/versions/<id>.json     manifests of committed versions (rollback, retention)

Each file appears whole or not at all (Store.write_bytes). A unit counts as done only
when its completion record exists and its file is unchanged since (load_done).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.shards import WrittenFile
from nvfp4_ray.io.storage import Store, redact
from nvfp4_ray.io.storage_errors import StorageError

STATE_DIR = ".nvfp4"
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"


def unit_record(key: str) -> str:
    return f"{STATE_DIR}/units/{key}.json"


def check_dest(dest: Store, overwrite: bool) -> dict | None:
    """Refuse a DEST we must not write into; return the manifest committed there, if any."""
    if dest.exists("") and not dest.isdir(""):
        raise InputError(f"DEST {dest.display()} exists and is not a directory")
    if dest.exists(SUCCESS):
        try:
            return json.loads(dest.read_text(MANIFEST))
        except (FileNotFoundError, ValueError):
            if not overwrite:
                raise InputError(
                    f"DEST {dest.display()} holds a checkpoint without a readable {MANIFEST}; pass --overwrite to replace it"
                ) from None
            return None
    if dest.exists(STATE_DIR) or not dest.exists(""):
        return None  # empty, or an unfinished run of ours: resume
    foreign = [name for name in dest.list_files("") if not name.startswith(".")]
    if foreign and not overwrite:
        raise InputError(
            f"DEST {dest.display()} is not empty and was not written by nvfp4-ray (found {', '.join(foreign[:3])}); "
            "choose another DEST or pass --overwrite"
        )
    return None


def probe_writable(dest: Store) -> None:
    """Fail before any work if DEST cannot be written (permissions, missing bucket, credentials)."""
    name = f"{STATE_DIR}/write-probe"
    try:
        dest.makedirs(STATE_DIR)
        dest.write_bytes(name, b"ok")
        dest.delete(name)
    except InputError:
        raise
    except StorageError as exc:
        raise InputError(f"DEST is not writable: {exc}") from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"DEST {dest.display()} is not writable: {redact(reason)}") from None


def abort_stale_uploads(dest: Store) -> int:
    """Abort multipart uploads of unit files and state under DEST that an earlier run left
    unfinished (killed, or its abort could not reach the store): invisible, but stored and
    billed; on a local DEST, remove such a run's temporary files. Called before this run
    writes anything, so none of its own can be caught, and once every unit is written, for
    the writes of its workers that were lost; names nvfp4-ray never writes are left alone."""

    def ours(name: str) -> bool:
        return name.startswith(f"{STATE_DIR}/") or (name.startswith("model-") and name.endswith(".safetensors"))

    try:
        return dest.abort_uploads(ours)
    except StorageError:
        # Listing uploads needs s3:ListBucketMultipartUploads, which a write-only role may
        # lack; a bucket lifecycle rule (AbortIncompleteMultipartUpload) then cleans up.
        return 0


def load_done(dest: Store, key: str, file_name: str) -> WrittenFile | None:
    """The completion record of a unit, if its file is still the one written then: same
    identity (size and mtime locally, ETag on an object store; records of older versions:
    the size). A file rewritten or altered since is computed again. Re-hashing every file
    would catch bit rot too, at the price of reading all of DEST on every re-run."""
    try:
        record = json.loads(dest.read_text(unit_record(key)))
        identity = record.pop("identity", None)
        written = WrittenFile(**record)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if written.name != file_name:
        return None
    try:
        info = dest.info(file_name)
    except FileNotFoundError:
        return None
    if info.size != written.size or (identity is not None and info.identity != identity):
        return None
    return written


def save_done(dest: Store, key: str, written: WrittenFile) -> None:
    record = {**asdict(written), "identity": dest.info(written.name).identity}
    dest.write_text(unit_record(key), json.dumps(record, sort_keys=True))
