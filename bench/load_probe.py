"""What a layer worker's load thread costs its compute thread, on this GPU.

Times DecoderRunner.run_layer on an 8B-shaped Llama layer (weights resident on the GPU,
128 x 1024 tokens, one sample per forward) alone, and while a second thread of the same
process keeps doing one kind of load work:

  pageable_h2d   a layer's weights copied from plain CPU memory on a side stream
  pinned_h2d     the same through a pinned buffer (CPU copy, then an asynchronous copy)
  quantize       quantize a resident layer's Linears on a side stream, results to the CPU
  load           what LayerWorker.load does: H2D, finite check, quantize, entries

and ``load`` again with a shorter GIL switch interval; then the same step replayed as CUDA
graphs (``DecoderRunner(graphs=True)``), alone and beside ``load``, and whether its hidden
states and amax equal the eager step's bit for bit. Each result is printed as soon as it
is measured. (Pure-Python work in the second thread is left out: on a GPU every kernel
launch of the layer step then waits for the GIL, and one step lasts tens of seconds.)

    python bench/load_probe.py [--out FILE.json] [--small --device cpu]
"""

from __future__ import annotations

import json
import sys
import threading
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from bench.layer_probe import (  # noqa: E402
    RECORD,
    layer_weights,
    make_runner,
    probe_arguments,
    report,
    time_layers,
    use_arguments,
)


def layer_bundle(weights: dict):
    """The layer's tensors as a TensorBundle, as a read task hands them over."""
    import numpy as np

    from nvfp4_ray.io.tensors import TensorBundle, safetensors_dtype

    entries, parts, offset = {}, [], 0
    for name, tensor in weights.items():
        raw = tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy()
        entries[f"model.layers.0.{name}"] = (offset, safetensors_dtype(tensor.dtype), tuple(tensor.shape))
        parts.append(raw)
        offset += raw.size
    return TensorBundle(np.concatenate(parts), entries)


def layer_spec(weights: dict):
    from nvfp4_ray.architecture import LayerSpec, LinearSpec
    from nvfp4_ray.formats.linear import preset

    scheme = preset("NVFP4")
    linears = {
        name: LinearSpec(f"model.layers.0.{name}", f"model.layers.0.{name}", name, weights[f"{name}.weight"].shape[1],
                         weights[f"{name}.weight"].shape[0], scheme)
        for name in RECORD
    }  # fmt: skip
    groups = [[linears[n] for n in ("mlp.gate_proj", "mlp.up_proj")], [linears["mlp.down_proj"]],
              [linears[n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")], [linears["self_attn.o_proj"]]]  # fmt: skip
    tensors = {f"model.layers.0.{name}": name for name in weights}
    return LayerSpec(0, "model.layers.0", tensors, groups)


def background(work, stop: threading.Event, counter: list) -> threading.Thread:
    def loop():
        while not stop.is_set():
            work()
            counter[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def main() -> None:
    args = probe_arguments(__doc__, repeats=3).parse_args()
    import torch

    from nvfp4_ray.layer_quantizer import quantize_layer, to_device_checked
    from nvfp4_ray.pipeline.worker_loads import PIECE_BYTES

    use_arguments(args)
    device = torch.device(args.device)
    runner = make_runner(args.samples, args.seq_len, seed=0)
    host = layer_weights(runner)
    resident = {k: v.to(device) for k, v in host.items()}
    bundle, spec = layer_bundle(host), layer_spec(host)
    stream = torch.cuda.Stream() if args.device == "cuda" else None
    pinned = {k: torch.empty_like(v).pin_memory() for k, v in host.items()} if args.device == "cuda" else {}
    pieces = [torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if args.device == "cuda" else None

    def on_stream(function):
        def run():
            with torch.cuda.stream(stream) if stream is not None else torch.no_grad():
                function()
                if stream is not None:
                    stream.synchronize()

        return run

    def pageable_h2d():
        for v in host.values():
            v.to(device, non_blocking=True)

    def pinned_h2d():
        for k, v in host.items():
            buffer = pinned.get(k, v)
            buffer.copy_(v)
            buffer.to(device, non_blocking=True)

    def quantize():
        from nvfp4_ray.formats.linear import quantize_group

        for group in spec.groups:
            outputs = quantize_group([resident[f"{linear.local}.weight"] for linear in group], group[0].scheme)
            for tensors in outputs:
                for t in tensors.values():
                    t.cpu()

    def load():
        on_device = to_device_checked(bundle, device, check=True, pieces=pieces)
        quantize_layer(spec, on_device)

    time_layers(runner, resident, 1)  # warm-up
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "samples": args.samples,
              "seq_len": args.seq_len, "alone_s": time_layers(runner, resident, args.repeats)}  # fmt: skip
    print(json.dumps({"alone_s": result["alone_s"]}), flush=True)
    for name, work in (("pageable_h2d", pageable_h2d), ("pinned_h2d", pinned_h2d), ("quantize", quantize), ("load", load)):
        run = on_stream(work)
        began = time.perf_counter()
        run()
        alone = time.perf_counter() - began
        stop, counter = threading.Event(), [0]
        thread = background(run, stop, counter)
        seconds = time_layers(runner, resident, args.repeats)
        stop.set()
        thread.join()
        result[name] = {"work_alone_s": round(alone, 4), "layer_s": seconds, "work_done": counter[0]}
        print(json.dumps({name: result[name]}), flush=True)
    if args.device == "cuda":
        graphed = make_runner(args.samples, args.seq_len, seed=0, graphs=True)
        result["graphs_equal_eager"] = same_step(runner, graphed, resident)
        print(json.dumps({"graphs_equal_eager": result["graphs_equal_eager"]}), flush=True)
        result["graphs_alone_s"] = time_layers(graphed, resident, args.repeats)
        stop, counter = threading.Event(), [0]
        thread = background(on_stream(load), stop, counter)
        result["graphs_load"] = {"layer_s": time_layers(graphed, resident, args.repeats), "work_done": counter[0]}
        stop.set()
        thread.join()
        result["graphs_notes"] = graphed.notes
        print(json.dumps({k: result[k] for k in ("graphs_alone_s", "graphs_load", "graphs_notes")}), flush=True)
        del graphed
    sys.setswitchinterval(0.0002)
    stop, counter = threading.Event(), [0]
    thread = background(on_stream(load), stop, counter)
    result["load_switch_0.2ms"] = {"layer_s": time_layers(runner, resident, args.repeats), "work_done": counter[0]}
    stop.set()
    thread.join()
    report(result, args.out)


def same_step(eager, graphed, weights: dict) -> dict:
    """One step of each runner from the same hidden states: equal outputs and amax?"""
    import torch

    for state, other in zip(eager.states, graphed.states):
        other.hidden = state.hidden.clone()
    amax_eager = eager.run_layer(0, weights, RECORD)
    amax_graphed = graphed.run_layer(0, weights, RECORD)
    hidden = all(torch.equal(a.hidden, b.hidden) for a, b in zip(eager.states, graphed.states))
    return {"hidden_states": hidden, "amax": amax_eager == amax_graphed, "graphs_still_on": graphed.graphed}


if __name__ == "__main__":
    main()
