"""Committed versions at DEST: retention, garbage collection and rollback.

Every commit records its manifest in ``.nvfp4/versions/<version>.json`` and a copy of its
small files (config.json, index, recipe, tokenizer files) in ``.nvfp4/versions/<version>/``.
Unit files are shared between versions whenever their keys are equal, so keeping a
version costs only the files it does not share. Rolling back rewrites the small files of
an older version, index last, then its manifest and ``_SUCCESS``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

from nvfp4_ray.errors import InputError
from nvfp4_ray.io import destination
from nvfp4_ray.io.storage import Store

VERSIONS = f"{destination.STATE_DIR}/versions"
CALIBRATION = f"{destination.STATE_DIR}/calibration"
UNIT_FILE = re.compile(r"^model-(layer|other|input-scales)-.*\.safetensors$")


def new_version_id(fingerprint_digest: str) -> str:
    """Sortable by time: 20261123T071502.123Z-1a2b3c4d."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z-{fingerprint_digest[:8]}"


def success_marker(version: str, manifest_bytes: bytes) -> bytes:
    return json.dumps({"version": version, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}).encode()


def save_version(dest: Store, version: str, manifest_bytes: bytes, small: dict[str, bytes]) -> None:
    for name, data in small.items():
        dest.write_bytes(f"{VERSIONS}/{version}/{name}", data)
    dest.write_bytes(f"{VERSIONS}/{version}.json", manifest_bytes)


def list_versions(dest: Store) -> list[str]:
    """Committed versions, oldest first."""
    return sorted(name.removesuffix(".json") for name in dest.list_files(VERSIONS) if name.endswith(".json"))


def current_version(dest: Store) -> str | None:
    try:
        return json.loads(dest.read_text(destination.SUCCESS))["version"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def load_manifest(dest: Store, version: str) -> dict:
    try:
        return json.loads(dest.read_text(f"{VERSIONS}/{version}.json"))
    except FileNotFoundError:
        known = ", ".join(list_versions(dest)) or "none"
        raise InputError(f"DEST {dest.display()} has no version {version!r} (versions: {known})") from None


def collect_garbage(dest: Store, retention: int) -> None:
    """Keep the current version and the ``retention`` newest others; delete the rest and
    every unit file, completion record and calibration statistics no kept version uses,
    and every hidden-state folder but the current version's snapshots."""
    current = current_version(dest)
    others = [v for v in list_versions(dest) if v != current]
    kept = others[len(others) - retention :] if retention else []
    if current is not None:
        kept.append(current)
    for version in others:
        if version not in kept:
            dest.delete(f"{VERSIONS}/{version}")
            dest.delete(f"{VERSIONS}/{version}.json")
    manifests = [load_manifest(dest, version) for version in kept]
    files = {name for manifest in manifests for name in manifest.get("files", {})}
    keys = {key for manifest in manifests for key in (manifest.get("calibration") or {}).get("keys") or []}
    current_calibration = (load_manifest(dest, current).get("calibration") or {}) if current is not None else {}
    snapshots = set(current_calibration.get("snapshots") or [])
    for name in dest.list_files(""):
        if UNIT_FILE.match(name) and name not in files:
            dest.delete(name)
    for record in dest.list_files(f"{destination.STATE_DIR}/units"):
        key = record.removesuffix(".json")
        if not any(name.endswith(f"-{key}.safetensors") for name in files):
            dest.delete(f"{destination.STATE_DIR}/units/{record}")
    for name in dest.list_files(CALIBRATION):  # per-layer statistics: tiny, kept for re-runs
        if name.removesuffix(".json") not in keys:
            dest.delete(f"{CALIBRATION}/{name}")
    for folder in _subfolders(dest, CALIBRATION):  # hidden states: the current version's snapshots stay
        if folder not in snapshots:
            dest.delete(f"{CALIBRATION}/{folder}")


def _subfolders(dest: Store, relative: str) -> list[str]:
    try:
        entries = dest.fs.ls(dest.path(relative), detail=True)
    except FileNotFoundError:
        return []
    return [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory"]


def rollback(dest: Store, version: str | None = None) -> dict:
    """Make ``version`` (default: the one committed before the current one) current again."""
    current = current_version(dest)
    if current is None:
        raise InputError(f"DEST {dest.display()} holds no committed checkpoint to roll back")
    versions = list_versions(dest)
    if version is None:
        older = [v for v in versions if v < current]
        if not older:
            raise InputError(f"DEST {dest.display()} keeps no version older than {current}")
        version = older[-1]
    manifest = load_manifest(dest, version)
    small = {}
    for name, info in manifest["files"].items():
        if UNIT_FILE.match(name):
            if not dest.exists(name) or dest.info(name).size != info["size"]:
                raise InputError(f"version {version} cannot be restored: its file {name} is no longer at DEST")
        else:
            small[name] = dest.read_bytes(f"{VERSIONS}/{version}/{name}")
    leftovers = [
        name for name in load_manifest(dest, current).get("files", {}) if not UNIT_FILE.match(name) and name not in small
    ]  # small files of the current version that the restored one does not have (written by nvfp4-ray)
    dest.delete(destination.SUCCESS)  # no checkpoint while the small files change
    for name in leftovers:
        dest.delete(name)
    for name, data in small.items():
        if name != destination.INDEX:
            dest.write_bytes(name, data)
    dest.write_bytes(destination.INDEX, small[destination.INDEX])
    manifest_bytes = dest.read_bytes(f"{VERSIONS}/{version}.json")
    dest.write_bytes(destination.MANIFEST, manifest_bytes)
    dest.write_bytes(destination.SUCCESS, success_marker(version, manifest_bytes))
    return {"status": "rolled_back", "dest": dest.display(), "version": version, "previous": current}
