"""The layer worker actor: one per GPU (or per CPU-only node). It copies each layer it is
given to its device once (a local SOURCE's layers it reads itself, from the page cache),
quantizes the layers it owns from there and writes their unit files (its load and write
threads: worker_loads.py), and runs its share of the calibration batches through the
decoder one layer at a time (its compute thread: run_layer, and GPTQ's steps).

One process per GPU, so nothing else competes for it (separate processes would be
time-sliced); the tasks that only move bytes are in unit_tasks.py.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import ray

from nvfp4_ray.io.shards import TensorShard
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import LocalRead, TensorBundle, read_file
from nvfp4_ray.pipeline.unit_tasks import dest_write_errors, retrying
from nvfp4_ray.pipeline.worker_loads import LayerLoads, pinned_copier

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


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"load": 1, "write": 1})
class LayerWorker(LayerLoads):
    def __init__(self, cpu_threads: int, requested_at: float, gptq: bool = False, exact: bool = False):
        """Imports and the device, nothing of the job: a worker is created before the inputs
        are read, and ``configure`` gives a calibration worker its model. ``requested_at``:
        when the driver asked for it (time.time()). ``gptq``: the command line asks for
        GPTQ (``exact``: --exact); its steps are made ready from the start (_start_gptq)."""
        # Start-up is timed step by step: on a GPU machine it is the largest fixed cost of a
        # job. The first step is Ray's: placing the actor and starting its process.
        self.clock = self.began = time.monotonic()
        self.startup = {"process_start_s": round(max(0.0, time.time() - requested_at), 3)}
        for name in UNUSED_BY_WORKERS:
            sys.modules.setdefault(name, None)
        import torch

        self.startup["import_torch_s"] = self._lap()
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        # bf16 matmuls on CPUs round differently with different thread counts: use what a
        # plain PyTorch process (llm-compressor) uses on this machine, not Ray's CPU share
        self.cpu_threads = cpu_threads
        if self.device.type == "cuda":
            torch.empty(1, device=self.device)  # the CUDA context, now rather than at the first layer
            self.load_stream = torch.cuda.Stream(self.device)
        self.startup["device_init_s"] = self._lap()
        self.gptq_start: Future | None = None  # a GPTQ job's steps, made ready in a thread
        self.gptq_steps = None  # pipeline/gptq_worker.py, from gptq_start at the first step
        self.gptq_startup: dict[str, float] = {}  # the GPTQ start's steps, timed (in the summary's worker_startup_s)
        imported = threading.Event()
        if gptq:
            self.gptq_start = ThreadPoolExecutor(1, thread_name_prefix="gptq-start").submit(self._start_gptq, exact,
                                                                                          imported)  # fmt: skip
        try:
            import nvfp4_ray.layer_quantizer  # noqa: F401  (compressed-tensors, and transformers with it)

            self.startup["import_quantizer_s"] = self._lap()
            if gptq:
                _gptq_modules_alone()
                import nvfp4_ray.pipeline.gptq_worker  # noqa: F401  (llm-compressor's GPTQ modules with it: 0.01 s)
        finally:
            imported.set()  # (a failed import fails the thread's too, not waiting for ever)
        self.runner = None
        self._init_loads()
        self.snapshot_copier = pinned_copier(self.device) if self.device.type == "cuda" else (None, None)
        self.busy_s = 0.0  # seconds spent running layers: the compute side of calibration
        self.load_wait_s = 0.0  # of those, waiting for the load thread (the layer's read and copy)
        self.snapshot_s = 0.0  # seconds spent writing hidden-state snapshots (in the background)
        self.snapshot_writer = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self.snapshots: dict[str, Future] = {}  # folder -> hidden-state write in progress or done

    def _lap(self) -> float:
        began, self.clock = self.clock, time.monotonic()
        return round(self.clock - began, 3)

    def configure(self, model_config: dict, attention: str, drop_causal_mask: bool, graphs: bool, gptq: bool,
                  exact: bool) -> None:  # fmt: skip
        """Make this a calibration worker of ``model_config``; of a GPTQ job: its steps are
        made ready in a thread, if __init__ has not started that already."""
        self.clock = time.monotonic()
        from nvfp4_ray.calibration.runner import DecoderRunner

        self.startup["import_runner_s"] = self._lap()
        self.runner = DecoderRunner(model_config, str(self.device), attention, drop_causal_mask, graphs)
        self.startup["build_model_s"] = self._lap()
        if gptq and self.gptq_start is None:
            self.gptq_start = ThreadPoolExecutor(1, thread_name_prefix="gptq-start").submit(self._start_gptq, exact)

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

    def _start_gptq(self, exact: bool, imported: threading.Event | None = None):
        """The GPTQ steps, and their kernels loaded: on the H100 the first layer's solves
        took 0.9 s against 0.25 s for the next ones (docs/gptq.md#speed). The first step
        waits for them: this thread holds the interpreter part of the time, which a Hessian
        pass beside it needs to launch its kernels (the first layer 0.4 s slower, 2228).
        Started by __init__: Triton's and cuSOLVER's start first, beside the main thread's
        imports, then, once ``imported`` is set, the rest; the imports stay in the main
        thread (two threads importing the same packages can deadlock)."""
        began = time.monotonic()
        if self.device.type == "cuda":
            _load_gptq_runtime(self.device)
        loaded = time.monotonic()
        if imported is not None:
            imported.wait()
        waited = time.monotonic()
        _gptq_modules_alone()  # GPTQ runs llm-compressor's own block update (its Triton kernel on CUDA)
        from nvfp4_ray.pipeline.gptq_worker import GptqSteps

        steps = GptqSteps(self)
        if self.device.type == "cuda":
            import torch

            from nvfp4_ray.formats import gptq

            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):  # beside the compute thread's kernels
                gptq.warm_up(self.device, exact)
            stream.synchronize()
        done = time.monotonic()
        self.gptq_startup.update(gptq_runtime_s=round(loaded - began, 3), gptq_imports_wait_s=round(waited - loaded, 3),
                                 gptq_warm_up_s=round(done - waited, 3), gptq_ready_s=round(done - self.began, 3))  # fmt: skip
        return steps

    def gptq(self, step: str, *args):
        """A GPTQ step (pipeline/gptq_worker.py) on this worker's runner and device."""
        if self.gptq_steps is None:
            began = time.monotonic()
            self.gptq_steps = self.gptq_start.result()
            self.gptq_startup["gptq_first_step_wait_s"] = round(time.monotonic() - began, 3)
        self._compute_threads()
        return getattr(self.gptq_steps, step)(*args)

    @ray.method(concurrency_group="write")
    def gptq_write(self, index: int, dest_url: str):
        """GPTQ's unit write (GptqSteps.write_unit) in a write thread, beside the next layer's
        calibration pass: submitted once the layer's propagate here kept its tensors."""
        return self.gptq_steps.write_unit(index, dest_url)

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
        """Where the calibration time went, and what the runner noted about how it ran; the
        start-up's seconds again, with the GPTQ start's, which may end after describe."""
        return {"startup": {**self.startup, **self.gptq_startup}, "run_layer_s": self.busy_s,
                "load_wait_s": self.load_wait_s, "snapshot_write_s": self.snapshot_s,
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


def _load_gptq_runtime(device) -> None:
    """What a GPTQ worker's first solve loads that needs only torch and Triton: Triton's
    driver (on a fresh machine it compiles its CUDA helper with gcc), the hash of Triton's
    own files that keys its kernel cache (once a process; 0.46 s on the H100), cuSOLVER with
    a first Cholesky. Mostly gcc, the disk and the GPU, not the interpreter: beside the
    quantizer's import they cost it nothing measurable (bench/gptq_start_probe.py)."""
    import torch

    try:  # (the main thread's imports import it too, none of them while holding one it needs)
        import triton
        from triton.runtime.cache import triton_key
    except ImportError:  # llm-compressor's block update then runs its eager loop
        return
    triton.runtime.driver.active.get_current_device()
    triton_key()
    torch.linalg.cholesky(2 * torch.eye(64, device=device))
    torch.cuda.synchronize(device)


def _gptq_modules_alone() -> None:
    """Let ``import llmcompressor.modifiers.gptq.gptq_quantize`` run only that module and
    its helpers (which import torch, transformers and compressed-tensors, already here),
    not the packages' __init__ files above them: llmcompressor's imports its entrypoints,
    and datasets, pyarrow and pandas with them, seconds of a worker's first GPTQ layer on
    the GPU machine (there `import llmcompressor` took 6.2 s against compressed-tensors'
    4.8 s). The packages are entered as bare namespaces over their folders; a worker uses
    nothing else of llm-compressor."""
    import importlib.util
    import types

    if "llmcompressor" in sys.modules:
        return
    root = importlib.util.find_spec("llmcompressor").submodule_search_locations[0]  # found, not run
    for name, folder in (("llmcompressor", root), ("llmcompressor.modifiers", f"{root}/modifiers"),
                         ("llmcompressor.modifiers.gptq", f"{root}/modifiers/gptq")):  # fmt: skip
        package = types.ModuleType(name)
        package.__path__ = [folder]
        sys.modules[name] = package


def _write_hidden(dest: Store, folder: str, hidden: dict, copier=(None, None), done=None) -> tuple[float, dict]:
    """Write one snapshot, a file per batch; its seconds and each file's sha256. From a GPU
    through ``copier`` (a host buffer and a stream: TensorShard), after ``done``: a CUDA
    event after the kernels that produced ``hidden``."""
    began = time.monotonic()
    digests = {}
    for index, tensor in hidden.items():
        shard = TensorShard(f"batch-{index:05d}.safetensors", [("hidden", tensor)], copier[0], done, copier[1])
        name = f"{folder}/{shard.name}"

        def write():
            with dest_write_errors(dest, name):
                dest.write_parts(name, shard.parts(), durable=False, size=shard.size)

        retrying(dest.display(name), write)
        digests[shard.name] = shard.written.sha256
    # Not fsynced: waiting for 1 GiB to reach the disk (8B model) was the job's last 2.8 s,
    # behind the unit files being written. The folder counts once the driver's _COMPLETE
    # marker, which holds these digests, is written after this returns; a resume checks
    # every file against its digest (load_hidden) and calibrates from the start otherwise.
    return time.monotonic() - began, digests
