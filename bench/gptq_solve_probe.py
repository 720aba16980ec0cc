"""GPTQ solves alone, on the machine's accelerator: nvfp4-ray's solve_group, --exact and
default mode, against llm-compressor 0.14's quantize_weight on the same weights and
Hessians, at the 8B shapes (q/k/v and gate/up share a Hessian; o_proj; down_proj). Prints,
per shape, whether --exact's solved weights are bit-identical, the seconds of each, the
share of the default mode's packed codes equal to --exact's, and the two inverse
factorizations (gptq.inverse_factor) timed alone with their error against float64.

    python -m bench.gptq_solve_probe [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import log

# (name, out_features of each sibling, in_features): Llama-3-8B
SHAPES = [("qkv", (4096, 1024, 1024), 4096), ("o", (4096,), 4096), ("gate_up", (14336, 14336), 4096), ("down", (4096,), 14336)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    from compressed_tensors.quantization import ActivationOrdering
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from nvfp4_ray.formats import gptq, linear

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the random Hessian")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scheme = linear.preset("NVFP4")
    reference_args = scheme.weights.model_copy()
    reference_args.actorder = ActivationOrdering.STATIC  # GPTQModifier's default, ours too
    generator = torch.Generator(device=device).manual_seed(0)
    results, groups = [], []
    for name, outs, columns in SHAPES:
        x = torch.randn(args.tokens, columns, device=device, generator=generator)
        hessian, count = gptq.new_hessian(columns, device)
        gptq.add_to_hessian(hessian, count, x.unsqueeze(0))
        weights = [(torch.randn(rows, columns, device=device, generator=generator) * 0.02).to(torch.bfloat16) for rows in outs]
        ours, ours_s = _timed(lambda: gptq.solve_group(weights, hessian, count, scheme, 128, 0.01, exact=True))
        default, default_s = _timed(lambda: gptq.solve_group(weights, hessian, count, scheme, 128, 0.01, exact=False))
        global_scale, scales = linear.weight_qparams(weights, scheme.weights)
        start = time.monotonic()
        theirs = [
            quantize_weight(w.float().unsqueeze(0), (hessian / count).unsqueeze(0), s.unsqueeze(0), torch.zeros_like(s).unsqueeze(0),
                            global_scale.reshape(1), reference_args, 128, 0.01)[0][0].to(w.dtype)
            for w, (s, _) in zip(weights, scales)
        ]  # fmt: skip
        _sync()
        theirs_s = time.monotonic() - start
        equal = all(torch.equal(a.weight, b) for a, b in zip(ours, theirs))
        codes = [torch.cat([(a.tensors["weight_packed"] == b.tensors["weight_packed"]).flatten() for a, b in zip(ours, default)])]
        results.append({"group": name, "bit_identical": equal, "nvfp4_ray_s": round(ours_s, 3), "llmcompressor_s": round(theirs_s, 3),
                        "default_mode_s": round(default_s, 3), "default_mode_packed_bytes_equal": round(codes[0].float().mean().item(), 4),
                        **_factorizations(hessian / count)})  # fmt: skip
        log(json.dumps(results[-1]))
        groups.append((weights, hessian, count))
    record = {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"), "results": results}
    if device.type == "cuda":
        record["layer"] = _layer_solves(groups, scheme, device)
    print(json.dumps(record))


def _timed(fn):
    _sync()
    start = time.monotonic()
    result = fn()
    _sync()
    return result, time.monotonic() - start


def _factorizations(normalized: torch.Tensor) -> dict:
    """gptq.inverse_factor in both modes, seconds and relative error (Frobenius) of the
    factor against the same steps in float64."""
    from nvfp4_ray.formats import gptq

    reference = gptq.inverse_factor(normalized.double(), 0.01, True, True).factor
    out = {}
    for mode, exact in (("exact", True), ("default", False)):
        factor, seconds = _timed(lambda: gptq.inverse_factor(normalized.clone(), 0.01, True, exact).factor)
        out[f"factor_{mode}_s"] = round(seconds, 4)
        out[f"factor_{mode}_error"] = float((factor.double() - reference).norm() / reference.norm())
    return out


def _layer_solves(groups: list, scheme, device) -> dict:
    """A layer's four default-mode solves one after the other (as a worker runs them) against all four
    at once, each in a thread of its own on a CUDA stream of its own: the seconds of each,
    and whether the results are the same bits."""
    from concurrent.futures import ThreadPoolExecutor

    from nvfp4_ray.formats import gptq

    def solve(group):
        weights, hessian, count = group
        with torch.cuda.stream(torch.cuda.Stream(device)):
            result = gptq.solve_group(weights, hessian, count, scheme, 128, 0.01, exact=False)
            torch.cuda.current_stream().synchronize()
        return result

    _sync()
    start = time.monotonic()
    one_by_one = [gptq.solve_group(w, h, c, scheme, 128, 0.01, exact=False) for w, h, c in groups]
    _sync()
    sequential_s = time.monotonic() - start
    with ThreadPoolExecutor(len(groups)) as pool:
        start = time.monotonic()
        together = list(pool.map(solve, groups))
        _sync()
        concurrent_s = time.monotonic() - start
    same = all(torch.equal(a.weight, b.weight) for x, y in zip(one_by_one, together) for a, b in zip(x, y))
    result = {"sequential_s": round(sequential_s, 3), "concurrent_s": round(concurrent_s, 3), "bit_identical": same}
    log(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
