"""The benchmark: llm-compressor 0.14 (the reference) and nvfp4-ray on the same model and the
same calibration rows, in one run; outputs compared; one JSON record per run.

    python bench/run.py --preset 8b --gpus 1 --out bench/results      # the GPU machine
    python bench/run.py --preset tiny                                  # any machine, on the CPU

Steps, each printed with the time: write the model (or reuse it), read the source once from
a cold page cache (the I/O floor), run llm-compressor in a child process, run nvfp4-ray on a
fresh local Ray instance (with --gpus N > 1 also on 1 GPU), compare the outputs, write the
record and print the table. bench/README.md describes every field and measurement.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The child processes (model writer, llm-compressor) and Ray's workers import from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 enables token auth for local instances
# No idle worker processes started ahead of tasks, as in the job's own local instance
# (nvfp4_ray.pipeline.job.ray_session) and on the image's nodes (cluster/docker/Dockerfile)
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import log  # noqa: E402
from bench.compare import checkpoint_tensors, compare_checkpoints, quantized_weight_bytes  # noqa: E402
from bench.measure import (  # noqa: E402
    GIB, PAGE_CACHE_METHODS, PeakSampler, device_name, drop_page_cache, files_under, host_memory_gib, nvml, read_files,
)  # fmt: skip
from bench.model import (  # noqa: E402
    PRESETS, SHARD_BYTES, SPEC_FILE, model_is_written, preset_shape, write_calibration,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True, help="model shape and calibration set")
    parser.add_argument("--gpus", type=int, help="GPUs nvfp4-ray may use (default: 1 on a GPU machine, 0 without GPUs)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's; --reuse-model keeps its own)")
    parser.add_argument("--samples", type=int, help="calibration rows (default: the preset's)")
    parser.add_argument("--seq-len", type=int, help="tokens per calibration row (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the calibration rows")
    parser.add_argument("--work", help="scratch folder for the model and the outputs (default: /tmp/nvfp4-bench-PRESET)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="folder of the JSON records")
    parser.add_argument("--reuse-model", metavar="DIR", help="a model this benchmark wrote before (skips writing one)")
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="do not run llm-compressor; compare with (and take the timings of) the reference of an earlier run "
        "in --work if it was made from the same model and rows",
    )
    parser.add_argument(
        "--algorithm",
        choices=("rtn", "gptq"),
        default="rtn",
        help="round-to-nearest (default), or GPTQ: llm-compressor's GPTQModifier (samples not shuffled) against "
        "nvfp4-ray's --algorithm gptq",
    )
    parser.add_argument("--hidden-snapshots", type=int, help="nvfp4-ray's --hidden-snapshots (default: the job's default)")
    parser.add_argument("--prefetch-gib", type=float, help="nvfp4-ray's read-ahead budget (default: the job's default)")
    parser.add_argument("--readahead-gib", type=float, help="nvfp4-ray's page-cache read-ahead (default: the job's default)")
    parser.add_argument(
        "--device-memory-gib", type=float,
        help="nvfp4-ray's device memory budget (default: 90%% of the GPU's); a smaller card's, to see what it takes "
        "(MoE layers then load in expert groups where whole ones do not fit); the output goes to its own folder",
    )  # fmt: skip
    parser.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        help="nvfp4-ray's --exact (default: on for the model types whose causal mask llm-compressor 0.14 drops in "
        "calibration, qwen3_moe among them (nvfp4_ray.architecture.REFERENCE_DROPS_CAUSAL_MASK), so that the outputs "
        "can be byte-identical; off for the others)",
    )
    parser.add_argument(
        "--page-cache",
        choices=PAGE_CACHE_METHODS,
        default="auto",
        help="how the source is made cold before each timed run: drop_caches (the whole page cache, then the "
        "Python packages read back; needs root), fadvise (evict the source's and the rows' pages only: fast, "
        "no root), auto (default: drop_caches where allowed, else fadvise)",
    )
    parser.add_argument("--baseline", metavar="RECORD", help="a 1-GPU record of the same model, instead of a 1-GPU run")
    parser.add_argument(
        "--preloaded-workers",
        action="store_true",
        help="also time nvfp4-ray on a Ray instance whose idle workers have imported torch and transformers "
        "(Ray's preload_python_modules), as a standing cluster can be configured",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_average = os.getloadavg()[0]  # other work on the machine skews every figure
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    preset = PRESETS[args.preset]
    samples, seq_len = args.samples or preset["samples"], args.seq_len or preset["seq_len"]
    gpu_lib = nvml()
    machine_gpus = gpu_lib.nvmlDeviceGetCount() if gpu_lib else 0
    gpus = min(1, machine_gpus) if args.gpus is None else args.gpus
    if gpus > machine_gpus or (machine_gpus and gpus < 1):
        choices = f"1..{machine_gpus}" if machine_gpus else "0, or leave --gpus out"
        raise SystemExit(f"--gpus {gpus}: this machine has {machine_gpus} GPUs (use {choices})")
    if args.page_cache == "drop_caches" and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise SystemExit("--page-cache drop_caches: /proc/sys/vm/drop_caches is not writable here (it needs root "
                         "and a writable /proc/sys); use --page-cache fadvise or auto")  # fmt: skip
    work = os.path.abspath(args.work or f"/tmp/nvfp4-bench-{args.preset}")
    os.makedirs(work, exist_ok=True)
    log(f"{command}: work folder {work}, {gpus} GPU(s) of {machine_gpus}")

    source, spec, model_write_s = prepare_model(args, preset, work)
    shape = spec["shape"]
    calibration = os.path.join(work, f"calibration-{samples}x{seq_len}-seed{args.seed}.parquet")
    if not os.path.exists(calibration):
        write_calibration(calibration, samples, seq_len, shape["vocab"], args.seed)
    source_files = files_under(source)
    timed_inputs = source_files + [calibration]
    # before each timed run: the source and the rows come from the disk, not the page cache
    make_cold = functools.partial(drop_page_cache, timed_inputs, args.page_cache)

    page_cache = drop_page_cache(source_files, args.page_cache)
    source_read_s, source_bytes = read_files(source_files)
    log(f"source read once, cold: {source_bytes / 1e9:.2f} GB in {source_read_s:.1f}s (page cache: {page_cache})")

    inputs_key = [[os.path.relpath(p, work), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in timed_inputs]
    inputs_key.append(args.algorithm)
    reference = run_reference(source, calibration, work, samples, seq_len, make_cold, inputs_key, args.skip_reference,
                              args.algorithm)  # fmt: skip

    baseline = None
    # job options the command line sets (the rest: the job's defaults)
    chosen = (("prefetch_gib", args.prefetch_gib), ("readahead_gib", args.readahead_gib), ("hidden_snapshots", args.hidden_snapshots),
              ("device_memory_gib", args.device_memory_gib))  # fmt: skip
    options = {k: v for k, v in chosen if v is not None}
    if args.algorithm == "gptq":
        options["algorithm"] = "gptq"
    if args.exact if args.exact is not None else reference_drops_causal_mask(shape):
        options["exact"] = True
    timed_run = functools.partial(nvfp4_ray_run, source, calibration, work, samples, seq_len, make_cold=make_cold, options=options)
    if gpus > 1:
        if args.baseline:
            baseline = load_baseline(args.baseline, model_name(shape), samples, seq_len)
        else:
            baseline = timed_run(1, reference=reference)
    run = timed_run(gpus, reference=reference)
    preloaded = None
    if args.preloaded_workers:
        preloaded = timed_run(gpus, reference=None, preload=True)
        preloaded["same_files_as_plain_run"] = manifest_files(preloaded["dest"]) == manifest_files(run["dest"])
        log(f"preloaded workers: same files as the plain run: {preloaded['same_files_as_plain_run']}")
    if baseline is not None and "dest" in baseline:
        # the output must not depend on the number of GPUs: every file, byte for byte
        run["same_files_as_1gpu"] = manifest_files(run["dest"]) == manifest_files(baseline["dest"])
        log(f"same files as the 1-GPU run: {run['same_files_as_1gpu']}")

    record = make_record(
        command=command, device=device_name(gpu_lib), gpus=gpus, machine_gpus=machine_gpus, spec=spec, source=source,
        samples=samples, seq_len=seq_len, model_write_s=model_write_s, source_read_s=source_read_s,
        source_bytes=source_bytes, page_cache=page_cache, reference=reference, run=run, baseline=baseline,
        load_average=load_average, preloaded=preloaded,
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stamp, model = record["date"][:16].replace(":", ""), record["model"].split("-", 2)[2]  # random-<family>-<model>
    suffix = algorithm_suffix(args.algorithm) + budget_suffix(args.device_memory_gib)
    path = os.path.join(args.out, f"{stamp}-{slug(record['device'])}-{model}-{gpus}gpu{suffix}.json")
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    print_table(record)
    log(f"record written to {path}")
    return record


# ---- the model ----------------------------------------------------------------------
def prepare_model(args, preset: dict, work: str) -> tuple[str, dict, float | None]:
    """The source checkpoint: --reuse-model, the one in WORK/model if it has this shape, or a
    new one written by a child process. Returns (folder, spec, seconds spent writing)."""
    if args.reuse_model:
        folder = os.path.abspath(args.reuse_model)
        with open(os.path.join(folder, SPEC_FILE)) as handle:
            spec = json.load(handle)["spec"]
        log(f"reusing the model in {folder}")
        return folder, spec, None
    shape = preset_shape(preset)
    if args.layers:
        shape["layers"] = args.layers
    spec = {"shape": shape, "seed": args.seed, "shard_bytes": SHARD_BYTES[args.preset]}
    folder = os.path.join(work, "model")
    if model_is_written(folder, spec):
        log(f"reusing the model in {folder} (same shape and seed)")
        return folder, spec, None
    shutil.rmtree(folder, ignore_errors=True)
    log(f"writing a random {shape.get('arch', 'llama')} {shape} to {folder}")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "bench.model", json.dumps(spec), folder], check=True)
    seconds = time.monotonic() - start
    log(f"model written in {seconds:.1f}s")
    return folder, spec, seconds


def reference_drops_causal_mask(shape: dict) -> bool:
    """Whether llm-compressor 0.14 calibrates this model type without its causal mask, which
    nvfp4-ray reproduces only with exact=True."""
    from nvfp4_ray.architecture import REFERENCE_DROPS_CAUSAL_MASK

    return shape.get("arch", "llama") in REFERENCE_DROPS_CAUSAL_MASK


# ---- the reference --------------------------------------------------------------------
def run_reference(source, calibration, work, samples, seq_len, make_cold, inputs_key, skip: bool,
                  algorithm: str) -> dict | None:  # fmt: skip
    """llm-compressor in a child process (bench/llmcompressor_run.py), its memory sampled;
    or, with ``skip``, the record of an earlier reference run made from the same inputs."""
    name = f"reference{algorithm_suffix(algorithm)}"
    out, record_path = os.path.join(work, name), os.path.join(work, f"{name}.json")
    if skip:
        try:
            with open(record_path) as handle:
                earlier = json.load(handle)
        except (OSError, ValueError):
            earlier = None
        if earlier and earlier["inputs"] == inputs_key and os.path.exists(out):
            log(f"skipping llm-compressor: reusing its output and timings from an earlier run ({earlier['date']})")
            return {**earlier, "reused": True, "output": out}
        log("skipping llm-compressor: no earlier reference from the same inputs, so no comparison")
        return None
    # a run that fails half-way must leave nothing for --skip-reference to reuse
    if os.path.exists(record_path):
        os.remove(record_path)
    shutil.rmtree(out, ignore_errors=True)
    result_path, log_path = os.path.join(work, "reference-result.json"), os.path.join(work, "reference.log")
    command = [sys.executable, "-m", "bench.llmcompressor_run", source, calibration, out, str(samples), str(seq_len),
               result_path, algorithm]  # fmt: skip
    page_cache = make_cold()
    log(f"llm-compressor: starting (page cache: {page_cache}; its output goes to {log_path})")
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with PeakSampler(process.pid) as sampler:
            for line in process.stdout:
                log_file.write(line)
                if line.startswith("[bench "):
                    print(line, end="", flush=True)
            code = process.wait()
    if code:
        raise SystemExit(f"llm-compressor failed with exit code {code}; see {log_path}")
    with open(result_path) as handle:
        result = json.load(handle)
    memory = sampler.result()
    reference = {
        "inputs": inputs_key,
        "date": now_iso(),
        "seconds": round(result["seconds"], 3),
        "stages_s": result["stages_s"],
        "process_s": round(time.monotonic() - start, 3),
        "page_cache": page_cache,
        **{key: memory[key] for key in ("peak_rss_gib", "peak_gpu_gib", "peak_pss_gib", "peak_pss_by_kind_gib")},
        "output": out,
    }
    with open(record_path, "w") as handle:
        json.dump(reference, handle, indent=2)
    return {**reference, "reused": False}


# ---- nvfp4-ray --------------------------------------------------------------------------
class _LogStream:
    """nvfp4-ray's progress lines (Events), each printed through log() with the time."""

    def write(self, text: str) -> None:
        for line in text.splitlines():
            log(line)

    def flush(self) -> None:
        pass


