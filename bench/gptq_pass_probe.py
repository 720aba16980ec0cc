"""Where a GPTQ layer's calibration and propagation passes spend their time on this GPU.

On bench/layer_probe.py's 8B-shaped Llama layer (random weights on the GPU), S samples of
T tokens, one sample a forward, SDPA attention (GPTQ's default mode), times:

  forward_s          the layer's forward, whole (the propagation pass)
  inputs_only_s      the forward stopped after down_proj's input (the Hessian pass without Hessians)
  hessian_pass_s     the Hessian pass as GptqSteps runs it: inputs only, every Linear's amax,
                     the default mode's Hessian blocks and tree (calibration/hessians.py)
  hessian_pass_P_s   the same with P forwards a product (hessians.FORWARDS_PER_PRODUCT)

each pass's first run in the process apart (``_first_s``: what loading its kernels adds),
and, under torch.profiler, each pass's GPU busy time against its wall time and its
largest kernels: what the GPU does, and how much of the pass it waits for the host.

    python -m bench.gptq_pass_probe [--samples 128] [--seq-len 1024] [--out FILE.json]
"""

from __future__ import annotations

import time

from bench import layer_probe

INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")  # each fused group's first


def passes(runner, weights: dict, samples: int) -> dict:
    """Each pass as a function of no arguments that waits for its kernels."""
    import torch

    from nvfp4_ray.calibration import batches, hessians

    device = torch.device(layer_probe.DEVICE)

    def sync(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    widths = {"self_attn": runner.layers[0].self_attn.q_proj.in_features, "mlp": runner.layers[0].mlp.down_proj.in_features}
    inputs = {name: widths["mlp"] if name == "mlp.down_proj" else widths["self_attn"] for name in INPUTS}

    def hessian_pass():
        blocks = hessians.HessianBlocks(inputs, batches.block_size(samples, False), device)
        runner.run_layer(0, weights, layer_probe.RECORD, [], advance=False, inputs_to=blocks.hooks(), eager=True,
                         inputs_only=True)  # fmt: skip
        blocks.partials()

    return {
        "forward": sync(lambda: runner.run_layer(0, weights, [], [], advance=False, eager=True)),
        "inputs_only": sync(lambda: runner.run_layer(0, weights, layer_probe.RECORD, [], advance=False, eager=True,
                                                     inputs_only=True)),  # fmt: skip
        "hessian_pass": sync(hessian_pass),
    }


def timed(run, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        seconds.append(round(time.perf_counter() - began, 4))
    return seconds


def profiled(run) -> dict:
    """GPU busy seconds (kernels' durations summed; one stream), wall seconds, the kernels
    taking most of it."""
    from torch.profiler import ProfilerActivity, profile

    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    wall = time.perf_counter() - began
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":  # on a CPU: nothing
            continue
        entry = kernels.setdefault(event.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += (getattr(event, "device_time", 0) or getattr(event, "cuda_time", 0)) / 1e6
    busy = sum(seconds for _, seconds in kernels.values())
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:12]
    return {"wall_s": round(wall, 4), "gpu_busy_s": round(busy, 4),
            "kernels": [[name, count, round(seconds, 4)] for name, (count, seconds) in top]}  # fmt: skip


def main() -> None:
    args = layer_probe.probe_arguments(__doc__, repeats=3).parse_args()
    import torch

    layer_probe.use_arguments(args)
    from nvfp4_ray.calibration import hessians

    runner = layer_probe.make_runner(args.samples, args.seq_len, seed=0, attention="sdpa")
    weights = layer_probe.layer_weights(runner, device=args.device)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "samples": args.samples, "seq_len": args.seq_len,
              "forwards_per_product": hessians.FORWARDS_PER_PRODUCT}  # fmt: skip
    runs = passes(runner, weights, args.samples)
    for name, run in runs.items():  # the first: kernels loaded and chosen, the allocator's pools grown
        result[f"{name}_first_s"] = timed(run, 1)[0]
        result[f"{name}_s"] = timed(run, args.repeats)
    default = hessians.FORWARDS_PER_PRODUCT
    for per_product in (1, 4):
        hessians.FORWARDS_PER_PRODUCT = per_product
        runs["hessian_pass"]()
        result[f"hessian_pass_{per_product}_s"] = timed(runs["hessian_pass"], args.repeats)
    hessians.FORWARDS_PER_PRODUCT = default
    result["profile"] = {name: profiled(run) for name, run in runs.items()}
    layer_probe.report(result, args.out)


if __name__ == "__main__":
    main()
