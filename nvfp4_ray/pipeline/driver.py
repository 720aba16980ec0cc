"""Run a plan on Ray: read each layer once per node, quantize it, calibrate through it.

For each decoder layer, in order:
  1. a read task per node that needs the layer (the node of its weight task, and every
     node with calibration workers) puts its tensors in that node's object store;
     reads run ``prefetch_layers`` ahead;
  2. a weight task quantizes the layer and writes its unit file (unless already done);
  3. every calibration worker advances its batches through the layer and returns the
     input amax of each Linear; the driver max-reduces them (exact: max is order-free)
     and persists the result, and now and then the workers persist hidden states.
Units already done at DEST (a crashed or earlier run) are skipped; calibration resumes
from the last persisted hidden states, or is skipped when every layer's statistics exist.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import ray

from nvfp4_ray.calibration.batches import deal, make_batches
from nvfp4_ray.errors import JobError
from nvfp4_ray.io import destination, versions
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import WrittenFile, encode_shard, torch_dtype
from nvfp4_ray.layer_quantizer import scale_entries
from nvfp4_ray.pipeline.events import Events
from nvfp4_ray.pipeline.layer_flow import LayerFlow
from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.plan import Plan, calibration_keys, digest, reference_drops_causal_mask
from nvfp4_ray.pipeline.workers import (
    CalibrationWorker,
    copy_unit_task,
    read_tensors_task,
    unwrap,
    warm_up_task,
    write_unit,
)

CALIBRATION_DIR = versions.CALIBRATION
MAX_WORKER_REPLACEMENTS = 3


@dataclass
class Calibration:
    workers: list
    shares: list[list]  # batches of each worker
    nodes: list[str]  # node of each worker
    keys: list[str]  # per layer
    first: int  # first layer whose statistics must be computed
    checkpoint: int | None  # layer whose persisted hidden states the workers started from
    devices: list[str]
    tokens: int = 0
    compute_s: float = 0.0  # the busiest worker's seconds inside run_layer
    last_checkpoint_time: float = field(default_factory=time.monotonic)


def start_workers(placement: Placement, config, inputs) -> list:
    """Warm the weight tasks' processes and create the calibration actors; called before the
    plan is finished, so that the seconds a process takes to import torch and create a CUDA
    context pass while the plan completes and the first layers are read."""
    if placement.gpu:  # on CPU-only nodes they would only compete with the actors' start-up
        for bundle in range(placement.size):
            for _ in range(placement.tasks_per_bundle):
                warm_up_task.options(**placement.task_options(bundle)).remote()
    return _start_calibration_workers(placement, config, inputs)


def _start_calibration_workers(placement: Placement, config, inputs) -> list:
    if inputs.samples is None:
        return []
    count = min(placement.size, len(make_batches(inputs.samples, config.batch_tokens)))
    return [_calibration_worker(placement, i, config, inputs.source.config) for i in range(count)]


def _calibration_worker(placement: Placement, bundle: int, config, model_config: dict):
    import torch

    drop_mask = reference_drops_causal_mask(config, model_config)
    batched = config.batch_tokens is not None
    # the driver is a plain process: its thread count is what llm-compressor would use here
    threads = torch.get_num_threads()
    return CalibrationWorker.options(**placement.worker_options(bundle)).remote(model_config, batched, drop_mask, threads)


class Execution:
    def __init__(self, plan: Plan, placement: Placement, events: Events, workers: list):
        self.plan, self.placement, self.events = plan, placement, events
        self.started_workers = workers  # calibration actors created by start_workers
        self.config = plan.config
        self.dest = Store(self.config.dest)
        self.written: dict[str, WrittenFile] = {}  # unit key -> file
        self.layer_amax: list[dict[str, float]] = [{} for _ in plan.layer_units]
        self.extra_reads: Counter = Counter()  # node -> layers read again for replaced workers
        self.reused: list[str] = []
        self.computed: list[str] = []
        self.replacements = 0
        self.calibration: Calibration | None = None
        self.scales: WrittenFile | None = None

    # ---- top level ---------------------------------------------------------------
    def run(self) -> None:
        plan = self.plan
        aborted = destination.abort_stale_uploads(self.dest)
        if aborted:
            self.events.info(f"removed {aborted} unfinished writes an earlier run left at DEST", aborted=aborted)
        units = [(u.key, u.file) for u in plan.layer_units] + [(u.key, u.file) for u in plan.copy_units]
        for key, file_name in units:
            done = destination.load_done(self.dest, key, file_name)
            if done is not None:
                self.written[key] = done
                self.reused.append(file_name)
        if self.reused:
            self.events.info(f"reusing {len(self.reused)} unit files already at DEST", reused=len(self.reused))
        copies = [
            copy_unit_task.options(**Placement.on_node(self.placement.nodes[i % self.placement.size])).remote(
                unit, self.config.source, self.config.dest
            )
            for i, unit in enumerate(plan.copy_units)
            if unit.key not in self.written
        ]
        count = self._calibration_worker_count()
        # never more than half the object store: the rest is for the tasks' results and spills
        budget = min(self.config.prefetch_gib * 2**30, self.placement.object_store_bytes / 2)
        self.flow = LayerFlow(plan, self.placement, set(self.written), self.placement.nodes[:count], budget)
        self.flow.pump(0)  # reads and weight tasks start while the calibration workers start up
        if plan.needs_calibration:
            with self.events.stage("calibration_setup"):
                self.calibration = self._prepare_calibration()
                self.flow.start_calibration_at(self.calibration.first)
        with self.events.stage("layers"):
            self._layer_loop()
        with self.events.stage("copy"):
            for written in self._get(copies):
                self.written[self._key_of(written.name)] = written
                self.computed.append(written.name)
        if self.calibration is not None:
            self._write_scales()

    def _key_of(self, file_name: str) -> str:
        return file_name.rsplit("-", 1)[1].removesuffix(".safetensors")

    def _get(self, refs):
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = unwrap(exc)
            if cause is not exc:
                raise cause from None
            raise JobError(_task_failure(exc)) from None

    # ---- calibration setup ---------------------------------------------------------
    def _calibration_worker_count(self) -> int:
        if not self.plan.needs_calibration:
            return 0
        return min(self.placement.size, len(make_batches(self.plan.samples, self.config.batch_tokens)))

    def _prepare_calibration(self) -> Calibration:
        plan, placement = self.plan, self.placement
        batches = make_batches(plan.samples, self.config.batch_tokens)
        count = self._calibration_worker_count()
        workers = self.started_workers or [self._new_worker(i) for i in range(count)]
        infos = self._get([w.describe.remote() for w in workers])
        self.events.info("calibration workers ready", startup=[info["startup"] for info in infos])
        signature = "+".join(sorted({info["signature"] for info in infos}))
        keys = calibration_keys(plan, signature)
        first, checkpoint = self._resume_point(keys)
        calibration = Calibration(
            workers=workers,
            shares=deal(batches, count),
            nodes=[placement.nodes[i] for i in range(count)],
            keys=keys,
            first=first,
            checkpoint=checkpoint,
            devices=[info["device"] for info in infos],
        )
        if first == len(keys):
            self.events.info("calibration statistics for every layer already at DEST: skipping calibration")
            return calibration
        if first:
            self.events.info(f"resuming calibration at layer {first} from persisted state", layer=first)
        began = time.monotonic()
        self._start_workers(calibration, range(count))
        self.events.info("calibration batches embedded", seconds=round(time.monotonic() - began, 3))
        return calibration

    def _new_worker(self, bundle: int):
        return _calibration_worker(self.placement, bundle, self.config, self.plan.source.config)

    def _resume_point(self, keys: list[str]) -> tuple[int, int | None]:
        """First layer to calibrate, and the layer whose hidden states to start from."""
        first, checkpoint = 0, None
        for index, key in enumerate(keys):
            try:
                self.layer_amax[index] = json.loads(self.dest.read_text(f"{CALIBRATION_DIR}/{key}.json"))
            except (FileNotFoundError, ValueError):
                break
            first = index + 1
            if self.dest.exists(f"{CALIBRATION_DIR}/{key}/_COMPLETE"):
                checkpoint = index
        if first < len(keys):
            first = 0 if checkpoint is None else checkpoint + 1
        return first, checkpoint

    def _start_workers(self, calibration: Calibration, indices) -> None:
        plan = self.plan
        embed = plan.source.tensors[plan.spec.embed_tensor]
        embed_refs = {}
        starts = []
        for i in indices:
            node = calibration.nodes[i]
            if node not in embed_refs:
                embed_refs[node] = read_tensors_task.options(**Placement.on_node(node)).remote(self.config.source, [embed])
            starts.append(calibration.workers[i].start.remote(calibration.shares[i], embed_refs[node], embed.name))
        tokens = self._get(starts)
        calibration.tokens = max(calibration.tokens, sum(tokens))
        if calibration.checkpoint is not None:
            folder = f"{CALIBRATION_DIR}/{calibration.keys[calibration.checkpoint]}"
            self._get([calibration.workers[i].load_hidden.remote(self.config.dest, folder) for i in indices])

    # ---- the layer loop ----------------------------------------------------------
    def _layer_loop(self) -> None:
        flow = self.flow
        self.events.progress("layers", len(flow.todo), unit="layer")
        for position, index in enumerate(flow.todo):
            flow.pump(position)
            if index >= flow.calibrate_from:
                self._calibrate_layer(index, flow.reads[index])
            flow.calibrated(index)
            self._record(flow.finished_weights(block=False))
            while flow.held() > flow.budget and flow.pending:  # weight tasks lag: bound memory
                self._record(flow.finished_weights(block=True))
            self.events.advance("layers")
        while flow.pending:
            self._record(flow.finished_weights(block=True))
        if self.calibration is not None and self.calibration.first < len(self.calibration.keys):
            busy = self._get([w.busy_seconds.remote() for w in self.calibration.workers])
            self.calibration.compute_s = round(max(busy), 3)

    def _record(self, refs: list) -> None:
        for written in self._get(refs):
            self.written[self._key_of(written.name)] = written
            self.computed.append(written.name)

    def _calibrate_layer(self, index: int, refs: dict[str, object]) -> None:
        calibration = self.calibration
        spec = self.plan.layer_units[index].spec
        for node in set(calibration.nodes) - set(refs):  # a replaced worker on another node
            refs[node] = read_tensors_task.options(**Placement.on_node(node)).remote(
                self.config.source, self.plan.layer_units[index].tensors
            )
            self.extra_reads[node] += 1
        calls = [
            worker.run_layer.remote(index, refs[node], *self._layer_call(spec))
            for worker, node in zip(calibration.workers, calibration.nodes)
        ]
        results = self._gather_layer(index, calls, refs)
        reduced = {}
        for local in self.plan.record_sets()[index]:
            values = [result[local] for result in results if local in result]
            reduced[local] = math.nan if any(math.isnan(v) for v in values) else max(values)
        self.layer_amax[index] = reduced
        key = calibration.keys[index]
        self.dest.write_text(f"{CALIBRATION_DIR}/{key}.json", json.dumps(reduced, sort_keys=True))
        self._maybe_checkpoint(index)

    @staticmethod
    def _layer_call(spec) -> tuple:
        return dict(spec.tensors), list(spec.recorded), [a.local for a in spec.attention]

    def _gather_layer(self, index: int, calls: list, refs: dict) -> list[dict]:
        """Results of every worker for one layer; a lost worker is replaced and caught up."""
        results = []
        for i, call in enumerate(calls):
            try:
                results.append(ray.get(call))
            except ray.exceptions.RayTaskError as exc:
                cause = unwrap(exc)
                if cause is not exc:
                    raise cause from None
                raise JobError(_task_failure(exc)) from None
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                results.append(self._replace_worker(i, index, refs, exc))
        return results

    def _replace_worker(self, i: int, index: int, refs: dict, error: Exception) -> dict:
        """Start a new worker in the lost one's bundle and redo its batches up to ``index``."""
        calibration = self.calibration
        self.replacements += 1
        if self.replacements > MAX_WORKER_REPLACEMENTS:
            raise JobError(f"calibration workers failed {self.replacements} times; last: {type(error).__name__}")
        self.events.warning(f"calibration worker {i} was lost at layer {index}; redoing its batches", worker=i, layer=index)
        worker = calibration.workers[i] = self._new_worker(i)
        info = self._get([worker.describe.remote()])[0]
        calibration.nodes[i] = node = info["node_id"]
        self._start_workers(calibration, [i])
        start = 0 if calibration.checkpoint is None else calibration.checkpoint + 1
        for layer in range(start, index + 1):
            unit = self.plan.layer_units[layer]
            ref = refs.get(node) if layer == index else None
            if ref is None:
                ref = read_tensors_task.options(**Placement.on_node(node)).remote(self.config.source, unit.tensors)
                self.extra_reads[node] += 1
            result = self._get([worker.run_layer.remote(layer, ref, *self._layer_call(unit.spec))])[0]
        return result

    def _maybe_checkpoint(self, index: int) -> None:
        calibration = self.calibration
        if index == len(calibration.keys) - 1:
            return
        if time.monotonic() - calibration.last_checkpoint_time < self.config.checkpoint_minutes * 60:
            return
        folder = f"{CALIBRATION_DIR}/{calibration.keys[index]}"
        self._get([w.save_hidden.remote(self.config.dest, folder) for w in calibration.workers])
        self.dest.write_bytes(f"{folder}/_COMPLETE", b"")
        if calibration.checkpoint is not None and calibration.checkpoint != index:
            self.dest.delete(f"{CALIBRATION_DIR}/{calibration.keys[calibration.checkpoint]}")
        calibration.checkpoint = index
        calibration.last_checkpoint_time = time.monotonic()

    # ---- input scales -----------------------------------------------------------
    def _write_scales(self) -> None:
        """The input scales file is named after its content: when re-calibration (say, after
        a config change) gives the same scales, the file already at DEST is the answer."""
        plan = self.plan
        layers = [unit.spec for unit in plan.layer_units]
        entries = scale_entries(layers, self.layer_amax, plan.spec.kv_args, torch_dtype(plan.spec.dtype))
        data, written = encode_shard("", entries)
        key = written.sha256[:16]
        file_name = f"model-input-scales-{key}.safetensors"
        done = destination.load_done(self.dest, key, file_name)
        if done is None:
            done = write_unit(self.dest, file_name, key, entries, (data, replace(written, name=file_name)))
            self.computed.append(file_name)
        else:
            self.reused.append(file_name)
        self.scales = done

    def calibration_record(self) -> dict | None:
        """Per layer: the calibration key and the reduced amax (kept in the manifest)."""
        if self.calibration is None:
            return None
        layers = [{"module": u.spec.module, "amax": amax} for u, amax in zip(self.plan.layer_units, self.layer_amax)]
        return {"keys": self.calibration.keys, "layers": layers}

    @property
    def reads(self) -> Counter:
        """Layer reads per node (what the job's statistics report)."""
        return self.flow.reads_per_node + self.extra_reads

    def files(self) -> list[WrittenFile]:
        files = [self.written[u.key] for u in self.plan.layer_units] + [self.written[u.key] for u in self.plan.copy_units]
        return files + ([self.scales] if self.scales else [])


def _task_failure(exc: Exception) -> str:
    from nvfp4_ray.io.storage import redact

    lines = [line for line in str(exc).splitlines() if line.strip()]
    return redact(f"a task failed: {lines[-1] if lines else type(exc).__name__}")
