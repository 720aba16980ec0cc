"""Run a GPTQ plan on Ray: each decoder layer is calibrated, solved and propagated through
before the next one starts (GPTQ needs the layer's inputs, which depend on the layers
before it solved: round-to-nearest layers are quantized ahead of calibration instead).

For each layer, in order:
  1. every calibration worker runs its blocks of samples through the layer as loaded:
     input amax, and the Hessian subtrees of its blocks (calibration/hessians.py);
  2. each fused group gets an owner among the calibration workers (the largest Hessians
     first, each to the least loaded); the other workers' subtrees reach it through Ray's
     object store and it adds them and its own in the fixed tree, then solves the group;
  3. one worker writes the layer's unit file from the solved groups;
  4. every calibration worker runs its batches through the layer again with the solved
     weights, which gives the next layer's inputs (and hidden-state snapshots); not the
     last layer's, which no layer takes.
The layer's amax is persisted after its unit file: a resumed run finds, for every layer
with statistics, its unit at DEST. It resumes from the last hidden-state snapshot and
solves the layers after it again (the same bytes: their unit files are kept). A worker
lost during the job is handled the same way, in the same run: every calibration worker is
started again from that snapshot (_restart_workers).

Unit keys: the plan's (the source tensors and the GPTQ options) chained with the layer's
calibration key (samples, every layer up to it, the device kind), since the Hessians
depend on all of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import ray

from nvfp4_ray.calibration.batches import block_size
from nvfp4_ray.calibration.hessians import blocks_of, device_bytes, hessian_inputs, reference_order, worker_runs
from nvfp4_ray.errors import JobError
from nvfp4_ray.pipeline.driver import MAX_WORKER_REPLACEMENTS, Execution
from nvfp4_ray.pipeline.layer_flow import lost_worker_error
from nvfp4_ray.pipeline.plan import digest


class GptqExecution(Execution):
    EXPERT_GROUPS = False  # GPTQ's steps take whole layers: one that does not fit is refused

    def __init__(self, plan, placement, events, workers: list):
        if plan.config.exact:  # batch i is then the i-th sample llm-compressor runs
            plan.samples = [plan.samples[i] for i in reference_order(plan.samples)]
        super().__init__(plan, placement, events, workers)
        self.block = block_size(len(plan.samples), self.config.exact)  # one sample a batch
        self.options = plan.recipe.gptq
        self.fell_back: list[str] = []  # Linears whose Hessian was not positive definite
        self.unit_write: list = []  # the last layer's unit write, taken in after the next layer

    def _shares(self, batches: list) -> list[list]:
        return worker_runs(batches, self.block, self.calibration_workers)

    def _algorithm_device_bytes(self, shares: list[list]) -> int:
        blocks = max((len(blocks_of(share, self.block)) for share in shares), default=1)
        longest = 0 if self.config.exact else max((batch.input_ids.shape[-1] for share in shares for batch in share), default=0)
        return device_bytes([unit.spec.groups for unit in self.plan.layer_units], blocks, longest)

    def _reusable_units(self) -> list:
        """The copy units: a layer unit's key chains its calibration key (_key_units)."""
        return self.plan.copy_units

    def _units_not_by_flow(self) -> set[str]:
        """The flow only reads and loads layers for calibration: the GPTQ loop writes the units."""
        return set(self.written) | {unit.key for unit in self.plan.layer_units}

    def run(self) -> None:
        self._set_up()
        self._key_units()
        self._run_layers()
        if self.fell_back:
            self.events.warning(
                f"Hessian not positive definite for {len(self.fell_back)} Linears, quantized with round-to-nearest "
                f"instead of GPTQ, as llm-compressor does (raise dampening_frac or add calibration samples): "
                + ", ".join(self.fell_back), linears=self.fell_back,
            )

    def _key_units(self) -> None:
        """Unit keys chained with the calibration keys; units already at DEST are reused."""
        units = []
        for unit, calibration_key in zip(self.plan.layer_units, self.calibration.keys):
            key = digest([unit.key, calibration_key])
            units.append(replace(unit, key=key, file=f"{unit.file.rsplit('-', 1)[0]}-{key}.safetensors"))
        self.plan.layer_units = units
        reused = sum(self._reuse(unit) for unit in units)
        if reused:
            self.events.info(f"reusing {reused} solved layer units already at DEST", reused=reused)

    def _calibrate_layer(self, index: int) -> None:
        """The layer's steps; a worker lost meanwhile (or while starting again) restarts every
        calibration worker, and the layer is solved again."""
        lost = None
        while True:
            try:
                if lost is not None:
                    self._restart_workers(index, lost)
                self._solve_layer(index, pump=True)
                return
            except Exception as exc:
                if not lost_worker_error(exc):
                    raise
                lost = exc

    def _solve_layer(self, index: int, pump: bool) -> None:
        """``pump``: drive the layer flow while the steps run (not while catching up after a
        restart: the flow then still holds the lost workers' loads). No step waits on another
        worker's step without taking its result as an argument: with a worker lost, every
        call of the layer fails or finishes, and none waits for ever."""
        unit = self.plan.layer_units[index]
        spec, workers = unit.spec, self.workers[: self.calibration_workers]
        # Every load of the layer is submitted before its steps. A worker's calls go out in
        # order, each once its arguments exist (Ray's in-order actor queue): a part's load
        # submitted after this worker's solve or propagate, whose arguments come from the
        # other workers' steps, would wait for them, while their hessian_pass waits for
        # the layer on every worker, this one's last part included (the hang of streamed
        # MoE layers, part_streams.py)
        while pump and (loads := self.flow.loads_to_come(index)):
            self._wait(loads)
            self._poll(block=False)  # the finished loads taken in: the next parts' go out
            self.flow.pump(self._current)
        passes = [worker.gptq.remote("hessian_pass", index, spec, self.block, self.config.exact) for worker in workers]
        pairs = list(zip(hessian_inputs(spec.groups), owners(spec.groups, len(workers))))  # (input, owner) of each group
        ship = len(workers) > 1  # one worker keeps every result on its device
        partials = self._partials(index, workers, pairs)
        # An owner's first group of an input takes the others' subtrees of it; the owner
        # keeps the input's inverse factor while it has another group of it to solve
        groups_of, solved_of, solved, others = Counter(pairs), Counter(), [], []
        for group, (name, owner) in zip(spec.groups, pairs):
            solved_of[name, owner] += 1
            first, keep = solved_of[name, owner] == 1, solved_of[name, owner] < groups_of[name, owner]
            others = [partials[name, w] for w in range(len(workers)) if w != owner] if first else []
            solved.append(workers[owner].gptq.options(num_returns=2).remote(
                "solve", index, group, name, first, keep, self.options, self.config.exact, ship, *others))  # fmt: skip
        del partials, others  # Ray frees each subtree once the solves that take it are done
        fell_back = [flags for flags, _ in solved]
        # each worker gets the results of the groups the others solved (the driver never fetches them)
        shipped = [[results for (_, results), (_, owner) in zip(solved, pairs) if owner != w] for w in range(len(workers))]
        snapshot = self.calibration.wants_snapshot(index, self.config.checkpoint_minutes)
        writes = unit.key not in self.written
        last = index == len(self.plan.layer_units) - 1  # no layer takes its outputs (wants_snapshot: nor a snapshot)
        propagate = [worker.gptq.remote("propagate", index, snapshot, self.config.dest,
                                        (spec, unit.file, unit.key) if writes and w == 0 else None, not last, *shipped[w])
                     for w, worker in enumerate(workers)]  # fmt: skip
        earlier, self.unit_write = self.unit_write, []
        if pump:
            self._wait([*passes, *fell_back, *propagate, *earlier])
        amax, flags, propagated, written = (self._get(refs) for refs in (passes, fell_back, propagate, earlier))
        self._record(written)
        if writes:
            # Submitted once propagate kept the unit's tensors, with no argument to wait for:
            # Ray sends a worker's calls in order, each once its arguments exist, and the
            # loads the flow submits after it must not wait. It goes on beside the next
            # layer's calibration pass, taken in after it; at once after a layer with a
            # hidden-state snapshot and after the last layer: a snapshot's marker (where a
            # resumed run starts) never goes before a unit of the layers before it
            write = [workers[0].gptq_write.remote(index, self.config.dest)]
            if snapshot is None and index < len(self.plan.layer_units) - 1:
                self.unit_write = write
            else:
                self._record(self._get(self._wait(write) if pump else write))
        self.fell_back += [name for group in flags for name in (f"{spec.module}.{local}" for local in group)
                           if name not in self.fell_back]  # fmt: skip
        self._finish_layer(index, amax, snapshot, propagated)

    @staticmethod
    def _partials(index: int, workers: list, pairs: list[tuple[str, int]]) -> dict:
        """(input, worker) -> that worker's subtrees of the input, asked for once, before any
        solve, for the owners of its groups elsewhere (the routed experts' gate/up share one
        input: hessian_inputs); kept on the worker where it owns groups of the input too."""
        owning, partials = set(pairs), {}
        for name, owner in pairs:
            for w, worker in enumerate(workers):
                if w != owner and (name, w) not in partials:
                    partials[name, w] = worker.gptq.remote("partials_of", index, name, (name, w) in owning)
        return partials

    def _restart_workers(self, index: int, error: Exception) -> None:
        """Every calibration worker is started again from the last complete hidden-state
        snapshot (or the embeddings) and solves the layers from there to ``index`` again, their
        unit files kept: the bytes a resumed run gives. All of them, not only a stand-in for
        the lost one: the others' Hessians and solves of the layer needed the lost one's
        (they are gone with it), and every worker waits for the slowest at every layer anyway."""
        self.replacements += 1
        if self.replacements > MAX_WORKER_REPLACEMENTS:
            raise JobError(f"workers failed {self.replacements} times; last: {type(error).__name__}")
        calibration, workers = self.calibration, list(range(self.calibration_workers))
        start = 0 if calibration.checkpoint is None else calibration.checkpoint + 1
        self.events.warning(
            f"a worker was lost while solving layer {index} ({type(error).__name__}); every calibration worker "
            f"starts again, from layer {start}", calibrating_layer=index, from_layer=start,
        )  # fmt: skip
        for i in workers:
            ray.kill(self.workers[i], no_restart=True)
        calibration.forget_writes()  # the killed workers' snapshots never finish
        self.unit_write = []  # lost, or done unrecorded: its layer (after the snapshot) is solved again
        self._start_workers(workers)
        self._start_calibration(calibration, workers, {})
        if start and not self._restore_snapshot(calibration, workers):
            start = 0
            self._start_calibration(calibration, workers, {})  # the workers that restored theirs, too
        nodes = [self.placement.nodes[i] for i in workers]
        for layer in range(start, index):
            for node in set(nodes):
                self.extra_reads[node] += 1
            reads = {node: self.flow.read_layer(node, layer) for node in set(nodes)}
            self._get([self.flow.load_call(self.workers[i], layer, reads[nodes[i]], True) for i in workers])
            self._solve_layer(layer, pump=False)
        for i in workers:
            self.flow.replace_worker(i, self.workers[i], nodes[i])

    def _replace_worker(self, i: int, error: Exception) -> None:
        """The flow reports a lost worker only through a unit write, and it writes none in a
        GPTQ job; _calibrate_layer handles every loss."""
        raise error

    def report_fields(self) -> dict:
        """The RTN fallbacks, and each step's seconds on the busiest worker (the propagation
        pass is run_layer's time; Ray's transfer of the partials lies between the steps)."""
        steps = {**self.calibration.gptq_s, "propagation_pass": self.calibration.compute_s} if self.calibration else {}
        return {"gptq_round_to_nearest": self.fell_back, "gptq_seconds": steps}


def owners(groups: list, workers: int) -> list[int]:
    """The calibration worker that solves each fused group (of LinearSpecs): the largest
    Hessian first, each to the least loaded, weighed by in_features² (its Hessian's size,
    and about its solve's share). It balances the solves, not what the owners receive: an
    input's subtrees from every other worker go whole to each owner of a group of it
    (docs/gptq.md#memory-and-traffic, checked at DeepSeek-V3's shape in tests)."""
    owner, load = [0] * len(groups), [0] * workers
    for g in sorted(range(len(groups)), key=lambda g: (-groups[g][0].in_features, g)):
        owner[g] = min(range(workers), key=lambda w: (load[w], w))
        load[owner[g]] += groups[g][0].in_features ** 2
    return owner
