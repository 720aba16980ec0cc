"""Reads and weight tasks of the decoder layers, run ahead within a memory budget.

A layer is read once on each node that needs it (the node of its weight task, and every
node with calibration workers), and its weight task is submitted together with the read,
so packing proceeds as fast as layers arrive. Reads start when the job starts, while the
calibration workers are still starting up, and continue while less than the budget is
waiting in memory; a layer is released once its weight task has finished and the
calibration has gone past it. The calibration, which must visit layers in order, only
ever consumes layers that are already (being) read.
"""

from __future__ import annotations

from collections import Counter

import ray

from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.plan import Plan
from nvfp4_ray.pipeline.workers import quantize_layer_task, read_tensors_task


class LayerFlow:
    def __init__(self, plan: Plan, placement: Placement, done_keys: set, calibration_nodes: list[str], budget: float):
        self.plan, self.placement, self.budget = plan, placement, budget
        self.units = plan.layer_units
        self.done_keys = done_keys
        self.calibration_nodes = calibration_nodes  # empty: no calibration in this run
        self.calibrate_from = 0 if calibration_nodes else len(self.units)
        self.todo = [i for i, unit in enumerate(self.units) if unit.key not in done_keys or calibration_nodes]
        self.reads: dict[int, dict[str, object]] = {}  # layer -> node -> bundle ref
        self.pending: dict[object, int] = {}  # weight task -> layer
        self.waiting: dict[int, set[str]] = {}  # layers in memory -> what still needs them
        self.reads_per_node: Counter = Counter()
        self.next = 0  # position in todo of the next layer to read

    def held(self) -> int:
        return sum(self.units[index].nbytes for index in self.waiting)

    def start_calibration_at(self, first: int) -> None:
        """Layers before ``first`` already have statistics (a resumed run): release them."""
        self.calibrate_from = first
        for index in list(self.waiting):
            if index < first:
                self._release(index, "calibration")
        self.todo = [i for i in self.todo if self.units[i].key not in self.done_keys or i >= first]

    def pump(self, position: int) -> None:
        """Read ahead (and submit weight tasks) while the budget allows, always through
        the layer at ``position`` in todo."""
        while self.next < len(self.todo) and (
            self.next <= position or self.held() + self.units[self.todo[self.next]].nbytes <= self.budget
        ):
            self._start(self.todo[self.next])
            self.next += 1

    def _start(self, index: int) -> None:
        unit = self.units[index]
        needs = set()
        nodes = set()
        if unit.key not in self.done_keys:
            needs.add("weights")
            nodes.add(self.placement.nodes[index % self.placement.size])
        if index >= self.calibrate_from:
            needs.add("calibration")
            nodes.update(self.calibration_nodes)
        refs = {}
        for node in sorted(nodes):
            refs[node] = read_tensors_task.options(**Placement.on_node(node)).remote(self.plan.config.source, unit.tensors)
            self.reads_per_node[node] += 1
        self.reads[index] = refs
        self.waiting[index] = needs
        if "weights" in needs:
            bundle = index % self.placement.size
            task = quantize_layer_task.options(**self.placement.task_options(bundle))
            self.pending[task.remote(unit, refs[self.placement.nodes[bundle]], self.plan.config.dest)] = index

    def calibrated(self, index: int) -> None:
        self._release(index, "calibration")
        self.reads.pop(index, None)

    def _release(self, index: int, need: str) -> None:
        needs = self.waiting.get(index)
        if needs is None:
            return
        needs.discard(need)
        if not needs:
            del self.waiting[index]
            if index < self.calibrate_from:
                self.reads.pop(index, None)

    def finished_weights(self, block: bool) -> list:
        """Refs of finished weight tasks (at least one if ``block``), their layers released."""
        if not self.pending:
            return []
        done, _ = ray.wait(list(self.pending), num_returns=1 if block else len(self.pending), timeout=None if block else 0)
        for ref in done:
            self._release(self.pending.pop(ref), "weights")
        return done
