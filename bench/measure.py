"""What the benchmark measures besides time: host and GPU memory, the page cache, the I/O floor."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

try:
    import psutil
except ImportError:  # Ray ships a copy (ray/thirdparty_files), put on sys.path by importing ray
    import ray  # noqa: F401
    import psutil

GIB = 1 << 30
READ_CHUNK = 64 << 20
TOP_PROCESSES = 8  # the largest processes at the peak, listed in the record
TOP_FILES = 8  # the mapped files (kinds "files" and "pinned") with the most PSS at the peak, listed in the record


def nvml():
    """pynvml initialised (nvidia-ml-py, or the copy vendored in Ray), or None without an
    NVIDIA driver. NVML reads memory without creating a CUDA context in this process."""
    try:
        import pynvml
    except ImportError:
        from ray._private.thirdparty import pynvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def gpu_used_bytes(lib) -> list[int]:
    """Memory in use on every GPU of the machine (all processes), as nvidia-smi shows it."""
    handles = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(lib.nvmlDeviceGetCount())]
    return [int(lib.nvmlDeviceGetMemoryInfo(h).used) for h in handles]


class PeakSampler:
    """Every ``interval`` seconds, in a background thread: the memory of a process tree (a
    root process and all its descendants, which for a Ray driver that started its local
    instance is every Ray process) and of every GPU. Keeps the peaks.

    Host memory per process is RSS; the tree's sum counts a page shared by several
    processes (Ray's object store, mapped by the store and by every reader) once per
    process, so the sum of PSS (each shared page split among its sharers) is kept as well.
    GPU memory is NVML's used memory minus what was in use when sampling started.
    """

    def __init__(self, root_pid: int, interval: float = 0.2):
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.gpu = nvml()
        self.gpu_baseline = gpu_used_bytes(self.gpu) if self.gpu else []
        self.gpu_peak = list(self.gpu_baseline)
        self.rss_peak, self.rss_peak_parts, self.rss_peak_top, self.processes_peak = 0, {}, [], 0
        self.pss_peak, self.pss_peak_top, self.process_peak = 0, [], 0
        self.pss_peak_kinds: dict[str, int] = {}
        self.pss_peak_files: dict[str, int] = {}
        self.pss_start: int | None = None  # the tree before the work: an idle Ray instance, for a Ray job
        self.pss_peak_at = 0.0  # seconds from the first sample to the PSS peak (which stage it fell in)
        self.began = time.monotonic()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        parts = {"main": 0, "ray_workers": 0, "other": 0}
        pss, sizes, shares = 0, [], []
        try:
            processes = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                info = process.memory_full_info()  # rss, and pss from /proc/PID/smaps_rollup
                name = process.name()
                if name.startswith("ray::"):  # the name is cut at 15 characters; Ray's title is whole
                    name = (process.cmdline() or [name])[0]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            part = "main" if process.pid == self.root.pid else "ray_workers" if name.startswith("ray::") else "other"
            parts[part] += info.rss
            sizes.append((info.rss, name))
            shares.append((info.pss, info.uss, name))
            pss += info.pss
            self.process_peak = max(self.process_peak, info.rss)
        total = sum(parts.values())
        if total > self.rss_peak:
            self.rss_peak, self.rss_peak_parts, self.processes_peak = total, parts, len(processes)
            self.rss_peak_top = sorted(sizes, reverse=True)[:TOP_PROCESSES]
        if self.pss_start is None:
            self.pss_start = pss
        if pss > self.pss_peak:
            self.pss_peak, self.pss_peak_top = pss, sorted(shares, reverse=True)[:TOP_PROCESSES]
            self.pss_peak_at = time.monotonic() - self.began
            self.pss_peak_kinds, self.pss_peak_files = pss_by_kind(processes)
        if self.gpu:
            self.gpu_peak = [max(a, b) for a, b in zip(self.gpu_peak, gpu_used_bytes(self.gpu))]
        self.samples += 1

    def result(self) -> dict:
        gpu = [(peak - base) / GIB for peak, base in zip(self.gpu_peak, self.gpu_baseline)]
        return {
            "peak_rss_gib": round(self.rss_peak / GIB, 3),
            "peak_rss_parts_gib": {k: round(v / GIB, 3) for k, v in self.rss_peak_parts.items()},
            "peak_rss_processes": self.processes_peak,
            "peak_rss_top_processes_gib": [[name, round(rss / GIB, 3)] for rss, name in self.rss_peak_top],
            "peak_rss_single_process_gib": round(self.process_peak / GIB, 3),
            "peak_pss_gib": round(self.pss_peak / GIB, 3),
            # at the PSS peak: [name, PSS, USS (pages of that process alone)] of the largest
            "peak_pss_top_processes_gib": [[name, round(p / GIB, 3), round(u / GIB, 3)] for p, u, name in self.pss_peak_top],
            "peak_pss_by_kind_gib": {k: round(v / GIB, 3) for k, v in sorted(self.pss_peak_kinds.items())},
            "peak_pss_top_files_gib": [
                [path, round(size / GIB, 3)]
                for path, size in sorted(self.pss_peak_files.items(), key=lambda item: -item[1])[:TOP_FILES]
            ],
            "pss_at_start_gib": round((self.pss_start or 0) / GIB, 3),
            "peak_pss_at_s": round(self.pss_peak_at, 1),
            "peak_gpu_gib": round(max(gpu), 3) if gpu else None,
            "peak_gpu_per_device_gib": [round(g, 3) for g in gpu] if gpu else None,
            "gpu_baseline_gib": [round(b / GIB, 3) for b in self.gpu_baseline] if gpu else None,
            "memory_samples": self.samples,
        }


def pss_by_kind(processes: list) -> tuple[dict[str, int], dict[str, int]]:
    """The PSS of these processes by what their pages hold, from /proc/PID/smaps, and that
    of the kinds "files" and "pinned" by path:
    object_store  Ray's shared-memory object store (/dev/shm, or the plasma file)
    code          files mapped by the loader (.so libraries, the python binary)
    files         other mapped files (a safetensors file read through mmap)
    pinned        shared anonymous mappings (/dev/zero): CUDA's pinned host buffers
                  (cudaHostAlloc) are these; records before 2026-12-01T2142 counted them
                  as files
    gpu_driver    mappings of /dev/nvidia* (memory the driver maps for CUDA)
    anonymous     heaps, stacks and anonymous mappings (tensors, buffers, Python objects)."""
    kinds = dict.fromkeys(("object_store", "code", "files", "pinned", "gpu_driver", "anonymous"), 0)
    files: dict[str, int] = {}
    for process in processes:
        kind, path = "anonymous", ""
        try:
            with open(f"/proc/{process.pid}/smaps") as handle:
                for line in handle:
                    fields = line.split(None, 5)
                    if line.startswith("Pss:"):
                        kinds[kind] += int(fields[1]) * 1024
                        if kind in ("files", "pinned"):
                            files[path] = files.get(path, 0) + int(fields[1]) * 1024
                    elif not fields[0].endswith(":"):  # a mapping's header: address, perms, offset, dev, inode, path
                        path = fields[5].strip() if len(fields) == 6 else ""
                        kind = _mapping_kind(path)
        except (OSError, IndexError):
            continue
    return kinds, files


def _mapping_kind(path: str) -> str:
    if not path or path.startswith("["):
        return "anonymous"
    if path.startswith("/dev/shm") or "plasma" in path:
        return "object_store"
    if path.startswith("/dev/nvidia"):
        return "gpu_driver"
    if path.startswith("/dev/zero"):
        return "pinned"
    name = path.replace(" (deleted)", "").rsplit("/", 1)[-1]
    if ".so" in name or os.access(path, os.X_OK) and not os.path.isdir(path):
        return "code"
    return "files"


def host_memory_gib() -> float:
    return psutil.virtual_memory().total / GIB


def files_under(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


# The Python packages the processes import. After a whole-cache drop they are read back
# before the clock starts: a node that runs jobs has them cached, and the reference's own
# imports happen before its timer, so only the model's bytes are cold for both. "nvidia"
# holds the CUDA libraries torch loads (cuBLAS, cuDNN, NCCL...).
WARM_PACKAGES = ("torch", "transformers", "ray", "compressed_tensors", "llmcompressor", "triton", "numpy",
                 "safetensors", "pyarrow", "tokenizers", "fsspec", "pydantic", "pydantic_core", "nvfp4_ray",
                 "nvidia")  # fmt: skip
# What a layer worker does before its first layer, run once in a child process after the
# packages are read back: the bytecode cache (PYTHONPYCACHEPREFIX), the standard library
# and the CUDA driver's libraries come back with it.
_WORKER_WARM_UP = (
    "import torch, nvfp4_ray.layer_quantizer, nvfp4_ray.calibration.runner\n"
    "torch.empty(1, device='cuda') if torch.cuda.is_available() else None"
)


def warm_python_packages() -> None:
    import importlib.util
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for name in WARM_PACKAGES:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for root, _, names in os.walk(folder):
                files.extend(os.path.join(root, n) for n in names)

    def read(path):
        try:
            with open(path, "rb", buffering=0) as handle:
                while handle.read(READ_CHUNK):
                    pass
        except OSError:
            pass

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(read, files))
    subprocess.run([sys.executable, "-c", _WORKER_WARM_UP], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PAGE_CACHE_METHODS = ("auto", "drop_caches", "fadvise")


def drop_page_cache(paths: list[str], method: str = "auto") -> str:
    """Make the next read of ``paths`` come from the disk; return how it was done:
    "drop_caches" (the whole page cache, then the Python packages read back in; needs root
    and a writable /proc/sys), or "fadvise" (POSIX_FADV_DONTNEED on each file: evicts its
    clean pages that no process has mapped; works without root and inside containers).
    ``method`` "auto": drop_caches where it is allowed, else fadvise."""
    os.sync()  # dirty pages cannot be dropped
    if method != "fadvise":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as handle:
                handle.write("3\n")
            warm_python_packages()
            return "drop_caches"
        except OSError:
            if method == "drop_caches":
                raise
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def read_files(paths: list[str]) -> tuple[float, int]:
    """Read every byte of ``paths`` once, file after file, in 64 MiB reads on one thread;
    return (seconds, bytes)."""
    buffer = bytearray(READ_CHUNK)
    total = 0
    start = time.monotonic()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return time.monotonic() - start, total


def device_name(lib) -> str:
    if lib and lib.nvmlDeviceGetCount():
        name = lib.nvmlDeviceGetName(lib.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else name
    with open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "unknown")
    return f"cpu ({model})"