def nvfp4_ray_run(source, calibration, work, samples, seq_len, gpus, make_cold, reference, options: dict,
                  preload: bool = False) -> dict:  # fmt: skip
    """One timed job, run_quantize called to returned (_SUCCESS written), on a fresh local Ray
    instance started before the clock (a running Ray instance is assumed, as on a cluster).
    ``preload``: its idle workers import what a layer worker needs before the clock starts."""
    import ray

    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize
    from nvfp4_ray.pipeline.workers import PRELOAD_MODULES

    algorithm = options.get("algorithm", "rtn")
    suffix = algorithm_suffix(algorithm) + budget_suffix(options.get("device_memory_gib"))
    dest = os.path.join(work, f"nvfp4-ray-{gpus}gpu" + ("-preloaded" if preload else "") + suffix)
    shutil.rmtree(dest, ignore_errors=True)  # units already at DEST would be reused, not computed
    config = QuantizeConfig(
        source=source, dest=dest, calibration=calibration, num_samples=samples, max_seq_len=seq_len, num_workers=gpus or None,
        **options,
    )
    system_config = {"preload_python_modules": list(PRELOAD_MODULES)} if preload else {}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, _system_config=system_config)
    try:
        if preload:
            wait_for_idle_workers()
        page_cache = make_cold()
        log(f"nvfp4-ray: starting on {gpus or 'no'} GPU(s) (page cache: {page_cache})")
        with PeakSampler(os.getpid()) as sampler:
            start = time.monotonic()
            summary = run_quantize(config, Events("text", stream=_LogStream()))
            seconds = time.monotonic() - start
        log(f"nvfp4-ray: done in {seconds:.1f}s")
        timeline, run_layer_s, gptq_timeline = os.environ.get("NVFP4_BENCH_TIMELINE"), None, None
        if timeline:  # Ray's Chrome trace of every task and actor call, for diagnosis
            timeline = f"{timeline}-{gpus}gpu{'-preloaded' if preload else ''}.json"
            ray.timeline(filename=timeline)
            run_layer_s = run_layer_seconds(timeline)
            gptq_timeline = gptq_layer_timeline(timeline, summary["layers"]) if options.get("algorithm") == "gptq" else None
    finally:
        ray.shutdown()
    if not os.path.exists(os.path.join(dest, "_SUCCESS")):
        raise SystemExit(f"nvfp4-ray returned without writing {dest}/_SUCCESS")
    stages = summary["timings_s"]
    run = {
        "gpus": gpus,
        "preloaded_workers": preload,
        "prefetch_gib": round(config.prefetch_bytes / GIB, 3),
        "readahead_gib": config.readahead_gib,
        "hidden_snapshots": config.hidden_snapshots,
        "exact": config.exact,
        "nvfp4_ray_s": round(seconds, 3),
        "stages_s": stages,
        # calibration runs inside the layer loop, beside the weight quantization: both stages count
        "calibration_s": round(stages.get("setup", 0.0) + stages.get("layers", 0.0), 3),
        # the busiest actor's seconds inside run_layer: calibration compute without start-up and reads
        "calibration_compute_s": summary["calibration_compute_s"],
        "calibration_load_wait_s": summary["calibration_load_wait_s"],
        "snapshot_write_s": summary["snapshot_write_s"],
        "calibration_cuda_graphs": summary["calibration_cuda_graphs"],
        "run_layer_s": run_layer_s,
        "gptq_timeline": gptq_timeline,
        "page_cache": page_cache,
        "summary": {key: summary[key] for key in (
            "layers", "linears_quantized", "bytes_in", "bytes_out", "calibration_tokens", "calibration_workers",
            "calibration_devices", "layer_reads_per_node", "worker_startup_s", "worker_replacements", "total_s",
            "device_memory",
        )},  # fmt: skip
        "algorithm": algorithm,
        "gptq_seconds": summary.get("gptq_seconds"),
        "dest": dest,
        **sampler.result(),
    }
    if reference is not None:
        log("comparing the outputs with llm-compressor's, tensor by tensor")
        run["comparison"] = compare_checkpoints(dest, reference["output"])
        log(f"outputs_equal={run['comparison']['outputs_equal']}")
    return run


