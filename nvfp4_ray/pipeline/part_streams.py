"""MoE layers read from an object store a part at a time on each node.

A layer that the device plan loads in expert groups (calibration/expert_groups.py), or
that is larger than two parts of the read-ahead budget, and that the flow reads after the
plan is known, is read on each node part after part: at most PARTS_HELD of its parts are
in the node's object store at once, and a part is released once every worker of the node
that loads the layer has loaded it. A node then holds two parts of such a layer, not the
whole of it (a DeepSeek-V3 layer is 22 GB in bf16, 11 GB in FP8). Each part reaches each
worker in a call of its own (``LayerWorker.load_part``), in order; the worker writes the
layer's unit after the last, and puts the parts of a layer it calibrates whole together.

Layers read whole before the plan split them are loaded from that read
(``LayerFlow.load_call``), and so are a replaced worker's layers (each part read again
for it, ``LayerReads.read_layer``): a new worker starts from the first part, which the
stream may have released.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PARTS_HELD = 2  # parts of a layer in a node's object store: one being loaded, one read ahead


@dataclass
class NodeStream:
    read: int = 0  # parts whose reads were submitted
    held: dict = field(default_factory=dict)  # part -> its read's ref, until every loader here loaded it
    loaders: dict = field(default_factory=dict)  # worker -> [keep, output, next part to load]


class PartStreams:
    def __init__(self, flow):
        self.flow = flow  # a LayerFlow: its parts, workers, reads and pending calls

    def read(self, layer, node: str) -> None:
        """Start reading ``layer`` on ``node``, part after part."""
        layer.streams.setdefault(node, NodeStream())
        self._advance(layer, node)

    def load(self, layer, worker: int, keep: bool, output) -> None:
        """Load ``layer`` onto ``worker`` as its parts are read on the worker's node."""
        node = self.flow.nodes[worker]
        layer.streams.setdefault(node, NodeStream()).loaders[worker] = [keep, output, 0]
        self._advance(layer, node)

    def loaded(self, layer, worker: int, ref) -> None:
        """A part's load finished: release what every loader has, read and load the next."""
        self.forget(layer, ref)
        for node, stream in layer.streams.items():
            if worker in stream.loaders:
                self._advance(layer, node)

    @staticmethod
    def forget(layer, ref) -> None:
        """The part load ``ref`` is no longer in flight (``layer.loads`` keys: (worker, part))."""
        del layer.loads[next(key for key, value in layer.loads.items() if value == ref)]

    def lost(self, worker: int) -> None:
        """``worker`` is gone: the parts it had yet to load no longer wait for it."""
        for layer in list(self.flow.layers.values()):
            for node, stream in layer.streams.items():
                if stream.loaders.pop(worker, None) is not None:
                    self._advance(layer, node)

    def to_give(self, layer) -> bool:
        """Whether a worker still has parts of ``layer`` whose loads are not submitted yet."""
        count = len(self.flow.parts.get(layer.index, ()))
        return any(entry[2] < count for stream in layer.streams.values() for entry in stream.loaders.values())

    def held_bytes(self, layer) -> int:
        parts = self.flow.parts[layer.index] if layer.streams else []
        return sum(t.entry.nbytes for stream in layer.streams.values() for part in stream.held for t in parts[part])

    def _advance(self, layer, node: str) -> None:
        flow, stream = self.flow, layer.streams[node]
        parts = flow.parts[layer.index]
        while True:
            for part in list(stream.held):
                loading = any((worker, part) in layer.loads for worker in stream.loaders)
                if stream.loaders and not loading and all(entry[2] > part for entry in stream.loaders.values()):
                    del stream.held[part]
            for worker, entry in stream.loaders.items():
                while entry[2] < stream.read:
                    self._load_part(layer, stream, worker, entry[2])
                    entry[2] += 1
            if stream.read == len(parts) or len(stream.held) >= PARTS_HELD:
                return
            ref = flow.tensors_on(node, parts[stream.read])
            stream.held[stream.read] = ref
            layer.reading += 1
            flow.pending[ref] = ("read", layer, node)
            stream.read += 1

    def _load_part(self, layer, stream: NodeStream, worker: int, part: int) -> None:
        keep, output, _ = stream.loaders[worker]
        count = len(self.flow.parts[layer.index])
        tensor_names = self.flow.part_tensor_names(layer.index, part)
        merge = layer.index not in self.flow.groups  # parts for the reads only: one whole layer on the device
        load = self.flow.workers[worker].load_part
        ref = load.remote(layer.index, part, count, stream.held[part], tensor_names, keep, output, merge)
        layer.loads[(worker, part)] = ref
        self.flow.pending[ref] = ("part", layer, worker)
