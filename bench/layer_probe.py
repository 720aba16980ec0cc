"""What one calibration layer step costs on this GPU, and what would change it.

Runs nvfp4-ray's DecoderRunner on an 8B-shaped Llama layer (random weights) over S samples
of T tokens, one sample per forward (the default mode), and times ``run_layer``:

  pageable   weights handed over as plain CPU tensors (as from the object store)
  pinned     weights in pinned host memory
  resident   weights already on the GPU (no host-to-device copy)
  profile    kernel launches per sample and GPU busy time, from torch.profiler
  processes  the same samples split over P processes sharing the GPU

    python bench/layer_probe.py [--samples 128] [--seq-len 1024] [--processes 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}  # fmt: skip
RECORD = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


DEVICE = "cuda"


def make_runner(samples: int, seq_len: int, seed: int, graphs: bool = False, attention: str = "eager"):
    import torch

    from nvfp4_ray.calibration.batches import make_batches
    from nvfp4_ray.calibration.runner import DecoderRunner

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, CONFIG["vocab_size"], (samples, seq_len), generator=generator).tolist()
    runner = DecoderRunner(CONFIG, DEVICE, attention, graphs=graphs)
    embed = torch.randn(CONFIG["vocab_size"], CONFIG["hidden_size"], generator=generator).mul_(0.02).bfloat16()
    runner.start(make_batches(rows, None), embed)
    return runner


def layer_weights(runner, pin: bool = False, device: str | None = None) -> dict:
    import torch

    weights = {}
    for name, tensor in runner.layers[0].state_dict().items():
        value = torch.randn(tensor.shape).mul_(0.02).bfloat16()
        weights[name] = value.pin_memory() if pin and DEVICE == "cuda" else value.to(device) if device else value
    return weights


def time_layers(runner, weights: dict, repeats: int) -> list[float]:
    import torch

    seconds = []
    for _ in range(repeats):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        runner.run_layer(0, weights, RECORD)
        seconds.append(round(time.perf_counter() - began, 4))
    return seconds


def profile_layer(runner, weights: dict, samples: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.run_layer(0, weights, RECORD)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gpu_us = sum(getattr(e, "device_time", 0) or getattr(e, "cuda_time", 0) for e in events)
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"kernel_launches_per_sample": round(launches / samples, 1),
            "gpu_busy_s": round(gpu_us / 1e6, 4) if gpu_us else None}  # fmt: skip


def _process(rank: int, samples: int, seq_len: int, repeats: int, barrier, results, device: str, config: dict) -> None:
    global DEVICE
    DEVICE = device
    CONFIG.update(config)
    runner = make_runner(samples, seq_len, seed=rank)
    weights = layer_weights(runner)
    time_layers(runner, weights, 1)  # warm-up
    out = []
    for _ in range(repeats):
        barrier.wait()
        began = time.perf_counter()
        time_layers(runner, weights, 1)
        out.append(time.perf_counter() - began)
        barrier.wait()
    results[rank] = out


def shared_gpu(processes: int, samples: int, seq_len: int, repeats: int) -> list[float]:
    """Per-layer wall seconds when ``processes`` processes split the samples on one GPU."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Manager().dict()
    share = samples // processes
    procs = [ctx.Process(target=_process, args=(r, share, seq_len, repeats, barrier, results, DEVICE, CONFIG)) for r in range(processes)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    # both wait at the barrier, so a layer is done when the slower one is
    return [round(max(results[r][i] for r in range(processes)), 4) for i in range(repeats)]


def probe_arguments(description: str, repeats: int) -> argparse.ArgumentParser:
    """The arguments of the probes that run this layer: samples, tokens, repeats, output,
    and the device (``use_arguments`` applies the last two)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda", help="cpu: only to try the script out, with --small")
    parser.add_argument("--small", action="store_true", help="a 256-wide layer instead of the 8B shape")
    return parser


def use_arguments(args: argparse.Namespace) -> None:
    global DEVICE
    DEVICE = args.device
    if args.small:
        CONFIG.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def main() -> None:
    parser = probe_arguments(__doc__, repeats=4)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    import torch

    use_arguments(args)

    runner = make_runner(args.samples, args.seq_len, seed=0)
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "samples": args.samples, "seq_len": args.seq_len}
    time_layers(runner, layer_weights(runner), 1)  # warm-up: kernels chosen, caches filled
    result["pageable_s"] = time_layers(runner, layer_weights(runner), args.repeats)
    result["pinned_s"] = time_layers(runner, layer_weights(runner, pin=True), args.repeats)
    result["resident_s"] = time_layers(runner, layer_weights(runner, device=DEVICE), args.repeats)
    result["profile"] = profile_layer(runner, layer_weights(runner, device=DEVICE), args.samples)
    half = make_runner(args.samples // 2, args.seq_len, seed=1)
    time_layers(half, layer_weights(half), 1)
    result["half_samples_pageable_s"] = time_layers(half, layer_weights(half), args.repeats)
    del runner, half
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    result[f"{args.processes}_processes_s"] = shared_gpu(args.processes, args.samples, args.seq_len, args.repeats)
    report(result, args.out)


def report(result: dict, out: str | None) -> None:
    """Print a probe's result and write it as JSON to ``out``."""
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
