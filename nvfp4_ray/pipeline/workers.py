"""The Ray tasks and the layer worker actor. Each wraps a plain function from the library.

  read_tensors_task  reads tensors of an object-store SOURCE once on a node; the result
                     stays in that node's object store, shared zero-copy by its processes
  read_ahead_task    reads later layers of a local SOURCE into a node's page cache and drops
                     the bytes: the disk keeps going while the workers start and compute
  LayerWorker        one per GPU (or per CPU-only node): copies each layer it is given to
                     its device once (a local SOURCE's layers it reads itself, from the page
                     cache), quantizes the layers it owns from there and writes their unit
                     files, and runs its share of the calibration batches through the
                     decoder one layer at a time
  copy_unit_task     copies tensors outside the decoder layers, byte for byte

A worker has three kinds of thread. ``load`` (its own concurrency group) copies layer k+1 to the
GPU on a side stream and quantizes it there while ``run_layer`` computes layer k; one
process per GPU, so nothing else competes for it (separate processes would be
time-sliced). Write threads write the quantized layers to DEST, at most WRITES_QUEUED
behind the load thread, which waits for them beyond that: the packed layers never pass
through the object store, and the memory they hold does not grow with the model's depth
when DEST is slower than the GPU. On a GPU they wait there, and cross to the host one
chunk at a time as they are written (as the hidden-state snapshots do).
"""

from __future__ import annotations

import errno
import json
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import ray

from nvfp4_ray.errors import InputError, JobError
from nvfp4_ray.io import destination
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import CopiedShard, LocalRead, TensorBundle, TensorShard, read_file, read_tensors

# torch, transformers and compressed-tensors are imported inside the worker and the tasks
# that use them: a process that only reads or writes bytes starts in a fraction of a second.
# What a layer worker imports, for Ray's ``preload_python_modules`` (RAY_preload_python_modules
# on `ray start`): idle worker processes import these before they take work, so a worker
# created later skips seconds of imports.
PRELOAD_MODULES = ("torch", "transformers.modeling_utils", "nvfp4_ray.layer_quantizer", "nvfp4_ray.calibration.runner")
# Where installed, transformers imports scikit-learn (for assisted generation) and scipy (for
# detection losses), and pandas with them: a layer worker uses none of them, and on an image
# that has them (the GPU machine's) they were seconds of its start-up. It imports as if
# they were absent (a None entry in sys.modules reads as "not installed" to find_spec).
UNUSED_BY_WORKERS = ("sklearn", "scipy", "pandas")

# Storage hiccups (resets, throttling, timeouts) surface as OSError subclasses: retry those.
# InputError (a broken source) and JobError (e.g. a full disk) are never retried.
RETRYABLE = (OSError, ConnectionError, TimeoutError)
RETRIES = 4
RETRY = dict(max_retries=RETRIES, retry_exceptions=list(RETRYABLE))
# Quantized layers a worker holds for its write threads (one each): about 0.12 GiB each on
# the 8B model, in GPU memory on a GPU. One thread, writing and fsyncing one unit at a time,
# fell behind the GPU (H200, 32 layers: the loop waited 4.1 s for loads, probe 1929).
WRITES_QUEUED = 4
# The pinned buffer each write thread (and the snapshot thread) copies a GPU's output
# through, a chunk at a time (TensorShard): the host holds these, not the packed layers.
WRITE_CHUNK_BYTES = 8 << 20
# The pinned buffers a layer crosses to the GPU through: 2 x 64 MiB, whatever the layer's size.
# A 64 MiB piece is read from the page cache by several threads (the store's local read
# chunks are smaller) while the previous one is copied to the GPU.
PIECE_BYTES = 64 << 20
_HOPELESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_unit(dest: Store, key: str, shard: TensorShard | CopiedShard):
    """Write a unit's file (``shard.name``) and its completion record."""
    with _dest_errors(dest, shard.name):
        dest.write_parts(shard.name, shard.parts(), size=shard.size)
        destination.save_done(dest, key, shard.written)
    return shard.written