def worker_calls(timeline: str, method: str) -> list[list[tuple[float, float]]]:
    """From Ray's timeline: per calibration worker, (start, seconds) of each call of the
    LayerWorker's ``method``, in order."""
    with open(timeline) as handle:
        events = [e for e in json.load(handle) if e.get("cat") == f"task::LayerWorker.{method}" and e.get("ph") == "X"]
    workers: dict[str, list] = {}
    for event in sorted(events, key=lambda e: e["ts"]):
        workers.setdefault(event["tid"], []).append((event["ts"] / 1e6, round(event["dur"] / 1e6, 3)))
    return list(workers.values())


def run_layer_seconds(timeline: str) -> list[list[float]]:
    """Per calibration worker, the seconds of each run_layer call (one per decoder layer)."""
    return [[seconds for _, seconds in calls] for calls in worker_calls(timeline, "run_layer")]


def gptq_layer_timeline(timeline: str, layers: int) -> dict | None:
    """One worker's GPTQ steps from Ray's timeline (its LayerWorker.gptq calls: per layer
    the Hessian pass, one solve per fused group, the propagation pass): the first layer's
    seconds in each, and the median of the later layers'; to_next_layer: from one layer's
    Hessian pass to the next one's."""
    workers = worker_calls(timeline, "gptq")
    if len(workers) != 1 or len(workers[0]) % layers:
        return None
    calls = workers[0]
    per_layer = len(calls) // layers
    steps = [calls[i * per_layer : (i + 1) * per_layer] for i in range(layers)]

    def phases(i: int) -> dict:
        layer = steps[i]
        return {"calibration_pass_s": layer[0][1], "solves_s": round(sum(s for _, s in layer[1:-1]), 3),
                "propagation_s": layer[-1][1],
                "to_next_layer_s": round(steps[i + 1][0][0] - layer[0][0], 3) if i + 1 < layers else None}  # fmt: skip

    later = [phases(i) for i in range(1, layers - 1)]
    return {"first_layer": phases(0),
            "later_layers_median": {key: statistics.median(p[key] for p in later) for key in later[0]} if later else None}  # fmt: skip


