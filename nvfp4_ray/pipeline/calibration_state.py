"""Calibration state at DEST, what a resumed or re-quantizing run starts from:

  DEST/.nvfp4/calibration/<key>.json        a layer's reduced input amax
  DEST/.nvfp4/calibration/<key>/            the hidden states after that layer, one file
                                            per calibration worker's batches
  DEST/.nvfp4/calibration/<key>/_COMPLETE   written last, with every file's sha256

A layer's key chains the samples, every layer up to it and the devices' kernels
(plan.calibration_keys), so a run finds the state of the same computation or none.
Snapshots are taken at a few planned layers, kept after the commit (re-quantization
resumes from the last one before the first changed layer), and every
checkpoint_minutes (crash resume; each such one deleted once a later one is complete).
Everything goes to DEST from one thread, in order (Persister): a layer's statistics
before any snapshot marker after it, which is what a resumed run relies on.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nvfp4_ray.io import versions
from nvfp4_ray.io.storage import Store

CALIBRATION_DIR = versions.CALIBRATION


class Persister:
    """Writes to DEST from a thread of its own, in the order asked; never between two
    layers (a local write is fsynced). A failed write fails the job at the next call."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="persist")
        self.pending: list = []

    def __call__(self, write, *args) -> None:
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            future.result()
        if write is not None:
            self.pending.append(self.pool.submit(write, *args))

    def finish(self) -> None:
        """Every write done (or its error raised)."""
        self.pool.shutdown(wait=True)
        self(None)


def resume_point(dest: Store, keys: list[str], layer_amax: list[dict]) -> tuple[int, int | None]:
    """First layer to calibrate, and the layer whose hidden states to start from (None:
    the embeddings); ``layer_amax`` takes the statistics found for the layers before."""
    first, checkpoint = 0, None
    for index, key in enumerate(keys):
        try:
            layer_amax[index] = json.loads(dest.read_text(f"{CALIBRATION_DIR}/{key}.json"))
        except (FileNotFoundError, ValueError):
            break
        first = index + 1
        if dest.exists(f"{CALIBRATION_DIR}/{key}/_COMPLETE"):
            checkpoint = index
    if first < len(keys):
        first = 0 if checkpoint is None else checkpoint + 1
    return first, checkpoint


@dataclass
class Calibration:
    shares: list[list]  # batches of each calibration worker
    keys: list[str]  # per layer
    first: int  # first layer whose statistics must be computed
    checkpoint: int | None  # last layer whose hidden states are complete at DEST
    devices: list[str]
    kept: set[int]  # layers whose hidden states are kept after the commit
    tokens: int = 0
    compute_s: float = 0.0  # the busiest worker's seconds inside run_layer
    load_wait_s: float = 0.0  # of compute_s, the longest wait for a layer's load (read and copy)
    snapshot_write_s: float = 0.0  # the slowest worker's seconds writing snapshots (beside the layers)
    cuda_graphs: bool = False  # every worker replayed its layers as CUDA graphs to the end
    max_layers_held: int = 0  # the most calibrated layers a worker's device held at once
    gptq_s: dict = field(default_factory=dict)  # GPTQ step -> the busiest worker's seconds in it
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    writing: dict[int, int] = field(default_factory=dict)  # snapshot layer -> workers still writing it
    digests: dict[int, dict] = field(default_factory=dict)  # snapshot layer -> file -> sha256, so far
    done_through: int = -1  # the last layer calibrated

    def folder(self, index: int) -> str:
        return f"{CALIBRATION_DIR}/{self.keys[index]}"

    def wants_snapshot(self, index: int, checkpoint_minutes: float) -> str | None:
        """A folder for the hidden states after layer ``index``: at the planned layers (kept
        for re-quantization) and every ``checkpoint_minutes`` (crash resume)."""
        if index == len(self.keys) - 1:
            return None
        due = time.monotonic() - self.last_checkpoint_time >= checkpoint_minutes * 60
        return self.folder(index) if index in self.kept or due else None

    def layer_done(self, index: int, snapshot: str | None, workers: int) -> None:
        """Layer ``index`` calibrated; ``snapshot``: its hidden states are being written by
        ``workers`` workers."""
        self.done_through = index
        if snapshot is not None:
            self.writing[index] = workers
            self.last_checkpoint_time = time.monotonic()

    def forget_writes(self) -> None:
        """Workers lost: the snapshots they were writing never finish."""
        self.writing.clear()
        self.digests.clear()

    def snapshots_done(self, done: list, dest: Store, persist: Persister) -> None:
        """``done``: (folder, {file: sha256}) of each worker's finished snapshot writes. The
        marker goes last, with every file's digest, once all workers have written theirs;
        the previous snapshot, unless kept, is deleted after it."""
        by_folder = {self.folder(layer): layer for layer in self.writing}
        for folder, digests in done:
            layer = by_folder.get(folder)
            if layer is None:
                continue
            self.digests.setdefault(layer, {}).update(digests)
            self.writing[layer] -= 1
            if self.writing[layer]:
                continue
            del self.writing[layer]
            persist(dest.write_bytes, f"{folder}/_COMPLETE", json.dumps(self.digests.pop(layer), sort_keys=True).encode())
            previous = self.checkpoint
            if previous is None or layer > previous:
                self.checkpoint = layer
                if previous is not None and previous not in self.kept:
                    persist(dest.delete, self.folder(previous))

    def record(self, layer_units: list, layer_amax: list[dict], dest: Store) -> dict:
        """For the manifest, per layer: the calibration key and the reduced amax, and the
        layers whose hidden states stay at DEST."""
        layers = [{"module": u.spec.module, "amax": amax} for u, amax in zip(layer_units, layer_amax)]
        snapshots = [self.keys[i] for i in sorted(self.kept) if dest.exists(f"{self.folder(i)}/_COMPLETE")]
        return {"keys": self.keys, "layers": layers, "snapshots": snapshots}
