"""GPTQ quality on the whole real SmolLM2-135M-Instruct (210 Linears, lm_head ignored):
nvfp4-ray's default mode, calibrated on the demo set's first 32 rows of up to 512 tokens,
`nvfp4-ray evaluate`d against the bf16 model on the first 4096 and 16384 tokens of
CPython's pydoc_data.topics (topics in sorted key order, joined by blank lines), the
setting of the record bench/results/probes/2026-12-06T0718-cpu-smollm2-gptq-quality.json
(whose llm-compressor numbers it is compared with). Minutes on a CPU.

    python -m bench.gptq_quality_probe OUT_DIR [--exact]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

from bench import log


def pydoc_text(path: str) -> str:
    from pydoc_data.topics import topics

    with open(path, "w", encoding="utf-8") as out:
        out.write("\n\n".join(topics[key] for key in sorted(topics)))
    return path


def main() -> None:
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.demo import demo_calibration, smollm2_checkpoint
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize
    from nvfp4_ray.quality.evaluate import EvaluateOptions, evaluate

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--exact", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source = smollm2_checkpoint()
    calibration = demo_calibration(source, 32, 512)
    dest = os.path.join(args.out, "gptq-exact" if args.exact else "gptq-default")
    config = QuantizeConfig(source=source, dest=dest, calibration=calibration, num_samples=32, max_seq_len=512,
                            algorithm="gptq", exact=args.exact, ignore=["lm_head"])  # fmt: skip
    start = time.monotonic()
    summary = run_quantize(config, Events("json", stream=io.StringIO()))
    seconds = time.monotonic() - start
    text = pydoc_text(os.path.join(args.out, "pydoc-topics.txt"))
    results = []
    for tokens in (4096, 16384):
        report = evaluate(EvaluateOptions(base=source, quant=dest, text=text, max_tokens=tokens))
        results.append({"tokens": tokens, "ppl_base": report["perplexity"]["base"], "ppl": report["perplexity"]["quant"],
                        "kl": report["mean_kl"], "top1": report["top1_agreement"]})  # fmt: skip
        log(json.dumps(results[-1]))
    print(json.dumps({"mode": "exact" if args.exact else "default", "quantize_s": round(seconds, 1),
                      "gptq_seconds": summary.get("gptq_seconds"), "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
