"""A layer worker's load thread and write threads (LayerWorker inherits LayerLoads).

``load`` (a concurrency group of its own) copies layer k+1 to the GPU on a side stream,
and for a layer the worker owns quantizes it there, while the compute thread runs layer k;
run_layer takes a loaded layer with ``_take``. Write threads write the quantized layers to
DEST, at most ``writes_limit`` behind the load thread, which waits for them beyond that:
the packed layers never pass through the object store, and the memory they hold does not
grow with the model's depth when DEST is slower than the GPU. On a GPU they wait there,
and cross to the host one chunk at a time as they are written (as the hidden-state
snapshots do). A layer larger than the device budget comes in expert groups, at most
``groups_limit`` of them on the device at once.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import ray

from nvfp4_ray.io.shards import TensorShard
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import LocalRead, TensorBundle
from nvfp4_ray.pipeline.unit_tasks import write_retrying

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


class _Loaded:
    """Layer ``index`` on the worker's device, handed from the load thread to run_layer."""

    def __init__(self):
        self.ready = threading.Event()
        self.tensors: dict | None = None  # parameter name inside the layer -> device tensor
        self.event = None  # CUDA event after the copies, on the load stream
        self.error: BaseException | None = None


class LayerLoads:
    def _init_loads(self) -> None:
        """The load and write threads' state, on ``self.device`` (its load stream exists)."""
        import torch

        self.loaded: dict[int, _Loaded] = {}
        # Two pinned pieces a layer crosses to the GPU through: one is filled while the other
        # is copied out (``to_device_in_pieces``)
        self.pieces = None
        # A pinned buffer and a stream per write thread (GPUs only)
        self.write_copiers: queue.SimpleQueue = queue.SimpleQueue()
        if self.device.type == "cuda":
            self.pieces = [torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            for _ in range(WRITES_QUEUED):
                self.write_copiers.put(pinned_copier(self.device))
        self.pieces_lock = threading.Lock()
        self.lock = threading.Lock()
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
        self.writes: dict[int, Future] = {}  # layer -> its unit's WrittenFile, once written

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

    @contextmanager
    def write_copier(self):
        """A write thread's pinned buffer and stream for a unit's crossing to the host, a
        chunk at a time (None, None on a CPU), given back after the write."""
        if self.device.type == "cpu":
            yield None, None
            return
        copier = self.write_copiers.get()
        try:
            yield copier
        finally:
            self.write_copiers.put(copier)

    def _write_behind(self, index: int, output: list, ready, file_name: str, key: str, dest_url: str) -> None:
        """Write layer ``index``'s unit in a write thread, once fewer than ``writes_limit``
        are ahead of it (the load thread waits until then)."""
        slot = self._write_slot(index)
        with self.write_room:
            self.write_room.wait_for(lambda: self.writes_queued < self.writes_limit)
            self.writes_queued += 1

        def write():
            try:
                with self.write_copier() as (buffer, stream):
                    slot.set_result(write_retrying(Store(dest_url), key, TensorShard(file_name, output, buffer, ready, stream)))
            except BaseException as exc:
                slot.set_exception(exc)
            finally:
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


def pinned_copier(device) -> tuple:
    """A pinned buffer and a stream of its own, for a thread that copies a GPU's output to
    the host as it writes it (TensorShard)."""
    import torch

    return torch.empty(WRITE_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True), torch.cuda.Stream(device)
