"""Commit: the small files that make DEST a checkpoint, written after every unit file.

Order: the small files are prepared first (checkpoint_files), and the optional quality
evaluation runs on them beside DEST's unit files, so that an old checkpoint stays in place
meanwhile. Then ``_SUCCESS`` of a checkpoint being replaced is deleted, so that DEST reads as
"no checkpoint" while its small files change (several files cannot be swapped at once on
an object store: the window lasts a few writes); then config.json, recipe.yaml and the
copied tokenizer/processor files; then the index: write_checkpoint. Then commit:
manifest.json (with the quality report) and its copy under .nvfp4/versions; then
``_SUCCESS``, created exclusively. Files that no retained version
uses are deleted last (io/versions.py); files that nvfp4-ray did not write are never touched.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

from nvfp4_ray import __version__
from nvfp4_ray.errors import JobError
from nvfp4_ray.io import destination, versions
from nvfp4_ray.io.shards import WrittenFile
from nvfp4_ray.io.storage import Store
from nvfp4_ray.pipeline.plan import Plan, digest


def checkpoint_files(plan: Plan, files: list[WrittenFile]) -> dict[str, bytes]:
    """Every small file a loader needs besides the unit files (name -> bytes), the index among them."""
    small: dict[str, bytes] = {
        "config.json": plan.config_json,
        "recipe.yaml": plan.recipe.yaml_text.encode("utf-8"),
    }
    with ThreadPoolExecutor(8) as pool:
        names = sorted(plan.source.copied_files)
        for name, data in zip(names, pool.map(plan.source.store.read_bytes, names)):
            small[name] = data
    if plan.config.write_preprocessor_config and "preprocessor_config.json" not in small:
        # transformers 5 keeps the image processor inside processor_config.json; vLLM's
        # Mistral3 loader still reads preprocessor_config.json
        block = json.loads(small["processor_config.json"])["image_processor"]
        small["preprocessor_config.json"] = (json.dumps(block, indent=2, sort_keys=True) + "\n").encode("utf-8")
    weight_map, total = {}, 0
    for written in files:
        for tensor, size in written.tensors.items():
            weight_map[tensor] = written.name
            total += size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    small[destination.INDEX] = (json.dumps(index, indent=2, sort_keys=False) + "\n").encode("utf-8")
    return small


def write_checkpoint(plan: Plan, small: dict[str, bytes]) -> None:
    """The small files at DEST, index last, once the old ``_SUCCESS`` is withdrawn."""
    dest = Store(plan.config.dest)
    dest.delete(destination.SUCCESS)  # a replace (checked at planning): withdraw the old one first
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: dest.write_bytes(*item), [item for item in small.items() if item[0] != destination.INDEX]))
    dest.write_bytes(destination.INDEX, small[destination.INDEX])


def commit(
    plan: Plan, files: list[WrittenFile], small: dict[str, bytes], calibration: dict | None, report: dict,
    quality: dict | None = None,
) -> dict:
    """The manifest, then _SUCCESS: from here on DEST holds a finished checkpoint."""
    dest = Store(plan.config.dest)
    version = versions.new_version_id(digest(plan.fingerprint))
    manifest = {
        "version": version,
        "tool": {"name": "nvfp4-ray", "version": __version__},
        "source": plan.source.store.display(),
        "fingerprint": plan.fingerprint,
        "files": {
            **{w.name: {"size": w.size, "sha256": w.sha256} for w in files},
            **{name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in small.items()},
        },
        "calibration": calibration,
        "report": report,
        "quality": quality,
    }
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    dest.write_bytes(destination.MANIFEST, manifest_bytes)
    versions.save_version(dest, version, manifest_bytes, small)
    marker = versions.success_marker(version, manifest_bytes)
    if not dest.create_exclusive(destination.SUCCESS, marker):
        raise JobError(
            f"another run committed a checkpoint at {dest.display()} while this one was committing, and this run "
            "may have rewritten some of its small files; run one of them again to make DEST consistent"
        )
    versions.collect_garbage(dest, plan.config.retention)
    return manifest
