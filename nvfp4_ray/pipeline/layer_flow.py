"""Reads, device loads and unit writes of the decoder layers, run ahead within budgets.

For each layer, in order:
  read   from an object store: once on each node that needs it (the node of the layer's
         owner, and every node with calibration workers), into that node's object store;
         reads start with the job, while the workers start up, and run ahead while less
         than the budget is waiting in memory; released once all its loads have finished.
         From a local SOURCE: into the page cache of each node that needs it, in order and
         READING_AHEAD at a time, up to ``readahead`` bytes past the layers loaded, the bytes
         dropped (no process holds them, the kernel may reclaim them). Each worker then
         reads its layers itself, from the page cache straight into the pinned buffer they
         cross to its GPU through: no reading process and no object-store copy. The budget
         bounds the layers whose loads wait at the workers;
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

from collections import Counter
from dataclasses import dataclass, field

import ray

from nvfp4_ray.calibration.expert_groups import expert_ranges
from nvfp4_ray.io.tensors import LocalRead
from nvfp4_ray.pipeline.device_memory import MAX_AHEAD, num_experts, unit_parts
from nvfp4_ray.pipeline.part_streams import PARTS_HELD, PartStreams
from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.plan import Plan
from nvfp4_ray.pipeline.unit_tasks import copy_unit_task, read_ahead_task, read_tensors_task

# Layers being read at once: each read already keeps many requests in flight, and every
# concurrent task is a worker process that Ray may have to start (seconds of CPU on a
# small node, taken from the workers' own start-up)
READING = 2
# Page-cache reads in flight per node: the next is asked for while one runs, so the disk does
# not wait while the driver notices that one finished (10 to 50 ms each: about 1 s over the
# 32 layers of an 8B model, H200 records 1649 and 1702)
READING_AHEAD = 2
LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WorkerLost(Exception):
    def __init__(self, worker: int, error: Exception):
        super().__init__(f"worker {worker} lost: {type(error).__name__}")
        self.worker, self.error = worker, error


def lost_worker_error(error: Exception) -> bool:
    """Whether a call failed because a worker died (directly, or through a task input)."""
    return isinstance(error, LOST) or isinstance(getattr(error, "cause", None), LOST)


def _largest(parts: list[list]) -> int:
    return max(sum(tensor.entry.nbytes for tensor in part) for part in parts)


def _raise_failed_load(ref) -> None:
    """A load's error, unless its worker died (its stand-in loads the layer again). A load
    whose read failed never ran: nothing else would report it, and the worker would wait
    for the layer for ever."""
    try:
        ray.get(ref)
    except Exception as exc:
        if not lost_worker_error(exc):
            raise


@dataclass
class _Layer:
    index: int
    quantize: bool  # its unit still has to be written: the owner quantizes it
    calibrating: bool = False  # held on the calibration workers' devices until calibrated
    reads: dict = field(default_factory=dict)  # node -> bundle ref, until every load finished
    streams: dict = field(default_factory=dict)  # node -> its read part by part (part_streams.py)
    reading: int = 0  # reads in flight
    loads: dict = field(default_factory=dict)  # worker (or (worker, part)) -> load ref, while in flight
    loaded: bool = False  # its loads were submitted
    write: object = None  # the write's ref, while in flight

    @property
    def finished(self) -> bool:
        return self.loaded and not self.loads and not self.quantize and not self.calibrating


class LayerFlow:
    def __init__(self, plan: Plan, nodes: list[str], done_keys: set, calibration_workers: int, budget: float,
                 readahead: float = 0.0, local: bool = False):  # fmt: skip
        """``nodes``: the node of each worker; the first ``calibration_workers`` calibrate.
        ``local``: SOURCE is a local path, which the workers read themselves. ``budget``:
        bytes read into the object store ahead (local: bytes of layers whose loads wait at
        the workers); ``readahead`` (local): bytes past the layers loaded that the kernel
        is asked to read into its page cache (0: none)."""
        self.plan, self.budget, self.local = plan, budget, local
        self.readahead = readahead if local else 0
        self.units = plan.layer_units
        self.nodes = list(nodes)
        self.done_keys = done_keys
        self.calibration_workers = calibration_workers
        self.workers: list = []
        self.ahead_loads = MAX_AHEAD  # calibrated layers loaded past the one computing (device_memory.py)
        # None until start() knows where calibration resumes: until then every layer is read
        # for calibration, and none is loaded (it could travel to a device twice)
        self.calibrate_from: int | None = None if calibration_workers else len(self.units)
        self.todo = [i for i, unit in enumerate(self.units) if unit.key not in done_keys or calibration_workers]
        self.layers: dict[int, _Layer] = {}  # read and not finished
        self.next = 0  # position in todo of the next layer to read (local: to take up)
        self.loading = 0  # position in todo of the next layer to load
        self.ahead = 0  # position in todo of the next layer to read into the page cache
        self.counted: set = set()  # (layer, node) read on that node, local: counted once
        self.reading_ahead = 0  # page-cache reads in flight
        self.reads_per_node: Counter = Counter()
        self.reads_in_parts = 0  # of those, read a part at a time (part_streams.py)
        self.pending: dict = {}  # ref -> (kind "read", "ahead", "load", "part" or "write", layer, worker or node)
        self.copies: list = []  # the copy units' tasks, once the workers are up
        # MoE layers loaded in expert groups (device_memory.py): layer -> its tensors in parts
        # and the groups' ranges of experts; set once the workers' devices are known
        self.parts: dict[int, list[list]] = {}
        self.groups: dict[int, list[range]] = {}
        self.streams = PartStreams(self)

    def split_experts(self, groups: int) -> None:
        """Load each MoE layer in ``groups`` expert groups (calibration/expert_groups.py).
        From an object store, a layer the device takes whole is still read in parts
        (part_streams.py) when it is larger than what the read-ahead budget holds two of:
        the worker puts the parts together on its device."""
        for index, unit in enumerate(self.units):
            count = num_experts(unit)
            parts = unit_parts(unit, groups)
            if len(parts) > 1:
                self.parts[index] = parts
                self.groups[index] = expert_ranges(count, groups)
                continue
            reading = 1
            while not self.local and count and reading < count and _largest(unit_parts(unit, reading)) > self.budget / PARTS_HELD:
                reading = min(2 * reading, count)
            if reading > 1:
                self.parts[index] = unit_parts(unit, reading)

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

    def calibrated(self, index: int) -> bool:
        """Whether layer ``index`` goes through calibration in this run."""
        return self.calibration_workers > 0 and (self.calibrate_from is None or index >= self.calibrate_from)

    def owner(self, index: int) -> int:
        return index % len(self.nodes)

    # ---- the flow ------------------------------------------------------------------------
    def held(self) -> int:
        """Bytes read and waiting for their loads (reads in flight are bounded by READING);
        local: bytes of the layers taken up whose loads have not all finished."""
        if self.local:
            return sum(self.units[i].nbytes for i, layer in self.layers.items() if not layer.loaded or layer.loads)
        whole = sum(self.units[i].nbytes for i, layer in self.layers.items() if layer.reads and not layer.reading)
        return whole + sum(self.streams.held_bytes(layer) for layer in self.layers.values())

    def tensors_on(self, node: str, tensors: list):
        """What a worker on ``node`` loads ``tensors`` from: a read into that node's object
        store, or (local) the tensors to read itself."""
        if self.local:
            return LocalRead(self.plan.config.source, tensors)
        return read_tensors_task.options(**Placement.on_node(node)).remote(self.plan.config.source, tensors)

    def read_layer(self, node: str, index: int):
        """Layer ``index`` read into ``node``'s object store: a ref, or a ref per part for a
        layer loaded in parts; None for a local SOURCE (each worker reads it itself)."""
        if self.local:
            return None
        refs = [self.tensors_on(node, part) for part in self.parts.get(index, [self.units[index].tensors])]
        return refs if index in self.parts else refs[0]

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

    def read_into_page_cache(self, node: str, tensors: list) -> None:
        """Read ``tensors`` into ``node``'s page cache (local, with a read-ahead)."""
        if self.readahead:
            reads = [(t.file, t.entry.start, t.entry.end) for t in tensors]
            ref = read_ahead_task.options(**Placement.on_node(node)).remote(self.plan.config.source, reads)
            self.pending[ref] = ("ahead", None, node)
            self.reading_ahead += 1

    def pump(self, current: int | None) -> None:
        """Start reads within the budget (always one, and always through layer ``current``,
        the one being calibrated), then the loads that may go ahead."""
        while self.next < len(self.todo):
            index = self.todo[self.next]
            held = self.held()
            full = held and held + self.units[index].nbytes > self.budget
            reading = sum(1 for layer in self.layers.values() if layer.reading)
            if (current is None or index > current) and (full or reading >= READING):
                break
            self._read(index)
            self.next += 1
        self._read_ahead()
        if not self.workers:
            return
        for index, layer in sorted(self.layers.items()):
            if self.calibrated(index) and (current is None or index > current + self.ahead_loads):
                break
            if not layer.loaded:
                self._load(layer, self._loaders(layer))

    def _readers(self, index: int) -> list[str]:
        """The nodes that read layer ``index``: its owner's, to quantize it, and those of the
        calibration workers."""
        nodes = {self.nodes[self.owner(index)]} if self.units[index].key not in self.done_keys else set()
        if self.calibrated(index):
            nodes.update(self.nodes[: self.calibration_workers])
        return sorted(nodes)

    def _read(self, index: int) -> None:
        layer = self.layers[index] = _Layer(index, quantize=self.units[index].key not in self.done_keys)
        if not self.local:
            for node in self._readers(index):
                self._read_on(layer, node)

    def _read_ahead(self) -> None:
        """Start the page-cache reads of the next layers past the loads while they fit in
        ``readahead``: in order, READING_AHEAD at a time per node, so that the disk delivers
        the layers in about the order they are needed."""
        self.ahead = max(self.ahead, self.loading)
        while self.readahead and self.ahead < len(self.todo):
            index = self.todo[self.ahead]
            readers = self._readers(index)
            if self.reading_ahead + len(readers) > READING_AHEAD * len(readers):
                return
            if sum(self.units[i].nbytes for i in self.todo[self.loading : self.ahead + 1]) > self.readahead:
                return
            for node in readers:
                self.read_into_page_cache(node, self.units[index].tensors)
                self._count_read(index, node)
            self.ahead += 1

    def _count_read(self, index: int, node: str) -> None:
        """Local: a layer counts as read on a node once, by its read-ahead there or else by
        the first load there (any other load there reads what the page cache holds)."""
        if (index, node) not in self.counted:
            self.counted.add((index, node))
            self.reads_per_node[node] += 1

    def _read_on(self, layer: _Layer, node: str) -> None:
        self.reads_per_node[node] += 1
        if layer.index in self.parts:  # split by the plan: read part by part
            self.reads_in_parts += 1
            self.streams.read(layer, node)
            return
        read = layer.reads[node] = self.read_layer(node, layer.index)
        layer.reading += 1
        self.pending[read] = ("read", layer, node)

    def _loaders(self, layer: _Layer) -> list[int]:
        loaders = set(range(self.calibration_workers)) if self.calibrated(layer.index) else set()
        if layer.quantize:
            loaders.add(self.owner(layer.index))
        return sorted(loaders)

    def _load(self, layer: _Layer, workers: list[int], again: bool = False) -> None:
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