def wait_for_idle_workers() -> None:
    """Occupy every CPU's worker process at once, so that each has started (and imported the
    preloaded modules) before the clock starts; they stay idle afterwards."""
    import ray

    @ray.remote(num_cpus=1)
    def started() -> int:
        time.sleep(1)
        return os.getpid()

    start = time.monotonic()
    pids = ray.get([started.remote() for _ in range(int(ray.cluster_resources().get("CPU", 1)))])
    log(f"{len(set(pids))} preloaded worker processes up in {time.monotonic() - start:.1f}s")


def manifest_files(dest: str) -> dict:
    """Every file of a checkpoint with its size and sha256, from its manifest."""
    with open(os.path.join(dest, "manifest.json")) as handle:
        return json.load(handle)["files"]


def load_baseline(path: str, model: str, samples: int, seq_len: int) -> dict:
    with open(path) as handle:
        record = json.load(handle)
    if (record["gpus"], record["model"], record["samples"], record["seq_len"]) != (1, model, samples, seq_len):
        raise SystemExit(f"--baseline {path} is not a 1-GPU record of {model} with {samples} x {seq_len} tokens")
    fields = ("nvfp4_ray_s", "calibration_s", "stages_s", "outputs_equal")
    return {"record": os.path.abspath(path), **{k: record[k] for k in fields},
            "calibration_compute_s": record.get("calibration_compute_s")}  # fmt: skip


