"""The reference: llm-compressor 0.14 as a user runs it, in a process of its own (so that its
memory is measured alone).

    python -m bench.llmcompressor_run SOURCE CALIBRATION.parquet OUT SAMPLES SEQ_LEN RESULT.json [rtn|gptq]

``from_pretrained(dtype=bfloat16)`` loads the model on the CPU; ``oneshot`` with the
sequential pipeline then onloads one decoder layer at a time onto the accelerator when
there is one (llmcompressor.utils.dev.get_main_device), batch size 1, and
``save_pretrained(save_compressed=True)`` writes the NVFP4 checkpoint. The arguments are
those of tests/reference.py, which the byte-identity tests use. ``gptq``: GPTQModifier with
the NVFP4 preset and samples not shuffled (its default shuffles them with an unseeded RNG,
which changes no timing); on CUDA its block updates run in its Triton kernel, as users run it.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import log  # noqa: E402


def main(source: str, calibration: str, out: str, samples: int, seq_len: int, result: str, algorithm: str = "rtn") -> None:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [ids[:seq_len] for ids in pq.read_table(calibration).column("input_ids").to_pylist()[:samples]]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    log("llm-compressor: loading the model (from_pretrained, bf16)")
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source)
    loaded = time.monotonic()
    modifier = GPTQModifier if algorithm == "gptq" else QuantizationModifier
    log(f"llm-compressor: oneshot, {algorithm}, {len(rows)} samples x {seq_len} tokens, sequential pipeline")
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=modifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
        pipeline="sequential",
        shuffle_calibration_samples=algorithm == "rtn",  # RTN: its default (order-free statistics)
        num_calibration_samples=len(rows),
        max_seq_length=seq_len,
    )
    calibrated = time.monotonic()
    log("llm-compressor: save_pretrained(save_compressed=True)")
    model.save_pretrained(out, save_compressed=True)
    saved = time.monotonic()
    timings = {"load": loaded - start, "oneshot": calibrated - loaded, "save": saved - calibrated}
    with open(result, "w") as handle:
        json.dump({"seconds": saved - start, "stages_s": {k: round(v, 3) for k, v in timings.items()}}, handle)
    log(f"llm-compressor: done in {saved - start:.1f}s")


if __name__ == "__main__":
    source, calibration, out, samples, seq_len, result, *algorithm = sys.argv[1:]
    main(source, calibration, out, int(samples), int(seq_len), result, *algorithm)
