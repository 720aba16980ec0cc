"""Run a plan on Ray: read each layer once per node, quantize it, calibrate through it.

One LayerWorker per GPU (or per CPU-only node). For each decoder layer, in order, the
LayerFlow reads it on the nodes that need it (into their object stores, or for a local
SOURCE into their page caches, which the workers read from) and loads it onto the workers
that need it; its owner quantizes it from the device copy and writes the unit file. Every
calibration worker then advances its batches through the layer and returns the input amax
of each Linear; the driver max-reduces them (exact: max is order-free) and persists the
result (calibration_steps.py). Hidden states are persisted now and then (crash resume) and at a few planned
layers, which are kept after the commit (re-quantization resumes from the last one before
the first changed layer). Units already done at DEST are skipped; calibration resumes
from the last persisted hidden states, or is skipped when every layer's statistics exist.
"""

from __future__ import annotations

from collections import Counter

import ray

from nvfp4_ray.calibration.batches import make_batches
from nvfp4_ray.errors import JobError
from nvfp4_ray.io import destination
from nvfp4_ray.io.shards import TensorShard, WrittenFile
from nvfp4_ray.io.storage import Store, is_remote
from nvfp4_ray.io.tensors import torch_dtype
from nvfp4_ray.layer_quantizer import scale_tensors
from nvfp4_ray.pipeline.calibration_state import Calibration, Persister
from nvfp4_ray.pipeline.calibration_steps import CalibrationSteps
from nvfp4_ray.pipeline.device_memory import plan_device
from nvfp4_ray.pipeline.events import Events
from nvfp4_ray.pipeline.layer_flow import LOST, LayerFlow, WorkerLost, lost_worker_error
from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.plan import Plan
from nvfp4_ray.pipeline.unit_tasks import task_error, write_unit
from nvfp4_ray.pipeline.worker_start import calibration_worker_count, configure, new_worker

MAX_WORKER_REPLACEMENTS = 3