def _write_retrying(dest: Store, key: str, shard: TensorShard):
    """write_unit, tried again after a storage hiccup, as Ray retries a task."""
    for attempt in range(RETRIES + 1):
        try:
            return write_unit(dest, key, shard)
        except RETRYABLE:
            if attempt == RETRIES:
                raise
            time.sleep(min(4.0, 0.5 * 2**attempt))


@contextmanager
def _dest_errors(dest: Store, file_name: str):
    """Storage errors that a retry cannot fix (full disk, read-only or forbidden DEST) fail
    the job at once."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _HOPELESS:
            raise JobError(
                f"cannot write {dest.display(file_name)}: {exc.strerror}; fix DEST and run the same command again to resume"
            ) from None
        raise


@ray.remote(num_cpus=0, **RETRY)
def read_tensors_task(source_url: str, tensors: list) -> TensorBundle:
    return read_tensors(Store(source_url), tensors)


@ray.remote(num_cpus=0, max_retries=0)
def read_ahead_task(source_url: str, reads: list) -> None:
    """Nobody takes its result: a failure (say, a file gone) is left to the real read, which
    names it, rather than to Ray's log of unhandled task errors."""
    try:
        Store(source_url).read_ahead(reads)
    except OSError:
        pass


@ray.remote(num_cpus=0, **RETRY)
def copy_unit_task(file_name: str, key: str, tensors: list, source_url: str, dest_url: str):
    """Plain arguments, not the plan's CopyUnit: unpickling that would import the planner,
    and with it torch and transformers (seconds of a cold start, in a process that copies bytes)."""
    return write_unit(Store(dest_url), key, CopiedShard(file_name, Store(source_url), tensors))


