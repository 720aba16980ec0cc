"""Reads, device loads and unit writes of the decoder layers, run ahead within budgets.

For each layer, in order:
  read   as layer_reads.py says: into the object store of each node that needs it, or
         (local SOURCE) into its page cache, within budgets;
  load   onto each worker that needs it: its owner (worker ``index % workers``), which
         quantizes it from the device copy when its unit is not done yet, and every
         calibration worker when the layer is calibrated in this run, which keeps it on
         the device for run_layer; calibrated layers load at most ``ahead`` layers past the one
         being calibrated (GPU memory), layers that are only quantized as reads allow;
  write  by the owner, from its write threads, as soon as it has quantized the layer;
         its ``written`` call returns the unit's file.
The tensors outside the decoder layers (embeddings, lm_head: 2.1 GB on the 8B model) are
copied by tasks started once the workers are up: started with the job, their disk traffic
slowed the workers' cold imports (H200: 33.0 s against 27.7 s, probes 1003/1005).
"""

from __future__ import annotations

import ray

from nvfp4_ray.io.tensors import LocalRead
from nvfp4_ray.pipeline.device_memory import MAX_AHEAD
from nvfp4_ray.pipeline.layer_reads import LayerReads, LayerState
from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.unit_tasks import copy_unit_task

LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WorkerLost(Exception):
    def __init__(self, worker: int, error: Exception):
        super().__init__(f"worker {worker} lost: {type(error).__name__}")
        self.worker, self.error = worker, error


def lost_worker_error(error: Exception) -> bool:
    """Whether a call failed because a worker died (directly, or through a task input)."""
    return isinstance(error, LOST) or isinstance(getattr(error, "cause", None), LOST)


def _raise_failed_load(ref) -> None:
    """A load's error, unless its worker died (its stand-in loads the layer again). A load
    whose read failed never ran: nothing else would report it, and the worker would wait
    for the layer for ever."""
    try:
        ray.get(ref)
    except Exception as exc:
        if not lost_worker_error(exc):
            raise