class Execution(CalibrationSteps):
    EXPERT_GROUPS = True  # MoE layers larger than a device may load in expert groups (device_memory.py)

    def __init__(self, plan: Plan, placement: Placement, events: Events, workers: list):
        self.plan, self.placement, self.events = plan, placement, events
        self.workers = list(workers)
        self.config = plan.config
        self.dest = Store(self.config.dest)
        self.written: dict[str, WrittenFile] = {}  # unit key -> file
        self.layer_amax: list[dict[str, float]] = [{} for _ in plan.layer_units]
        self.extra_reads: Counter = Counter()  # node -> layers read again for replaced workers
        self.reused: list[str] = []
        self.computed: list[str] = []
        self.replacements = 0
        self.calibration: Calibration | None = None
        self.startup: list[dict] = []  # each worker's start-up seconds, step by step
        self.calibration_workers = calibration_worker_count(placement.size, self.config, plan.samples,
                                                            plan.recipe.gptq is not None)  # fmt: skip
        self.scales: WrittenFile | None = None
        self.device_plan = None  # layers ahead and writes queued, once the workers' devices are known
        self.persist = Persister()  # calibration state to DEST, in order (calibration_state.py)

    # ---- top level ---------------------------------------------------------------
    def run(self) -> None:
        self._set_up()
        self._run_layers()

    def _run_layers(self) -> None:
        """The layers, the copy units, the input scales."""
        with self.events.stage("layers"):
            self._layer_loop()
        with self.events.stage("copy"):  # the copy units' tasks started with the flow
            for written in self._get(self.flow.copies):
                self._record([written])
        if self.calibration is not None and self.plan.spec.needs_calibration:  # GPTQ's NVFP4A16 has no input scales
            self._write_scales()

    def _set_up(self) -> None:
        """Units already at DEST taken, the layer flow started, the workers' devices planned
        and calibration prepared."""
        plan = self.plan
        for unit in self._reusable_units():
            self._reuse(unit)
        if self.reused:
            self.events.info(f"reusing {len(self.reused)} unit files already at DEST", reused=len(self.reused))
        # never more than half the object store: the rest is for the tasks' results and spills
        budget = min(self.config.prefetch_bytes, self.placement.object_store_bytes / 2)
        readahead = self.config.readahead_gib * 2**30  # the flow reads ahead only for a local SOURCE
        local = not is_remote(self.config.source)
        not_by_flow = self._units_not_by_flow()
        self.flow = LayerFlow(plan, self.placement.nodes, not_by_flow, self.calibration_workers, budget, readahead, local)
        embeds = self._read_embeddings()  # with the first layers, while the workers start up
        self.flow.pump(None)
        with self.events.stage("setup"):
            infos = self._get(self._wait([w.describe.remote() for w in self.workers]))
            self.startup = [info["startup"] for info in infos]
            self.events.info("workers ready", startup=self.startup)
            self._fit_device_memory(infos)
            if self.calibration_workers:
                self.calibration = self._prepare_calibration(infos[: self.calibration_workers], embeds)
            else:
                self.flow.start(self.workers, len(plan.layer_units))
        del embeds  # the samples are embedded: free the embedding's object-store copy (object stores; 1 GiB on the 8B)

    def _reuse(self, unit) -> bool:
        """Whether ``unit``'s file is already at DEST (complete, with its key): then it is taken as written."""
        done = destination.load_done(self.dest, unit.key, unit.file)
        if done is not None:
            self.written[unit.key] = done
            self.reused.append(unit.file)
        return done is not None

    def _reusable_units(self) -> list:
        """Units whose key is known before calibration: a file at DEST with it is reused."""
        return [*self.plan.layer_units, *self.plan.copy_units]

    def _units_not_by_flow(self) -> set[str]:
        """Keys of the units the layer flow does not write: those already at DEST."""
        return set(self.written)

    def _fit_device_memory(self, infos: list[dict]) -> None:
        """Layers loaded ahead and quantized layers queued for writing, as many as the
        smallest device's memory allows (device_memory.py); refused if one layer won't fit."""
        config, plan = self.config, self.plan
        budget = None if config.device_memory_gib is None else int(config.device_memory_gib * 2**30)
        totals = [info["device_memory"] for info in infos if info.get("device_memory")]
        if budget is None and totals:
            budget = int(0.9 * min(totals))
        shares = self._shares(make_batches(plan.samples, config.batch_tokens)) if self.calibration_workers else []
        text_config = plan.source.config.get("text_config") or plan.source.config
        self.device_plan = plan_device(plan.layer_units, shares, text_config, budget, self._algorithm_device_bytes(shares),
                                       expert_groups=self.EXPERT_GROUPS)  # fmt: skip
        self.flow.ahead_loads = self.device_plan.ahead
        self.flow.split_experts(self.device_plan.expert_groups)
        self._get([worker.limit_memory.remote(*self._memory_limits()) for worker in self.workers])
        self.events.info("device memory planned", **self.device_plan.record())

    def _memory_limits(self) -> tuple[int, int]:
        return self.device_plan.writes_queued, 1 + self.device_plan.ahead

    def _algorithm_device_bytes(self, shares: list[list]) -> int:
        """Device bytes a worker needs beside the layers and activations (GPTQ's Hessians)."""
        return 0

    def _key_of(self, file_name: str) -> str:
        return file_name.rsplit("-", 1)[1].removesuffix(".safetensors")

    def _get(self, refs):
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise task_error(exc) from None

    def _record(self, written: list[WrittenFile]) -> None:
        for file in written:
            self.written[self._key_of(file.name)] = file
            self.computed.append(file.name)

    # ---- the layer loop ----------------------------------------------------------
    def _layer_loop(self) -> None:
        flow = self.flow
        layers = [i for i in flow.todo if flow.calibrated(i)]
        self.events.progress("layers", len(layers) or len(flow.todo), unit="layer")
        for index in layers:
            flow.pump(index)
            self._calibrate_layer(index)
            flow.done_calibrating(index)
            self._poll(block=False)
            self.events.advance("layers")
        while flow.busy():
            flow.pump(None)
            done = self._poll(block=True)
            if not layers:
                self.events.advance("layers", done)
        if layers:
            self._finish_snapshots()
            seconds = self._get([w.seconds.remote() for w in self.workers[: self.calibration_workers]])
            self.startup[: len(seconds)] = [s["startup"] for s in seconds]  # with what a GPTQ start took
            self.calibration.compute_s = round(max(s["run_layer_s"] for s in seconds), 3)
            self.calibration.load_wait_s = round(max(s["load_wait_s"] for s in seconds), 3)
            self.calibration.snapshot_write_s = round(max(s["snapshot_write_s"] for s in seconds), 3)
            self.calibration.cuda_graphs = all(s["cuda_graphs"] for s in seconds)
            self.calibration.max_layers_held = max(s["max_layers_held"] for s in seconds)
            self.calibration.gptq_s = {step: round(max(s["gptq_s"].get(step, 0.0) for s in seconds), 3)
                                       for step in seconds[0]["gptq_s"]}  # fmt: skip
            for note in dict.fromkeys(note for s in seconds for note in s["notes"]):
                self.events.warning(note)

    def _wait(self, refs: list) -> list:
        """``refs``, once all are done; meanwhile the flow's finished reads, loads and writes
        are taken in and the next ones started (the driver is the flow's only clock)."""
        while ray.wait(refs, num_returns=len(refs), timeout=0.05, fetch_local=False)[1]:
            self._poll(block=False)
            self.flow.pump(self._current)
        return refs

    @property
    def _current(self) -> int | None:
        """The layer being calibrated, if calibration has started."""
        calibration = self.calibration
        if calibration is None or not self.flow.workers or calibration.done_through + 1 >= len(calibration.keys):
            return None
        return calibration.done_through + 1

    def _poll(self, block: bool) -> int:
        while True:
            try:
                written = self.flow.poll(block)
                break
            except WorkerLost as lost:
                self._replace_worker(lost.worker, lost.error)
            except ray.exceptions.RayTaskError as exc:
                raise task_error(exc) from None
        self._record(written)
        return len(written)

    def _calibrate_layer(self, index: int) -> None:
        snapshot = self.calibration.wants_snapshot(index, self.config.checkpoint_minutes)
        calls = [(self.workers[i], self._submit_layer(i, index, snapshot)) for i in range(self.calibration_workers)]
        self._wait([call for _, call in calls])
        results = [self._layer_result(i, index, snapshot, *call) for i, call in enumerate(calls)]
        self._finish_layer(index, results, snapshot, results)

    def _submit_layer(self, i: int, index: int, snapshot: str | None = None):
        unit = self.plan.layer_units[index]
        attention = [a.local for a in unit.spec.attention]
        groups = self.flow.groups.get(index)
        return self.workers[i].run_layer.remote(index, list(unit.spec.recorded), attention, snapshot, self.config.dest, groups)

    def _layer_result(self, i: int, index: int, snapshot: str | None, actor, call) -> dict:
        """Worker ``i``'s result for layer ``index``; a lost worker is replaced (unless that
        happened meanwhile) and caught up, and the layer is run again."""
        while True:
            try:
                return ray.get(call)
            except (ray.exceptions.RayTaskError, *LOST) as exc:
                if not lost_worker_error(exc):
                    raise task_error(exc) from None
                if self.workers[i] is actor:
                    self._replace_worker(i, exc)
            actor = self.workers[i]
            call = self._submit_layer(i, index, snapshot)

    def _replace_worker(self, i: int, error: Exception) -> None:
        """Start a new worker in the lost one's bundle. A calibration worker first redoes
        its batches up to the layer being calibrated, from the last complete snapshot."""
        self.replacements += 1
        if self.replacements > MAX_WORKER_REPLACEMENTS:
            raise JobError(f"workers failed {self.replacements} times; last: {type(error).__name__}")
        calibration = self.calibration
        current = calibration.done_through + 1 if calibration is not None else None
        self.events.warning(f"worker {i} was lost; starting another", worker=i, calibrating_layer=current)
        self._start_workers([i])
        worker, node = self.workers[i], self.placement.nodes[i]
        if i < self.calibration_workers and calibration is not None and current < len(calibration.keys):
            calibration.forget_writes()
            self._start_calibration(calibration, [i], {})
            start = 0
            if calibration.checkpoint is not None and self._restore_snapshot(calibration, [i]):
                start = calibration.checkpoint + 1
            for layer in range(start, current):
                self.extra_reads[node] += 1
                self.flow.load_call(worker, layer, self.flow.read_layer(node, layer), True)
                self._get([self._submit_layer(i, layer)])
        self.flow.replace_worker(i, worker, node)

    def _start_workers(self, indices: list[int]) -> None:
        """New workers in bundles ``indices`` (stand-ins for lost ones), set up as the job's
        first ones were: the model for a calibration worker, the device plan's limits."""
        for i in indices:
            gptq = i < self.calibration_workers and self.plan.recipe.gptq is not None
            worker = self.workers[i] = new_worker(self.placement, i, gptq, self.config.exact)
            if i < self.calibration_workers:
                self._configure_calibration(worker)
            if self.device_plan is not None:
                worker.limit_memory.remote(*self._memory_limits())
        infos = self._get([self.workers[i].describe.remote() for i in indices])
        for i, info in zip(indices, infos):
            self.placement.nodes[i] = info["node_id"]

    def _configure_calibration(self, worker) -> None:
        configure(worker, self.config, self.plan.source.config, self.plan.recipe.gptq is not None)

    # ---- input scales -----------------------------------------------------------
    def _write_scales(self) -> None:
        """The input scales file is named after its content: when re-calibration (say, after
        a config change) gives the same scales, the file already at DEST is the answer."""
        plan = self.plan
        layers = [unit.spec for unit in plan.layer_units]
        tensors = scale_tensors(layers, self.layer_amax, plan.spec.kv_args, torch_dtype(plan.spec.dtype))
        key = TensorShard("", tensors).sha256()[:16]
        file_name = f"model-input-scales-{key}.safetensors"
        done = destination.load_done(self.dest, key, file_name)
        if done is None:
            done = write_unit(self.dest, key, TensorShard(file_name, tensors))
            self.computed.append(file_name)
        else:
            self.reused.append(file_name)
        self.scales = done

    def report_fields(self) -> dict:
        """What this kind of run adds to the summary (GPTQ: the Linears that fell back to RTN)."""
        return {}

    @property
    def reads(self) -> Counter:
        """Layer reads per node (what the job's statistics report)."""
        return self.flow.reads_per_node + self.extra_reads

    def files(self) -> list[WrittenFile]:
        files = [self.written[u.key] for u in self.plan.layer_units] + [self.written[u.key] for u in self.plan.copy_units]
        return files + ([self.scales] if self.scales else [])