class _Loaded:
    """Layer ``index`` on the worker's device, handed from the load thread to run_layer."""

    def __init__(self):
        self.ready = threading.Event()
        self.tensors: dict | None = None  # parameter name inside the layer -> device tensor
        self.event = None  # CUDA event after the copies, on the load stream
        self.error: BaseException | None = None


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"load": 1, "write": 1})
class LayerWorker:
    def __init__(self, cpu_threads: int, requested_at: float):
        """Imports and the device, nothing of the job: a worker is created before the inputs
        are read, and ``configure`` gives a calibration worker its model. ``requested_at``:
        when the driver asked for it (time.time())."""
        # Start-up is timed step by step: on a GPU machine it is the largest fixed cost of a
        # job. The first step is Ray's: placing the actor and starting its process.
        self.clock = time.monotonic()
        self.startup = {"process_start_s": round(max(0.0, time.time() - requested_at), 3)}
        for name in UNUSED_BY_WORKERS:
            sys.modules.setdefault(name, None)
        import torch

        self.startup["import_torch_s"] = self._lap()
        import nvfp4_ray.layer_quantizer  # noqa: F401  (compressed-tensors, and transformers with it)

        self.startup["import_quantizer_s"] = self._lap()
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        # bf16 matmuls on CPUs round differently with different thread counts: use what a
        # plain PyTorch process (llm-compressor) uses on this machine, not Ray's CPU share
        self.cpu_threads = cpu_threads
        if self.device.type == "cuda":
            torch.empty(1, device=self.device)  # the CUDA context, now rather than at the first layer
            self.load_stream = torch.cuda.Stream(self.device)
        self.startup["device_init_s"] = self._lap()
        self.runner = None
        self.loaded: dict[int, _Loaded] = {}
        # Two pinned pieces a layer crosses to the GPU through: one is filled while the other
        # is copied out (``to_device_in_pieces``)
        self.pieces = None
        # A pinned buffer and a stream per write thread, and for the snapshot thread (GPUs only)
        self.write_copiers: queue.SimpleQueue = queue.SimpleQueue()
        self.snapshot_copier = (None, None)
        if self.device.type == "cuda":
            self.pieces = [torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            for _ in range(WRITES_QUEUED):
                self.write_copiers.put(_copier(self.device))
            self.snapshot_copier = _copier(self.device)
        self.pieces_lock = threading.Lock()
        self.lock = threading.Lock()
        self.busy_s = 0.0  # seconds spent running layers: the compute side of calibration
        self.load_wait_s = 0.0  # of those, waiting for the load thread (the layer's read and copy)
        self.snapshot_s = 0.0  # seconds spent writing hidden-state snapshots (in the background)
        self.snapshot_writer = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self.snapshots: dict[str, Future] = {}  # folder -> hidden-state write in progress or done
        self.writer = ThreadPoolExecutor(WRITES_QUEUED, thread_name_prefix="write")
        # Quantized layers queued for the write threads: at most writes_limit (set from the
        # device's memory, device_memory.py); and the most calibrated layers held at once
        self.write_room = threading.Condition()
        self.writes_limit = WRITES_QUEUED
        self.writes_queued = self.max_layers_held = 0
        # Expert groups of layers loaded in parts on the device, and the most there may be
        self.group_room = threading.Condition()
        self.groups_limit, self.groups_held = 1, 0
        self.part_outputs: dict[int, list] = {}  # layer -> quantized output of the parts loaded so far (load_part)
        self.failed_parts: set[int] = set()  # layers a part of which failed to load
        self.gptq_steps = None  # pipeline/gptq_worker.py, on a GPTQ job's first step
        self.writes: dict[int, Future] = {}  # layer -> its unit's WrittenFile, once written

    def _lap(self) -> float:
        began, self.clock = self.clock, time.monotonic()
        return round(self.clock - began, 3)

    def configure(self, model_config: dict, batched: bool, drop_causal_mask: bool, graphs: bool) -> None:
        """Make this a calibration worker of ``model_config``."""
        self.clock = time.monotonic()
        from nvfp4_ray.calibration.runner import DecoderRunner

        self.startup["import_runner_s"] = self._lap()
        self.runner = DecoderRunner(model_config, str(self.device), batched, drop_causal_mask, graphs)
        self.startup["build_model_s"] = self._lap()

    def _compute_threads(self) -> None:
        import torch

        if self.device.type == "cpu":  # per calling thread for OpenMP: set it where the math runs
            torch.set_num_threads(self.cpu_threads)

    def describe(self) -> dict:
        import torch

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu/{self.cpu_threads} threads"
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "device": name,
            # Calibration numerics depend on the kernels: results persisted for resume are
            # reused only on the same kind of device and the same torch.
            "signature": f"torch-{torch.__version__}/{name}",
            "device_memory": torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None,
            "startup": self.startup,
        }

    # ---- the load thread ---------------------------------------------------------------
    def _slot(self, index: int) -> _Loaded:
        with self.lock:
            slot = self.loaded.setdefault(index, _Loaded())
            self.max_layers_held = max(self.max_layers_held, len(self.loaded))
            return slot

    @ray.method(concurrency_group="load")
    def load(self, index: int, tensors: TensorBundle | LocalRead, tensor_names: dict, keep: bool, unit=None) -> None:
        """Copy layer ``index`` to the device once; keep it for run_layer (``keep``), and
        with ``unit`` (its spec, file name, key and DEST) quantize it from there and hand
        the output to the write threads (``written`` says when the file is at DEST).
        ``tensors``: the layer read into the object store, or to read here from a local SOURCE
        (a piece at a time into the pinned buffers it crosses to the GPU through)."""
        self._load(index, [(tensors, None, tensor_names)], keep, unit, in_parts=False)

    @ray.method(concurrency_group="load")
    def load_in_parts(self, index: int, parts: list, keep: bool, unit=None, merge: bool = False) -> None:
        """``load`` for a layer in parts (calibration/expert_groups.py): the tensors outside
        its routed experts, then each expert group; each part (tensors, names, tensor names).
        ``tensors``: as for ``load``, or a ref to them, read for the part or for the whole
        layer (``names`` then picks the part's). A kept group waits until fewer than
        ``groups_limit`` groups are on the device; the output is written once all are done.
        ``merge``: the parts are for the reads only; run_layer takes the layer whole."""
        self._load(index, parts, keep, unit, in_parts=True, merge=merge)

    @ray.method(concurrency_group="load")
    def load_part(self, index: int, part: int, count: int, tensors: TensorBundle, tensor_names: dict, keep: bool,
                  unit=None, merge: bool = False) -> None:  # fmt: skip
        """Part ``part`` of ``count`` of ``load_in_parts``, for a layer an object store delivers
        a part at a time (part_streams.py); its unit is written after the last part."""
        self._load(index, [(tensors, None, tensor_names)], keep, unit, in_parts=True, first=part, count=count, merge=merge)

    def _load(self, index: int, parts: list, keep: bool, unit, in_parts: bool, first: int = 0, count: int | None = None,
              merge: bool = False) -> None:  # fmt: skip
        import torch

        from nvfp4_ray.layer_quantizer import quantize_layer, to_device_checked

        count = len(parts) if count is None else count
        if index in self.failed_parts:  # an earlier part failed (load_part): nothing of the layer may be written
            return
        output = self.part_outputs.pop(index, []) if unit is not None else []  # the earlier parts' (load_part)
        slot, handed, part = None, False, first
        try:
            for part, (tensors, names, tensor_names) in enumerate(parts, start=first):
                grouped = in_parts and not merge  # run_layer takes it a part at a time
                if keep and grouped and part:
                    with self.group_room:
                        self.group_room.wait_for(lambda: self.groups_held < self.groups_limit)
                        self.groups_held += 1
                slot = self._slot((index, part) if grouped else index) if keep else None
                if isinstance(tensors, ray.ObjectRef):
                    tensors = ray.get(tensors)
                if names is not None:
                    tensors = tensors.subset(names)
                with torch.cuda.stream(self.load_stream) if self.device.type == "cuda" else nullcontext():
                    with self.pieces_lock:  # the load thread's, but for the embedding (start)
                        on_device = to_device_checked(tensors, self.device, unit is not None, self.pieces)
                    if slot is not None:
                        slot.tensors = {**(slot.tensors or {}), **{local: on_device[name] for name, local in tensor_names.items()}}
                    if slot is not None and (not merge or part + 1 == count):  # merge: once all parts are there
                        if self.device.type == "cuda":
                            slot.event = torch.cuda.Event()
                            slot.event.record(self.load_stream)
                        slot.ready.set()
                    if unit is not None:
                        output += quantize_layer(unit[0], on_device, part=in_parts)  # on the device until written
                del tensors, on_device  # a part's device copy is freed once run_layer is done with it
            if unit is not None and part + 1 < count:  # load_part: more parts to come
                self.part_outputs[index] = output
            elif unit is not None:
                ready = None
                if self.device.type == "cuda":  # the write's copies wait for the quantization
                    ready = torch.cuda.Event()
                    ready.record(self.load_stream)
                handed = True
                self._write_behind(index, output, ready, *unit[1:])
        except BaseException as exc:
            if in_parts:
                self.failed_parts.add(index)
            later = [self._slot((index, p)) for p in range(part + 1, count)] if keep and in_parts and not merge else []
            for failed in [slot, *later]:  # run_layer would wait for them
                if failed is not None and not failed.ready.is_set():
                    failed.error = exc
                    failed.ready.set()
            if unit is not None and not handed:
                self._write_slot(index).set_exception(exc)
            raise

    def _release_group(self) -> None:
        with self.group_room:
            self.groups_held -= 1
            self.group_room.notify_all()

    @ray.method(concurrency_group="load")
    def limit_memory(self, writes: int, groups: int) -> None:
        """At most ``writes`` quantized layers wait for the write threads, and ``groups``
        expert groups are on the device (device_memory.py); in the load group, so it applies
        to every load submitted after it."""
        with self.write_room:
            self.writes_limit = max(1, min(writes, WRITES_QUEUED))
            self.write_room.notify_all()
        with self.group_room:
            self.groups_limit = max(1, groups)
            self.group_room.notify_all()

    def _write_slot(self, index: int) -> Future:
        with self.lock:
            return self.writes.setdefault(index, Future())

    def _write_behind(self, index: int, output: list, ready, file_name: str, key: str, dest_url: str) -> None:
        """Write layer ``index``'s unit in a write thread, once fewer than ``writes_limit``
        are ahead of it (the load thread waits until then)."""
        slot = self._write_slot(index)
        with self.write_room:
            self.write_room.wait_for(lambda: self.writes_queued < self.writes_limit)
            self.writes_queued += 1

        def write():
            copier = (None, None) if self.device.type == "cpu" else self.write_copiers.get()
            try:
                shard = TensorShard(file_name, output, copier[0], ready, copier[1])
                slot.set_result(_write_retrying(Store(dest_url), key, shard))
            except BaseException as exc:
                slot.set_exception(exc)
            finally:
                if copier[0] is not None:
                    self.write_copiers.put(copier)
                with self.write_room:
                    self.writes_queued -= 1
                    self.write_room.notify_all()

        self.writer.submit(write)

    @ray.method(concurrency_group="write")
    def written(self, index: int):
        """The unit file of layer ``index`` (a WrittenFile), once at DEST; the load's or the
        write's error if either failed."""
        slot = self._write_slot(index)
        try:
            return slot.result()
        finally:
            with self.lock:
                self.writes.pop(index, None)

    def _take(self, index: int) -> dict:
        """The tensors of layer ``index``, once its load has copied them (on the load stream)."""
        import torch

        slot = self._slot(index)
        slot.ready.wait()
        with self.lock:
            del self.loaded[index]
        if slot.error is not None:
            raise slot.error
        if slot.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot.event)
            for tensor in slot.tensors.values():  # allocated on the load stream, used on this one
                tensor.record_stream(stream)
        return slot.tensors

    # ---- the compute thread ------------------------------------------------------------
    def start(self, batches: list, embed: TensorBundle | LocalRead, embed_name: str) -> int:
        self._compute_threads()
        if isinstance(embed, LocalRead) and self.device.type == "cuda":
            with self.pieces_lock:  # on the compute stream, which uses the weight
                weight = embed.to_device(embed_name, self.device, self.pieces)
        else:
            weight = (embed.read() if isinstance(embed, LocalRead) else embed).tensor(embed_name)
        self.runner.start(batches, weight)
        return sum(batch.tokens for batch in batches)

    def run_layer(self, index: int, record: list, attention: list, snapshot: str | None = None, dest_url: str = "",
                  groups: list | None = None) -> dict:  # fmt: skip
        """Advance this worker's batches through layer ``index``: the amax of what ``record``
        and ``attention`` name, and the hidden-state snapshots finished since the last call.
        ``snapshot``: also write the hidden states after this layer to that folder of DEST
        (in the background; the layer loop goes on). ``groups``: the layer comes in parts,
        these ranges of experts after the rest (``load_in_parts``)."""
        self._compute_threads()
        began = time.monotonic()
        if groups is None:
            weights = self._take(index)
            self.load_wait_s += time.monotonic() - began
            amax = self.runner.run_layer(index, weights, record, attention)
        else:
            from nvfp4_ray.calibration.expert_groups import run_layer_in_groups

            def take(part: int) -> dict:
                waited = time.monotonic()
                weights = self._take((index, part))
                self.load_wait_s += time.monotonic() - waited
                return weights

            release = lambda part: part and self._release_group()  # noqa: E731
            amax = run_layer_in_groups(self.runner, index, take, release, groups, record, attention)
        if snapshot is not None:
            import torch

            hidden = {state.batch.index: state.hidden for state in self.runner.states}  # later layers make new tensors
            done = None
            if self.device.type == "cuda":  # the snapshot's copies wait for this layer's last kernel
                done = torch.cuda.Event()
                done.record()
            self.snapshots[snapshot] = self.snapshot_writer.submit(
                _write_hidden, Store(dest_url), snapshot, hidden, self.snapshot_copier, done
            )
        self.busy_s += time.monotonic() - began
        return {"amax": amax, "snapshots": self._finished_snapshots(block=False)}

    def gptq(self, step: str, *args):
        """A GPTQ step (pipeline/gptq_worker.py) on this worker's runner and device."""
        if self.gptq_steps is None:
            # GPTQ runs llm-compressor's own block update (its Triton kernel on CUDA), and
            # importing llm-compressor imports pandas: no longer "absent" here
            for name in UNUSED_BY_WORKERS:
                if sys.modules.get(name, "") is None:
                    del sys.modules[name]
            from nvfp4_ray.pipeline.gptq_worker import GptqSteps

            self.gptq_steps = GptqSteps(self)
        self._compute_threads()
        return getattr(self.gptq_steps, step)(*args)

    def _finished_snapshots(self, block: bool) -> list[tuple[str, dict]]:
        done = []
        for folder, future in list(self.snapshots.items()):
            if block or future.done():
                seconds, digests = future.result()  # a failed write fails the call
                self.snapshot_s += seconds
                done.append((folder, digests))
                del self.snapshots[folder]
        return done

    def flush_snapshots(self) -> list[tuple[str, dict]]:
        """Wait for every hidden-state write; the folders finished since the last call, each
        with the sha256 of every file this worker wrote into it."""
        return self._finished_snapshots(block=True)

    def seconds(self) -> dict:
        """Where the calibration time went, and what the runner noted about how it ran."""
        return {"run_layer_s": self.busy_s, "load_wait_s": self.load_wait_s, "snapshot_write_s": self.snapshot_s,
                "cuda_graphs": self.runner.graphed, "notes": self.runner.notes,
                "max_layers_held": self.max_layers_held,
                "gptq_s": self.gptq_steps.seconds if self.gptq_steps else {}}  # fmt: skip

    def load_hidden(self, dest_url: str, folder: str) -> bool:
        """Restore this worker's hidden states from a snapshot; False (nothing restored) when
        one of its files is missing or differs from the digest the folder's marker holds
        (files are not fsynced: a machine that lost power may have lost some)."""
        dest = Store(dest_url)
        marker = dest.read_text(f"{folder}/_COMPLETE")
        digests = json.loads(marker) if marker.strip() else None  # an older marker, written after an fsync
        hidden = {}
        for state in self.runner.states:
            name = f"batch-{state.batch.index:05d}.safetensors"
            try:
                bundle = read_file(dest, f"{folder}/{name}", None if digests is None else digests.get(name, "missing"))
            except FileNotFoundError:
                bundle = None
            if bundle is None:
                return False
            hidden[state.batch.index] = bundle.tensor("hidden")
        self.runner.restore_hidden_states(hidden)
        return True


