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
     weights, which gives the next layer's inputs (and hidden-state snapshots).
The layer's amax is persisted after its unit file: a resumed run finds, for every layer
with statistics, its unit at DEST. It resumes from the last hidden-state snapshot and
solves the layers after it again (the same bytes: their unit files are kept).

Unit keys: the plan's (the source tensors and the GPTQ options) chained with the layer's
calibration key (samples, every layer up to it, the device kind), since the Hessians
depend on all of them. A lost worker fails the job; running it again resumes.
"""

from __future__ import annotations

import math
from dataclasses import replace

from nvfp4_ray.calibration.batches import make_batches
from nvfp4_ray.calibration.hessians import block_size, blocks_of, device_bytes, reference_order
from nvfp4_ray.errors import JobError
from nvfp4_ray.io import destination
from nvfp4_ray.io.storage import is_remote
from nvfp4_ray.pipeline.driver import Execution, reference_drops_causal_mask
from nvfp4_ray.pipeline.layer_flow import LayerFlow
from nvfp4_ray.pipeline.plan import digest


class GptqExecution(Execution):
    EXPERT_GROUPS = False  # GPTQ's steps take whole layers: one that does not fit is refused
    def __init__(self, plan, placement, events, workers: list):
        if plan.config.exact:  # batch i is then the i-th sample llm-compressor runs
            plan.samples = [plan.samples[i] for i in reference_order(plan.samples)]
        super().__init__(plan, placement, events, workers)
        batches = len(make_batches(plan.samples, None))
        self.block = block_size(batches, self.config.exact)
        self.calibration_workers = min(placement.size, math.ceil(batches / self.block))
        self.options = plan.recipe.gptq
        self.fell_back: list[str] = []  # Linears whose Hessian was not positive definite
        drop_mask = reference_drops_causal_mask(self.config, plan.source.config)
        for worker in self.workers[: self.calibration_workers]:  # one sample per forward, no CUDA graphs:
            worker.configure.remote(plan.source.config, False, drop_mask, False)  # batches in index order

    def _shares(self, batches: list) -> list[list]:
        """A contiguous run of whole blocks to each worker (so that it adds whole subtrees
        of the tree), as even in blocks as can be."""
        blocks, workers = blocks_of(batches, self.block), self.calibration_workers
        runs = [blocks[len(blocks) * w // workers : len(blocks) * (w + 1) // workers] for w in range(workers)]
        return [[batch for block in run for batch in block] for run in runs]

    def _algorithm_device_bytes(self, shares: list[list]) -> int:
        blocks = max((len(blocks_of(share, self.block)) for share in shares), default=1)
        return device_bytes([unit.spec.groups for unit in self.plan.layer_units], blocks)

    def run(self) -> None:
        plan = self.plan
        aborted = destination.abort_stale_uploads(self.dest)
        if aborted:
            self.events.info(f"removed {aborted} unfinished writes an earlier run left at DEST", aborted=aborted)
        for unit in plan.copy_units:
            done = destination.load_done(self.dest, unit.key, unit.file)
            if done is not None:
                self.written[unit.key] = done
                self.reused.append(unit.file)
        budget = min(self.config.prefetch_bytes, self.placement.object_store_bytes / 2)
        readahead = self.config.readahead_gib * 2**30
        # the flow only reads and loads layers for calibration: the GPTQ loop writes the units
        not_by_flow = set(self.written) | {unit.key for unit in plan.layer_units}
        self.flow = LayerFlow(plan, self.placement.nodes, not_by_flow, self.calibration_workers, budget, readahead,
                              not is_remote(self.config.source))  # fmt: skip
        embeds = self._read_embeddings()
        self.flow.pump(None)
        with self.events.stage("setup"):
            infos = self._get(self._wait([w.describe.remote() for w in self.workers]))
            self.startup = [info["startup"] for info in infos]
            self._fit_device_memory(infos)
            self.calibration = self._prepare_calibration(infos[: self.calibration_workers], embeds)
        del embeds
        self._key_units()
        with self.events.stage("layers"):
            self._layer_loop()
        with self.events.stage("copy"):
            for written in self._get(self.flow.copies):
                self._record([written])
        if plan.spec.needs_calibration:  # NVFP4A16 has no input scales
            self._write_scales()
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
            unit = replace(unit, key=key, file=f"{unit.file.rsplit('-', 1)[0]}-{key}.safetensors")
            done = destination.load_done(self.dest, unit.key, unit.file)
            if done is not None:
                self.written[unit.key] = done
                self.reused.append(unit.file)
            units.append(unit)
        self.plan.layer_units = units

    def _owners(self, groups: list) -> list[int]:
        """Calibration worker of each group: largest Hessian first, to the least loaded."""
        owners, load = [0] * len(groups), [0] * self.calibration_workers
        for g in sorted(range(len(groups)), key=lambda g: (-groups[g][0].in_features, g)):
            owners[g] = min(range(self.calibration_workers), key=lambda w: (load[w], w))
            load[owners[g]] += groups[g][0].in_features ** 2
        return owners

    def _calibrate_layer(self, index: int) -> None:
        unit = self.plan.layer_units[index]
        spec, workers = unit.spec, self.workers[: self.calibration_workers]
        passes = [worker.gptq.remote("hessian_pass", index, spec, self.block) for worker in workers]
        owners = self._owners(spec.groups)
        ship = len(workers) > 1  # one worker keeps every result on its device
        solved = [
            workers[owner].gptq.options(num_returns=2).remote("solve", index, group, self.options, ship, *[
                worker.gptq.remote("partials_of", index, group[0].local) for w, worker in enumerate(workers) if w != owner
            ])
            for group, owner in zip(spec.groups, owners)
        ]  # fmt: skip
        fell_back = [flags for flags, _ in solved]
        # each worker gets the results of the groups the others solved (the driver never fetches them)
        shipped = [[results for (_, results), owner in zip(solved, owners) if owner != w] for w in range(len(workers))]
        write = []
        if unit.key not in self.written:
            write = [workers[0].gptq.remote("write_unit", index, spec, unit.file, unit.key, self.config.dest, *shipped[0])]
        staged = [worker.gptq.remote("stage", index, *shipped[w]) for w, worker in enumerate(workers)]
        snapshot = self._wants_snapshot(index)
        propagate = [worker.run_layer.remote(index, [], [], snapshot, self.config.dest) for worker in workers]
        self._wait([*passes, *fell_back, *staged, *propagate, *write])
        amax, flags, propagated, written = (self._get(refs) for refs in (passes, fell_back, propagate, write))
        self._record(written)
        self.fell_back += [f"{spec.module}.{local}" for group in flags for local in group]
        self._finish_layer(index, amax, snapshot, propagated)

    def _replace_worker(self, i: int, error: Exception) -> None:
        raise JobError(f"worker {i} was lost during GPTQ ({type(error).__name__}); run the same command again to resume")

    def report_fields(self) -> dict:
        """The RTN fallbacks, and each step's seconds on the busiest worker (the propagation
        pass is run_layer's time; Ray's transfer of the partials lies between the steps)."""
        steps = {**self.calibration.gptq_s, "propagation_pass": self.calibration.compute_s} if self.calibration else {}
        return {"gptq_round_to_nearest": self.fell_back, "gptq_seconds": steps}
