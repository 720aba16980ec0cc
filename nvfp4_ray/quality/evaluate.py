"""``nvfp4-ray evaluate BASE QUANT``: what quantization cost, as numbers.

Perplexity of both models, top-1 agreement and mean KL divergence of QUANT against BASE
on held-out text (logits.py), and the weight SQNR of every quantized Linear with the
worst ones named (weights.py). The default held-out text ships with nvfp4-ray
(nvfp4_ray/data/heldout.txt) and is not part of the shipped calibration corpus. A table
for people goes to stderr; the report, as JSON, is the last line on stdout.

Both checkpoints are loaded with transformers, so they must be local directories. The
same checkpoints, text and options give the same report on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import resources
from typing import Literal

from pydantic import Field

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.storage import Store, is_remote
from nvfp4_ray.options import CommandOptions

HELDOUT = "heldout.txt"
NVFP4_FORMAT = "nvfp4-pack-quantized"


class EvaluateOptions(CommandOptions):
    POSITIONAL = ("base", "quant")

    base: str = Field(description="the unquantized (or FP8, 128 x 128 block scales) checkpoint directory")
    quant: str = Field(description="the NVFP4 checkpoint directory made from BASE")
    text: str | None = Field(None, description="held-out UTF-8 text file; default: the text shipped with nvfp4-ray")
    seq_len: int = Field(512, ge=2, description="tokens per forward window")
    max_tokens: int = Field(4096, ge=2, description="tokens of the text evaluated (its beginning)")
    worst: int = Field(5, ge=0, description="how many Linears with the lowest weight SQNR the report names")
    log_format: Literal["text", "json"] = "text"


def run_evaluate(options: EvaluateOptions, events) -> dict:
    """The command: the report as the summary, and as a table on stderr for people."""
    with events.stage("evaluate"):
        report = evaluate(options, events)
    if options.log_format == "text":
        sys.stderr.write(format_table(report) + "\n")
    return {"status": "succeeded", "base": options.base, "quant": options.quant, **report}


def evaluate_checkpoint(base: str, dest: str, small: dict[str, bytes], unit_files: list[str], events) -> dict:
    """``quantize --evaluate``: the default report for the checkpoint about to be committed,
    its small files and DEST's unit files put together in a temporary folder, so that the
    checkpoint DEST holds now stays in place while the evaluation runs."""
    import tempfile

    with events.stage("evaluate"), tempfile.TemporaryDirectory(prefix="nvfp4-evaluate-") as folder:
        for name in unit_files:
            os.symlink(os.path.abspath(os.path.join(dest, name)), os.path.join(folder, name))
        for name, data in small.items():
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(data)
        return evaluate(EvaluateOptions(base=base, quant=folder), events)


def check_base(base: str) -> None:
    """``quantize --evaluate`` before any work: SOURCE can serve as BASE (tokenizer, text)."""
    folder, config = _local_checkpoint(base, "SOURCE", quantized=False)
    held_out_windows(folder, config, EvaluateOptions(base=base, quant=base))


def evaluate(options: EvaluateOptions, events=None) -> dict:
    """The quality report of QUANT against BASE. Bad input raises InputError first."""
    import torch

    from nvfp4_ray.quality import logits, weights
    from nvfp4_ray.quality.fp8_base import bf16_base

    base, base_config = _local_checkpoint(options.base, "BASE", quantized=False)
    quant, quant_config = _local_checkpoint(options.quant, "QUANT", quantized=True)
    if base_config.get("model_type") != quant_config.get("model_type"):
        raise InputError(
            f"BASE is a {base_config.get('model_type')} model but QUANT a {quant_config.get('model_type')} one; "
            "give the checkpoint QUANT was made from as BASE"
        )
    text, windows = held_out_windows(base, base_config, options)
    # Both models compute in BASE's dtype, as they would be served.
    dtype = getattr(torch, str(base_config.get("dtype") or base_config.get("torch_dtype")), None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # QUANT made from BASE? Asked before an FP8 BASE's bf16 copy is written
    weights.quantized_linears(weights.tensor_files(base), weights.tensor_files(quant), quant)
    with bf16_base(base, base_config) as base_weights:
        per_linear = weights.weight_sqnr(base_weights, quant)
        base_model = logits.load_model(base_weights, dtype, device)
    quant_model = logits.load_model(quant, dtype, device)
    if events is not None:
        events.progress("evaluate", len(windows), unit="window")
    advance = (lambda: events.advance("evaluate")) if events is not None else None
    outputs = logits.compare(base_model, quant_model, windows, device, advance)
    return {
        "text": {
            **text,
            "tokens": sum(len(w) for w in windows),
            "windows": len(windows),
            "seq_len": options.seq_len,
        },
        "perplexity": outputs["perplexity"],
        "top1_agreement": outputs["top1_agreement"],
        "mean_kl": outputs["mean_kl"],
        "weight_sqnr_db": weights.summarize(per_linear, options.worst),
    }


def held_out_windows(base: str, base_config: dict, options: EvaluateOptions) -> tuple[dict, list[list[int]]]:
    """The held-out text (name, sha256) and its first max_tokens tokens cut into windows."""
    from transformers import AutoTokenizer

    text, name = _held_out_text(options.text)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as exc:
        raise InputError(f"BASE {base}: its tokenizer cannot be loaded: {exc}") from None
    ids = tokenizer(text)["input_ids"][: options.max_tokens]
    vocab_size = int((base_config.get("text_config") or base_config).get("vocab_size", 0))
    if vocab_size and any(i >= vocab_size for i in ids):
        raise InputError(
            f"BASE {base}: its tokenizer gives token ids beyond the model's vocab_size {vocab_size}; "
            "the tokenizer files do not belong to this model"
        )
    windows = [ids[i : i + options.seq_len] for i in range(0, len(ids), options.seq_len)]
    windows = [window for window in windows if len(window) >= 2]
    if not windows:
        raise InputError(f"the held-out text {name} has fewer than 2 tokens; give a longer --text")
    return {"name": name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}, windows


def _local_checkpoint(url: str, role: str, quantized: bool) -> tuple[str, dict]:
    """The plain local path of a checkpoint (relative paths and file:// URLs resolved) and its config."""
    if is_remote(url):
        raise InputError(
            f"{role} {Store(url).display()}: evaluate loads checkpoints with transformers, which needs a local directory"
        )
    folder = Store(url).root
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise InputError(f"{role} {folder} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"{role} {folder} is not a checkpoint directory (no config.json)")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except ValueError as exc:
        raise InputError(f"{role} {path} is not valid JSON: {exc}") from None
    method = (config.get("quantization_config") or {}).get("format")
    if quantized and method != NVFP4_FORMAT:
        raise InputError(
            f"QUANT {folder} is not an NVFP4 checkpoint (quantization format {method!r}, need {NVFP4_FORMAT!r})"
        )
    if not quantized and "quantization_config" in config:
        if not isinstance(config["quantization_config"], dict) or config["quantization_config"].get("quant_method") != "fp8":
            raise InputError(
                f"{role} {folder} is quantized; give the unquantized (or FP8, 128 x 128 block scales) checkpoint "
                "QUANT was made from"
            )
        from nvfp4_ray.quality.fp8_base import check_fp8_base

        check_fp8_base(folder, config, role)  # read as quantize reads it (fp8_base.py)
    return folder, config


def _held_out_text(url: str | None) -> tuple[str, str]:
    if url is None:
        return resources.files("nvfp4_ray").joinpath("data", HELDOUT).read_text("utf-8"), f"{HELDOUT} (shipped)"
    folder, _, name = url.rstrip("/").rpartition("/")
    store = Store(folder or ".")
    if not name or not store.exists(name):
        raise InputError(f"held-out text {store.display(name)} does not exist")
    try:
        return store.read_text(name), store.display(name)
    except UnicodeDecodeError:
        raise InputError(f"held-out text {store.display(name)} is not UTF-8 text") from None


def headline(report: dict) -> dict:
    """The report without the SQNR of each Linear: what a one-line summary carries (the
    worst Linears stay named; manifest.json keeps the whole report)."""
    sqnr = {key: value for key, value in report["weight_sqnr_db"].items() if key != "per_linear"}
    return {**report, "weight_sqnr_db": sqnr}


def format_table(report: dict) -> str:
    """The report for people."""
    text, ppl, sqnr = report["text"], report["perplexity"], report["weight_sqnr_db"]
    width = max([len(entry["name"]) for entry in sqnr["worst"]] + [10])
    lines = [
        f"Quality of QUANT against BASE on {text['tokens']} held-out tokens ({text['name']},"
        f" {text['windows']} windows of up to {text['seq_len']})",
        f"  perplexity       base {ppl['base']:.4f}   quant {ppl['quant']:.4f}"
        f"   ({ppl['quant'] / ppl['base'] - 1:+.2%})",
        f"  top-1 agreement  {report['top1_agreement']:.2%}",
        f"  mean KL          {report['mean_kl']:.5f} nats/token",
        f"  weight SQNR      mean {_db(sqnr['mean'])}, min {_db(sqnr['min'])} over {sqnr['linears']} Linears",
    ]
    for rank, entry in enumerate(sqnr["worst"]):
        label = "  worst Linears    " if rank == 0 else " " * 19
        lines.append(f"{label}{entry['name']:<{width}}  {_db(entry['sqnr_db'])}")
    return "\n".join(lines)


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f} dB"