def _write_hidden(dest: Store, folder: str, hidden: dict, copier=(None, None), done=None) -> tuple[float, dict]:
    """Write one snapshot, a file per batch; its seconds and each file's sha256. From a GPU
    through ``copier`` (a host buffer and a stream: TensorShard), after ``done``: a CUDA
    event after the kernels that produced ``hidden``."""
    began = time.monotonic()
    digests = {}
    for index, tensor in hidden.items():
        shard = TensorShard(f"batch-{index:05d}.safetensors", [("hidden", tensor)], copier[0], done, copier[1])
        dest.write_parts(f"{folder}/{shard.name}", shard.parts(), durable=False, size=shard.size)
        digests[shard.name] = shard.written.sha256
    # Not fsynced: waiting for 1 GiB to reach the disk (8B model) was the job's last 2.8 s,
    # behind the unit files being written. The folder counts once the driver's _COMPLETE
    # marker, which holds these digests, is written after this returns; a resume checks
    # every file against its digest (load_hidden) and calibrates from the start otherwise.
    return time.monotonic() - began, digests


def _copier(device) -> tuple:
    """A pinned buffer and a stream of its own, for a thread that copies a GPU's output to
    the host as it writes it (TensorShard)."""
    import torch

    return torch.empty(WRITE_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True), torch.cuda.Stream(device)


def unwrap(error: Exception) -> Exception:
    """The InputError or JobError a task raised, if that is what failed."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, (InputError, JobError)) else error