class LayerFlow(LayerReads):
    """The layers' reads (LayerReads), then their loads onto the workers and their writes,
    driven by ``pump`` and ``poll``; a lost worker's layers go to its stand-in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # LayerReads' arguments
        self.ahead_loads = MAX_AHEAD  # calibrated layers loaded past the one computing (device_memory.py)
        self.copies: list = []  # the copy units' tasks, once the workers are up

    def start(self, workers: list, calibrate_from: int) -> None:
        """The workers are up; layers before ``calibrate_from`` already have statistics."""
        self.workers = list(workers)
        self.calibrate_from = calibrate_from if self.calibration_workers else len(self.units)
        read, cached = set(self.todo[: self.next]), set(self.todo[: self.ahead])
        self.todo = [i for i in self.todo if self.units[i].key not in self.done_keys or i >= self.calibrate_from]
        # positions in the shorter list: the layers read (or read ahead) so far are still a prefix of it
        self.next, self.ahead = sum(i in read for i in self.todo), sum(i in cached for i in self.todo)
        for index in list(self.layers):
            if index not in self.todo:  # read for a calibration that resumes later
                del self.layers[index]
        config = self.plan.config
        copy_units = [unit for unit in self.plan.copy_units if unit.key not in self.done_keys]
        for i, unit in enumerate(copy_units):  # each on a worker's node in turn
            task = copy_unit_task.options(**Placement.on_node(self.nodes[i % len(self.nodes)]))
            self.copies.append(task.remote(unit.file, unit.key, unit.tensors, config.source, config.dest))

    def load_call(self, actor, index: int, read, keep: bool, output=None):
        """``actor``'s load of layer ``index`` from ``read`` (``read_layer``'s result on its
        node, read before or after the layer was split in parts, or None)."""
        unit, source = self.units[index], self.plan.config.source
        if index not in self.parts:
            tensors = LocalRead(source, unit.tensors) if read is None else read
            return actor.load.remote(index, tensors, dict(unit.spec.tensors), keep, output)
        parts = []
        for number, part in enumerate(self.parts[index]):
            names = [tensor.name for tensor in part]
            tensor_names = self.part_tensor_names(index, number)
            if read is None:
                parts.append((LocalRead(source, part), None, tensor_names))
            elif isinstance(read, list):
                parts.append((read[number], None, tensor_names))
            else:  # read whole before the plan split it: the worker takes the part's tensors
                parts.append((read, names, tensor_names))
        return actor.load_in_parts.remote(index, parts, keep, output, index not in self.groups)

    def part_tensor_names(self, index: int, part: int) -> dict:
        """Checkpoint name -> parameter name inside the layer, of one part's tensors."""
        names = self.units[index].spec.tensors
        return {t.name: names[t.name] for t in self.parts[index][part] if t.name in names}

    # ---- the flow ------------------------------------------------------------------------
    def pump(self, current: int | None) -> None:
        """Start reads within the budgets (``read_within``), then the loads that may go ahead
        of layer ``current``, the one being calibrated."""
        self.read_within(current)
        if not self.workers:
            return
        for index, layer in sorted(self.layers.items()):
            if self.calibrated(index) and (current is None or index > current + self.ahead_loads):
                break
            if not layer.loaded:
                self._load(layer, self._loaders(layer))

    def _loaders(self, layer: LayerState) -> list[int]:
        loaders = set(range(self.calibration_workers)) if self.calibrated(layer.index) else set()
        if layer.quantize:
            loaders.add(self.owner(layer.index))
        return sorted(loaders)

    def _load(self, layer: LayerState, workers: list[int], again: bool = False) -> None:
        """Load ``layer`` onto ``workers``; ``again``: onto a lost worker's stand-in."""
        unit = self.units[layer.index]
        for worker in workers:
            node = self.nodes[worker]
            keep = self.calibrated(layer.index) and worker < self.calibration_workers
            owner = layer.quantize and worker == self.owner(layer.index)
            output = (unit.spec, unit.file, unit.key, self.plan.config.dest) if owner else None  # quantized and written
            read, streamed = None, False
            if self.local:
                self._count_read(layer.index, node)
            elif again and layer.index in self.parts and node not in layer.reads:
                # every part read again for the new worker: a stream may have released the first ones
                self.reads_per_node[node] += 1
                read = self.read_layer(node, layer.index)
            else:
                if node not in layer.reads and node not in layer.streams:
                    self._read_on(layer, node)
                if node in layer.streams:
                    self.streams.load(layer, worker, keep, output)
                    streamed = True
                else:
                    read = layer.reads[node]
            if not streamed:
                ref = self.load_call(self.workers[worker], layer.index, read, keep, output)
                layer.loads[worker] = ref
                self.pending[ref] = ("load", layer, worker)
            layer.calibrating |= keep
            if owner:
                layer.write = self.workers[worker].written.remote(layer.index)
                self.pending[layer.write] = ("write", layer, worker)
        if not layer.loaded:
            self.loading += 1
        layer.loaded = True

    def loads_to_come(self, index: int) -> list:
        """The loads in flight of layer ``index`` while a worker has parts of it still to be
        given (part_streams.py: a part's load is submitted once its read is); [] once every
        load of the layer is submitted."""
        layer = self.layers.get(index)
        return list(layer.loads.values()) if layer is not None and self.streams.to_give(layer) else []

    def busy(self) -> bool:
        return bool(self.layers) or self.next < len(self.todo)

    def poll(self, block: bool) -> list:
        """The unit files written since the last call (waiting for at least one event if
        ``block``); the reads of a layer are released once all its loads have finished.
        Raises WorkerLost when a write failed because its worker died."""
        if not self.pending:
            return []
        refs = list(self.pending)
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0, fetch_local=False)
        written = []
        for ref in ready:
            kind, layer, worker = self.pending.pop(ref)
            if kind == "ahead":  # its result is not taken: a failure is the real read's to report
                self.reading_ahead -= 1
                continue
            if kind == "read":
                layer.reading -= 1
                continue
            if kind in ("load", "part"):
                _raise_failed_load(ref)
            if kind == "load":
                del layer.loads[worker]
                if not layer.loads:
                    layer.reads = {}
            elif kind == "part":
                self.streams.loaded(layer, worker, ref)
            else:
                layer.write = None
                try:
                    written.append(ray.get(ref))
                except Exception as exc:
                    if lost_worker_error(exc):
                        raise WorkerLost(worker, exc) from None
                    raise
                layer.quantize = False
            if layer.finished:
                del self.layers[layer.index]
        return written

    def done_calibrating(self, index: int) -> None:
        layer = self.layers[index]
        layer.calibrating = False
        if layer.finished:
            del self.layers[index]

    def replace_worker(self, worker: int, actor, node: str) -> None:
        """A lost worker's stand-in takes over: the layers it still had to quantize, and the
        ones it held (or was loading) for calibration, are loaded onto it again."""
        self.workers[worker], self.nodes[worker] = actor, node
        for ref, (kind, layer, owner) in list(self.pending.items()):
            if owner == worker:
                del self.pending[ref]
                if kind == "load":
                    del layer.loads[worker]
                elif kind == "part":
                    self.streams.forget(layer, ref)
                else:
                    layer.write = None
        self.streams.lost(worker)
        for layer in sorted(self.layers.values(), key=lambda layer: layer.index):
            redo = (layer.quantize and self.owner(layer.index) == worker and layer.write is None) or (
                layer.calibrating and worker < self.calibration_workers
            )
            if layer.loaded and redo:
                self._load(layer, [worker], again=True)