# ---- the record ---------------------------------------------------------------------------
def make_record(*, command, device, gpus, machine_gpus, spec, source, samples, seq_len, model_write_s, source_read_s,
                source_bytes, page_cache, reference, run, baseline, load_average, preloaded=None) -> dict:  # fmt: skip
    shape = spec["shape"]
    tensors = checkpoint_tensors(source)
    params = sum(math.prod(entry[2]) for entry in tensors.values())
    layer_bytes = sum(e[4] - e[3] for name, e in tensors.items() if name.startswith("model.layers.0."))
    weight_bytes = quantized_weight_bytes(run["dest"], source)
    tokens = run["summary"]["calibration_tokens"]
    workers = max(run["summary"]["calibration_workers"], 1)
    llmcompressor_s = reference["seconds"] if reference else None
    comparison = run.get("comparison")
    layers = run["summary"]["layers"]
    record = {
        "device": device,
        "date": now_iso(),
        "gpus": gpus,
        "model": model_name(shape),
        "params": params,
        "samples": samples,
        "seq_len": seq_len,
        "llmcompressor_s": llmcompressor_s,
        "nvfp4_ray_s": run["nvfp4_ray_s"],
        "speedup_vs_llmcompressor": round(llmcompressor_s / run["nvfp4_ray_s"], 3) if reference else None,
        "outputs_equal": comparison["outputs_equal"] if comparison else None,
        "stages_s": run["stages_s"],
        "calibration_s": run["calibration_s"],
        "calibration_tokens_per_s": round(tokens / run["calibration_s"], 1),
        "weight_gb_per_s": round(weight_bytes / 1e9 / run["stages_s"]["layers"], 3),
        "peak_rss_gib": run["peak_rss_gib"],
        "peak_gpu_gib": run["peak_gpu_gib"],
        "source_read_s": round(source_read_s, 3),
        "calibration_speedup_vs_1gpu": round(baseline["calibration_s"] / run["calibration_s"], 3) if baseline else None,
        "same_files_as_1gpu": run.get("same_files_as_1gpu"),
        "prefetch_gib": run["prefetch_gib"],
        "readahead_gib": run["readahead_gib"],
        "worker_startup_s": run["summary"]["worker_startup_s"],
        "hidden_snapshots": run["hidden_snapshots"],
        "calibration_compute_s": run["calibration_compute_s"],
        "calibration_compute_speedup_vs_1gpu": (
            round(baseline["calibration_compute_s"] / run["calibration_compute_s"], 3)
            if baseline and baseline.get("calibration_compute_s") and run["calibration_compute_s"] else None
        ),
        "calibration_load_wait_s": run["calibration_load_wait_s"],
        "snapshot_write_s": run["snapshot_write_s"],
        "calibration_cuda_graphs": run["calibration_cuda_graphs"],
        "device_memory": run["summary"].get("device_memory"),  # the plan: layers ahead, expert groups, estimate
        "exact": run["exact"],
        "algorithm": run["algorithm"],
        # GPTQ: each step's seconds per layer on the busiest worker (calibration_pass: amax and
        # Hessians; reduction: the partials added on the owner; solves; propagation_pass: the
        # layer run again with the solved weights, every layer but the last since 528ab36)
        "gptq_seconds_per_layer": (
            {step: round(seconds / (layers - 1 if step == "propagation_pass" and layers > 1 else layers), 3)
             for step, seconds in run["gptq_seconds"].items()}  # fmt: skip
            if run["gptq_seconds"] else None
        ),
        # each figure over the decoder layers: the mean seconds of one layer
        "seconds_per_layer": {
            "nvfp4_ray_layers_stage": round(run["stages_s"]["layers"] / layers, 3),
            "nvfp4_ray_calibration_compute": round(run["calibration_compute_s"] / layers, 3),
            "llmcompressor_oneshot": round(reference["stages_s"]["oneshot"] / layers, 3) if reference else None,
            # the median layer of run_layer_s (the slowest worker's call per layer): without the first layer's warm-up
            "nvfp4_ray_run_layer_median": _median_layer(run["run_layer_s"]),
        },
        "run_layer_s": run["run_layer_s"],
        # GPTQ on one worker, from Ray's timeline: the first layer against the median later one
        "gptq_timeline": run["gptq_timeline"],
        # what the figures above are made of
        "model_shape": shape,
        "model_seed": spec["seed"],
        "model_write_s": round(model_write_s, 3) if model_write_s is not None else None,
        "source_bytes": source_bytes,
        "source_read_gb_per_s": round(source_bytes / 1e9 / source_read_s, 3),
        "page_cache_drop": {"source_read": page_cache, "llmcompressor": reference["page_cache"] if reference else None,
                            "nvfp4_ray": run["page_cache"]},  # fmt: skip
        "calibration_tokens": tokens,
        "quantized_weight_bytes": weight_bytes,
        "peak_rss_parts_gib": run["peak_rss_parts_gib"],
        "peak_rss_processes": run["peak_rss_processes"],
        "peak_rss_top_processes_gib": run["peak_rss_top_processes_gib"],
        "peak_rss_single_process_gib": run["peak_rss_single_process_gib"],
        "peak_pss_gib": run["peak_pss_gib"],
        "peak_pss_top_processes_gib": run["peak_pss_top_processes_gib"],
        "peak_pss_by_kind_gib": run["peak_pss_by_kind_gib"],
        "peak_pss_top_files_gib": run["peak_pss_top_files_gib"],
        "pss_at_start_gib": run["pss_at_start_gib"],
        "peak_pss_at_s": run["peak_pss_at_s"],
        "peak_gpu_per_device_gib": run["peak_gpu_per_device_gib"],
        "gpu_baseline_gib": run["gpu_baseline_gib"],
        "memory_samples": run["memory_samples"],
        # the terms of the GPU memory formula: one layer's weights + the actor's activations
        "one_layer_weights_gib": round(layer_bytes / GIB, 3),
        "activations_per_worker_gib": round(-(-samples // workers) * seq_len * shape["hidden"] * 2 / GIB, 3),
        "comparison": comparison,
        "max_input_scale_diff_bf16_steps": comparison["max_input_scale_diff_bf16_steps"] if comparison else None,
        "llmcompressor": {k: v for k, v in reference.items() if k != "inputs"} if reference else None,
        "nvfp4_ray": run["summary"],
        "baseline_1gpu": _baseline_summary(baseline),
        "preloaded_workers": _preloaded_summary(preloaded, llmcompressor_s),
        "host": {
            "cpus": os.cpu_count(),
            "memory_gib": round(host_memory_gib(), 1),
            "gpus": machine_gpus,
            "load_average_at_start": round(load_average, 2),
            "load_average_at_end": round(os.getloadavg()[0], 2),
            # Ray settings from the environment (RAY_<setting>), which the local instance takes up
            "ray_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_") and k != "RAY_AUTH_MODE"},
        },
        "versions": versions(),
        "command": command,
    }
    return record


