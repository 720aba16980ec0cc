"""The Ray tasks and the calibration actor. Each wraps a plain function from the library.

  read_tensors_task   reads tensors once on a node; the result stays in that node's
                      object store, shared zero-copy by the node's workers and tasks
  quantize_layer_task quantizes one decoder layer and writes its unit file
  copy_unit_task      copies tensors outside the decoder layers, byte for byte
  CalibrationWorker   holds a share of the calibration batches and runs them through
                      the decoder one layer at a time (one actor per GPU, or per node)
"""

from __future__ import annotations

import errno
import os
import socket
import time

import ray

from nvfp4_ray.errors import InputError, JobError
from nvfp4_ray.io import destination
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import TensorBundle, encode_shard, read_file, read_tensors, torch_entry, write_shard

# torch, transformers and compressed-tensors are imported inside the tasks that use them:
# a process that only reads or copies bytes then starts in a fraction of a second.

# Storage hiccups (resets, throttling, timeouts) surface as OSError subclasses: retry those.
# InputError (a broken source) and JobError (e.g. a full disk) are never retried.
RETRY = dict(max_retries=4, retry_exceptions=[OSError, ConnectionError, TimeoutError])
_HOPELESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_unit(dest: Store, file_name: str, key: str, entries: list, encoded=None):
    """Write a unit's file and its completion record; storage errors that a retry cannot
    fix (full disk, read-only or forbidden DEST) fail the job at once."""
    try:
        data, written = encoded or encode_shard(file_name, entries)
        dest.write_bytes(file_name, data)
        destination.save_done(dest, key, written)
    except OSError as exc:
        if exc.errno in _HOPELESS:
            raise JobError(
                f"cannot write {dest.display(file_name)}: {exc.strerror}; fix DEST and run the same command again to resume"
            ) from None
        raise
    return written


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _use_threads() -> None:
    """Use the CPUs Ray gave this worker (Ray sets OMP_NUM_THREADS to the task's num_cpus)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


@ray.remote(num_cpus=0, **RETRY)
def read_tensors_task(source_url: str, tensors: list) -> TensorBundle:
    return read_tensors(Store(source_url), tensors)


# Weight tasks run in worker processes of their own: Ray reuses a process only for tasks of
# the same runtime environment, so a task never lands in a process that has only read
# bytes and must first import torch and compressed-tensors and create a CUDA context
# (11-17 s per process on the H100 VM). max_calls=0: Ray would otherwise start a fresh
# process for every GPU task.
QUANTIZE_POOL = {"env_vars": {"NVFP4_RAY_POOL": "quantize"}}


@ray.remote(max_calls=0, runtime_env=QUANTIZE_POOL, **RETRY)
def quantize_layer_task(unit, bundle: TensorBundle, dest_url: str):
    from nvfp4_ray.layer_quantizer import quantize_layer

    _use_threads()
    entries = quantize_layer(unit.spec, bundle, _device())
    return write_unit(Store(dest_url), unit.file, unit.key, entries)


@ray.remote(max_calls=0, runtime_env=QUANTIZE_POOL)
def warm_up_task() -> None:
    """Start a weight-task process ahead of the first layer: imports and CUDA context."""
    import torch

    import nvfp4_ray.layer_quantizer  # noqa: F401

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")


@ray.remote(num_cpus=0, **RETRY)
def copy_unit_task(unit, source_url: str, dest_url: str):
    bundle = read_tensors(Store(source_url), unit.tensors)
    for name in bundle.names():
        if not bundle.all_finite(name):
            raise InputError(f"tensor {name!r} contains NaN or Inf; the source checkpoint is broken")
    entries = [(name, *bundle.entries[name][1:], memoryview(bundle.raw(name)).cast("B")) for name in bundle.names()]
    return write_unit(Store(dest_url), unit.file, unit.key, entries)


@ray.remote(max_restarts=0, max_task_retries=0)
class CalibrationWorker:
    def __init__(self, model_config: dict, batched: bool, drop_causal_mask: bool, cpu_threads: int):
        # Start-up is timed step by step: on a GPU machine it is the largest fixed cost of a job.
        clock = [time.monotonic()]

        def lap() -> float:
            clock.append(time.monotonic())
            return round(clock[-1] - clock[-2], 3)

        import torch

        self.startup = {"import_torch_s": lap()}
        from nvfp4_ray.calibration.runner import DecoderRunner

        self.startup["import_transformers_s"] = lap()
        self.device = _device()
        if self.device.type == "cpu":
            # bf16 matmuls on CPUs round differently with different thread counts: use what a
            # plain PyTorch process (llm-compressor) uses on this machine, not Ray's CPU share
            torch.set_num_threads(cpu_threads)
        else:
            torch.empty(1, device=self.device)  # the CUDA context, now rather than in start()
        self.startup["device_init_s"] = lap()
        self.runner = DecoderRunner(model_config, str(self.device), batched, drop_causal_mask)
        self.startup["build_model_s"] = lap()
        self.busy_s = 0.0  # seconds spent running layers: the compute side of calibration

    def describe(self) -> dict:
        import torch

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu/{torch.get_num_threads()} threads"
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "device": name,
            # Calibration numerics depend on the kernels: results persisted for resume are
            # reused only on the same kind of device and the same torch.
            "signature": f"torch-{torch.__version__}/{name}",
            "startup": self.startup,
        }

    def start(self, batches: list, embed: TensorBundle, embed_name: str) -> int:
        self.runner.start(batches, embed.tensor(embed_name))
        return sum(batch.tokens for batch in batches)

    def run_layer(self, index: int, bundle: TensorBundle, tensor_names: dict, record: list, attention: list) -> dict:
        """Plain names only: a layer spec would make this process import compressed-tensors."""
        began = time.monotonic()
        weights = {local: bundle.tensor(name) for name, local in tensor_names.items()}
        amax = self.runner.run_layer(index, weights, record, attention)
        self.busy_s += time.monotonic() - began
        return amax

    def busy_seconds(self) -> float:
        return self.busy_s

    def save_hidden(self, dest_url: str, folder: str) -> None:
        dest = Store(dest_url)
        for index, hidden in self.runner.hidden_states().items():
            write_shard(dest, f"{folder}/batch-{index:05d}.safetensors", [torch_entry("hidden", hidden)])

    def load_hidden(self, dest_url: str, folder: str) -> None:
        dest = Store(dest_url)
        hidden = {}
        for state in self.runner.states:
            bundle = read_file(dest, f"{folder}/batch-{state.batch.index:05d}.safetensors")
            hidden[state.batch.index] = bundle.tensor("hidden")
        self.runner.restore_hidden_states(hidden)


def unwrap(error: Exception) -> Exception:
    """The InputError or JobError a task raised, if that is what failed."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, (InputError, JobError)) else error
