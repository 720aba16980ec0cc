"""The decoder layers' reads, run ahead within budgets: the first step of LayerFlow.

  read   from an object store: once on each node that needs it (the node of the layer's
         owner, and every node with calibration workers), into that node's object store;
         reads start with the job, while the workers start up, and run ahead while less
         than the budget is waiting in memory; released once all its loads have finished.
         From a local SOURCE: into the page cache of each node that needs it, in order and
         READING_AHEAD at a time, up to ``readahead`` bytes past the layers loaded, the bytes
         dropped (no process holds them, the kernel may reclaim them). Each worker then
         reads its layers itself, from the page cache straight into the pinned buffer they
         cross to its GPU through: no reading process and no object-store copy. The budget
         bounds the layers whose loads wait at the workers.
MoE layers loaded in expert groups, or too large for the read-ahead budget, are read a
part at a time (part_streams.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from nvfp4_ray.calibration.expert_groups import expert_ranges
from nvfp4_ray.io.tensors import LocalRead
from nvfp4_ray.pipeline.device_memory import num_experts, unit_parts
from nvfp4_ray.pipeline.part_streams import PARTS_HELD, PartStreams
from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.plan import Plan
from nvfp4_ray.pipeline.unit_tasks import read_ahead_task, read_tensors_task

# Layers being read at once: each read already keeps many requests in flight, and every
# concurrent task is a worker process that Ray may have to start (seconds of CPU on a
# small node, taken from the workers' own start-up)
READING = 2
# Page-cache reads in flight per node: the next is asked for while one runs, so the disk does
# not wait while the driver notices that one finished (10 to 50 ms each: about 1 s over the
# 32 layers of an 8B model, H200 records 1649 and 1702)
READING_AHEAD = 2


def _largest(parts: list[list]) -> int:
    return max(sum(tensor.entry.nbytes for tensor in part) for part in parts)


@dataclass
class LayerState:
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


class LayerReads:
    """The layers to read, where each is read and how far ahead; LayerFlow adds the loads
    and writes."""

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
        # None until start() knows where calibration resumes: until then every layer is read
        # for calibration, and none is loaded (it could travel to a device twice)
        self.calibrate_from: int | None = None if calibration_workers else len(self.units)
        self.todo = [i for i, unit in enumerate(self.units) if unit.key not in done_keys or calibration_workers]
        self.layers: dict[int, LayerState] = {}  # read and not finished
        self.next = 0  # position in todo of the next layer to read (local: to take up)
        self.loading = 0  # position in todo of the next layer to load
        self.ahead = 0  # position in todo of the next layer to read into the page cache
        self.counted: set = set()  # (layer, node) read on that node, local: counted once
        self.reading_ahead = 0  # page-cache reads in flight
        self.reads_per_node: Counter = Counter()
        self.reads_in_parts = 0  # of those, read a part at a time (part_streams.py)
        self.pending: dict = {}  # ref -> (kind "read", "ahead", "load", "part" or "write", layer, worker or node)
        self.workers: list = []  # the workers' actors, once they are up (LayerFlow.start)
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

    def calibrated(self, index: int) -> bool:
        """Whether layer ``index`` goes through calibration in this run."""
        return self.calibration_workers > 0 and (self.calibrate_from is None or index >= self.calibrate_from)

    def owner(self, index: int) -> int:
        return index % len(self.nodes)

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

    def read_into_page_cache(self, node: str, tensors: list) -> None:
        """Read ``tensors`` into ``node``'s page cache (local, with a read-ahead)."""
        if self.readahead:
            reads = [(t.file, t.entry.start, t.entry.end) for t in tensors]
            ref = read_ahead_task.options(**Placement.on_node(node)).remote(self.plan.config.source, reads)
            self.pending[ref] = ("ahead", None, node)
            self.reading_ahead += 1

    def read_within(self, current: int | None) -> None:
        """Start reads within the budget (always one, and always through layer ``current``,
        the one being calibrated), and the page-cache reads ahead of the loads."""
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

    def _readers(self, index: int) -> list[str]:
        """The nodes that read layer ``index``: its owner's, to quantize it, and those of the
        calibration workers."""
        nodes = {self.nodes[self.owner(index)]} if self.units[index].key not in self.done_keys else set()
        if self.calibrated(index):
            nodes.update(self.nodes[: self.calibration_workers])
        return sorted(nodes)

    def _read(self, index: int) -> None:
        layer = self.layers[index] = LayerState(index, quantize=self.units[index].key not in self.done_keys)
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

    def _read_on(self, layer: LayerState, node: str) -> None:
        self.reads_per_node[node] += 1
        if layer.index in self.parts:  # split by the plan: read part by part
            self.reads_in_parts += 1
            self.streams.read(layer, node)
            return
        read = layer.reads[node] = self.read_layer(node, layer.index)
        layer.reading += 1
        self.pending[read] = ("read", layer, node)