def _median_layer(run_layer_s: list[list[float]] | None) -> float | None:
    if not run_layer_s:
        return None
    slowest = sorted(max(calls) for calls in zip(*run_layer_s))
    return slowest[len(slowest) // 2]


def _baseline_summary(baseline: dict | None) -> dict | None:
    if baseline is None or "record" in baseline:
        return baseline
    comparison = baseline.get("comparison")
    return {
        **{k: baseline[k] for k in ("nvfp4_ray_s", "calibration_s", "calibration_compute_s", "stages_s", "peak_rss_gib",
                                    "peak_gpu_gib")},  # fmt: skip
        "outputs_equal": comparison["outputs_equal"] if comparison else None,
    }


def _preloaded_summary(preloaded: dict | None, llmcompressor_s: float | None) -> dict | None:
    if preloaded is None:
        return None
    seconds = preloaded["nvfp4_ray_s"]
    return {
        **{k: preloaded[k] for k in ("nvfp4_ray_s", "stages_s", "calibration_compute_s", "peak_rss_gib", "peak_pss_gib",
                                     "peak_gpu_gib", "same_files_as_plain_run")},  # fmt: skip
        "speedup_vs_llmcompressor": round(llmcompressor_s / seconds, 3) if llmcompressor_s else None,
    }


def model_name(shape: dict) -> str:
    """random-<family>-<preset> (random-llama-8b, random-qwen3moe-moe) for a preset's shape,
    -<N>L appended when only the depth differs."""
    family = shape.get("arch", "llama").replace("_", "")
    presets = {name: preset_shape(p) for name, p in PRESETS.items()}
    for name, preset in presets.items():
        if preset == shape:
            return f"random-{family}-{name}"
    for name, preset in presets.items():
        if {**preset, "layers": shape["layers"]} == shape:
            return f"random-{family}-{name}-{shape['layers']}L"
    return f"random-{family}-" + "-".join(f"{k}{v}" for k, v in shape.items() if k != "arch")


def algorithm_suffix(algorithm: str) -> str:
    """What GPTQ runs add to file and folder names (round-to-nearest keeps the old names)."""
    return "" if algorithm == "rtn" else f"-{algorithm}"


def budget_suffix(device_memory_gib: float | None) -> str:
    """What a run with its own device memory budget adds to file and folder names."""
    return "" if device_memory_gib is None else f"-budget{device_memory_gib:g}"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import nvfp4_ray

    found = {"python": platform.python_version(), "nvfp4_ray": nvfp4_ray.__version__}
    for package in ("torch", "transformers", "llmcompressor", "compressed-tensors", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True).stdout

        # a tree whose tracked files differ from HEAD did not run HEAD (the GPU machine's copy
        # of a working tree sits on the session's first commit): say so in the record
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
        found["git_commit"] = git("rev-parse", "HEAD").strip() + ("+uncommitted-changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        found["git_commit"] = None
    return found


def print_table(record: dict) -> None:
    def show(value, unit: str = "", digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}{unit}"

    reference, comparison, baseline = record["llmcompressor"], record["comparison"], record["baseline_1gpu"]
    rows = [
        ("device", f"{record['device']}, {record['gpus']} GPU(s)"),
        ("model", f"{record['model']}, {record['params'] / 1e9:.3f}B params, {record['source_bytes'] / 1e9:.2f} GB"),
        ("calibration", f"{record['samples']} samples x {record['seq_len']} tokens"),
        ("source_read_s", f"{show(record['source_read_s'], 's', 2)} ({record['source_read_gb_per_s']:.2f} GB/s, "
                          f"page cache: {record['page_cache_drop']['source_read']})"),
        ("llmcompressor_s", "-" if reference is None else f"{show(reference['seconds'], 's')} ("
            + ", ".join(f"{k} {v:.1f}s" for k, v in reference["stages_s"].items())
            + (", reused from an earlier run)" if reference["reused"] else ")")),
        ("  peak RSS / GPU", "-" if reference is None else
            f"{show(reference['peak_rss_gib'], ' GiB', 2)} / {show(reference['peak_gpu_gib'], ' GiB', 2)}"),
        ("nvfp4_ray_s", show(record["nvfp4_ray_s"], "s")),
        ("  stages", ", ".join(f"{k} {v:.1f}s" for k, v in record["stages_s"].items())),
        ("  peak RSS / GPU", f"{show(record['peak_rss_gib'], ' GiB', 2)} (PSS {show(record['peak_pss_gib'], ' GiB', 2)}, "
            f"largest process {show(record['peak_rss_single_process_gib'], ' GiB', 2)}) / "
            f"{show(record['peak_gpu_gib'], ' GiB', 2)}"),
        ("  layer reads per node", ", ".join(str(n) for n in record["nvfp4_ray"]["layer_reads_per_node"].values())),
        ("speedup_vs_llmcompressor", show(record["speedup_vs_llmcompressor"], "x", 2)),
        ("outputs_equal", "-" if comparison is None else
            f"{record['outputs_equal']} ({comparison['tensors_compared']} tensors, max input-scale difference "
            f"{comparison['max_input_scale_diff_bf16_steps']} bf16 steps)"),
        ("calibration_tokens_per_s", show(record["calibration_tokens_per_s"], digits=0)),
        ("weight_gb_per_s", show(record["weight_gb_per_s"], digits=3)),
        ("calibration_compute_s", show(record["calibration_compute_s"], "s", 2) + " (inside run_layer, busiest actor)"),
        ("  waiting for loads", show(record["calibration_load_wait_s"], "s", 2) + " (of it: reads and copies behind)"),
        ("snapshot_write_s", show(record["snapshot_write_s"], "s", 2) + " (hidden-state snapshots, beside the layers)"),
        ("calibration_cuda_graphs", str(record["calibration_cuda_graphs"])),
        ("exact", str(record["exact"])),
        ("algorithm", record["algorithm"]),
        ("gptq_seconds_per_layer", "-" if not record["gptq_seconds_per_layer"] else
            ", ".join(f"{k} {v:.2f}s" for k, v in record["gptq_seconds_per_layer"].items())),
        ("seconds_per_layer", ", ".join(f"{k} {show(v, 's', 2)}" for k, v in record["seconds_per_layer"].items())),
        ("calibration_speedup_vs_1gpu", show(record["calibration_speedup_vs_1gpu"], "x", 2)
            + ("" if baseline is None else f" (1 GPU: calibration {baseline['calibration_s']:.1f}s, "
               f"job {baseline['nvfp4_ray_s']:.1f}s)")),
        ("  compute only", show(record["calibration_compute_speedup_vs_1gpu"], "x", 2)),
        ("same_files_as_1gpu", "-" if record["same_files_as_1gpu"] is None else str(record["same_files_as_1gpu"])),
    ]  # fmt: skip
    preloaded = record.get("preloaded_workers")
    if preloaded:
        rows += [
            ("preloaded workers: nvfp4_ray_s", show(preloaded["nvfp4_ray_s"], "s")
                + f" ({show(preloaded['speedup_vs_llmcompressor'], 'x', 2)}; same files: {preloaded['same_files_as_plain_run']})"),
            ("  stages", ", ".join(f"{k} {v:.1f}s" for k, v in preloaded["stages_s"].items())),
            ("  peak PSS / GPU", f"{show(preloaded['peak_pss_gib'], ' GiB', 2)} / {show(preloaded['peak_gpu_gib'], ' GiB', 2)}"),
        ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(flush=True)


if __name__ == "__main__":
    main()
