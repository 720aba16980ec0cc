"""GPTQ Hessian sums alone, on the machine's accelerator: llm-compressor's arithmetic
(``add_to_hessian``: fp32 products of sqrt(2) x, ``--exact``) against the default mode's
(``add_products``: exact products of the bf16 inputs, on a GPU by its bf16 tensor cores,
summed in fp32, the lower triangle by row stripes), both against the float64 sum of the
same products, at the 8B shapes (in_features 4096 and 14336), one forward of ``--tokens``
tokens at a time as a calibration pass adds them. On a GPU also other arithmetic, other
stripe counts, and 2, 4 or 8 forwards' tokens in one product ("batched_N"; 8: less
accurate, record 1709). Prints, per shape, each method's seconds per forward, its relative error
(Frobenius norm, and the largest on the diagonal) and whether two runs gave the same bits.

    python -m bench.hessian_probe [--tokens 1024] [--forwards 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import log


def _inputs(columns: int, tokens: int, forwards: int, device) -> list[torch.Tensor]:
    """bf16 activations with the spread of real ones: column scales over two decades and a
    few outlier columns 50x the rest."""
    generator = torch.Generator(device=device).manual_seed(columns)
    scales = torch.logspace(-1, 1, columns, device=device)[torch.randperm(columns, device=device, generator=generator)]
    scales[:8] *= 50
    return [(torch.randn(1, tokens, columns, device=device, generator=generator) * scales).to(torch.bfloat16)
            for _ in range(forwards)]  # fmt: skip


def _run(add, inputs: list[torch.Tensor], columns: int, device) -> tuple[torch.Tensor, float]:
    from nvfp4_ray.formats import gptq

    hessian, count = gptq.new_hessian(columns, device)
    add(hessian, count, inputs[0])  # warm-up (kernel choice), then the timed sum from zero
    hessian.zero_()
    seconds = 0.0
    for x in inputs:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            add(hessian, count, x)
            end.record()
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000
        else:
            start = time.perf_counter()
            add(hessian, count, x)
            seconds += time.perf_counter() - start
    return hessian, seconds / len(inputs)


def _mm_then_add(hessian, count, inputs) -> None:
    """add_products' sum with the bf16 product as a tensor of its own, then added."""
    count += inputs.shape[0]
    x = inputs.reshape(-1, inputs.shape[-1])
    hessian.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=2)


def _tf32(hessian, count, inputs) -> None:
    """The same products by the TF32 tensor cores (also exact for bf16 inputs)."""
    count += inputs.shape[0]
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        hessian.addmm_(x.t(), x, alpha=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _lower_stripes(stripes: int):
    """add_products at ``stripes`` row stripes of the lower triangle (the diagonal blocks
    whole): (stripes + 1) / (2 stripes) of the products; 1 is the whole product."""
    from nvfp4_ray.formats import gptq

    return lambda hessian, count, inputs: gptq.add_products(hessian, count, inputs, stripes)


def _batched(inputs: list[torch.Tensor], forwards: int) -> list[torch.Tensor]:
    """``forwards`` forwards' inputs at a time, as one."""
    return [torch.cat(inputs[i : i + forwards], dim=1) for i in range(0, len(inputs), forwards)]


def main() -> None:
    from nvfp4_ray.formats import gptq

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--forwards", type=int, default=16)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for columns in (4096, 14336):
        inputs = _inputs(columns, args.tokens, args.forwards, device)
        exact = torch.zeros(columns, columns, device=device, dtype=torch.float64)
        for x in inputs:
            flat = x.reshape(-1, columns).double()
            exact.addmm_(flat.t(), flat, alpha=2)
        methods = [("llmcompressor_fp32", gptq.add_to_hessian), ("exact_products", gptq.add_products)]
        if device.type == "cuda":
            methods += [("bf16_mm_then_add", _mm_then_add), ("tf32", _tf32)]
        if device.type == "cuda":
            methods += [(f"lower_stripes_{k}", _lower_stripes(k)) for k in (1, 2, 4, 7)]
            # several forwards' tokens in one product, add_products' own stripes: fewer passes
            # over the sum (its reads and writes bound a 1024-token forward at 14336 inputs)
            methods += [(f"batched_{n}", gptq.add_products) for n in (2, 4, 8)]
        for name, add in methods:
            batched = name.startswith("batched_")
            feed = _batched(inputs, int(name.split("_")[1])) if batched else inputs
            try:
                hessian, seconds = _run(add, feed, columns, device)
                if batched:
                    seconds *= len(feed) / len(inputs)
            except Exception as exc:  # an API this torch lacks: recorded, the others go on
                results.append({"in_features": columns, "method": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                log(json.dumps(results[-1]))
                continue
            again, _ = _run(add, feed, columns, device)
            if "stripes" in name or name == "exact_products" or batched:  # the upper triangle from the lower, as HessianBlocks fills it
                gptq.fill_upper(hessian)
                gptq.fill_upper(again)
            error = hessian.double() - exact
            diagonal = (error.diagonal().abs() / exact.diagonal().abs()).max().item()
            flops = 2 * columns**2 * args.tokens
            results.append({
                "in_features": columns, "method": name, "seconds_per_forward": round(seconds, 6),
                "tflops": round(flops / seconds / 1e12, 1) if seconds else None,
                "relative_error": float(error.norm() / exact.norm()), "max_diagonal_relative_error": diagonal,
                "deterministic": torch.equal(hessian, again),
            })  # fmt: skip
            log(json.dumps(results[-1]))
            del hessian, again, error
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "tokens": args.tokens, "forwards": args.forwards, "results": results}))


if __name__ == "__main__":
    main()
