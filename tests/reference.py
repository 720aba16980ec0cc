"""The reference: llm-compressor 0.14 ``oneshot`` + ``save_pretrained(save_compressed=True)``,
run on the same checkpoint and the same calibration rows as nvfp4-ray."""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open


def run_llmcompressor(
    source: str, rows: list[list[int]] | None, ignore: list[str], out: str, scheme: str = "NVFP4", recipe: str | None = None,
    shuffle: bool = True,
) -> str:
    """``recipe``: an llm-compressor recipe (YAML text or a modifier) instead of scheme/ignore.
    ``rows`` None: no calibration data (weight-only schemes). ``shuffle`` False: samples
    in file order (GPTQ's Hessian sums depend on it)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    loader = AutoModelForImageTextToText if config.model_type == "mistral3" else AutoModelForCausalLM
    model = loader.from_pretrained(source, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source)
    recipe = recipe or QuantizationModifier(targets="Linear", scheme=scheme, ignore=list(ignore))
    _metric_log_level()
    if rows is None:
        oneshot(model=model, processor=tokenizer, recipe=recipe)
    else:
        dataset = Dataset.from_list([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows])
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe,
            pipeline="sequential",
            num_calibration_samples=len(rows),
            max_seq_length=max(len(r) for r in rows),
            shuffle_calibration_samples=shuffle,
        )
    model.save_pretrained(out, save_compressed=True)
    return out


def _metric_log_level() -> None:
    """GPTQModifier logs each solve at llm-compressor's METRIC level, which exists only where
    its logging is configured (the tests disable it: LLM_COMPRESSOR_LOG_DISABLED)."""
    from loguru import logger

    try:
        logger.level("METRIC")
    except ValueError:
        logger.level("METRIC", no=38)


def load_tensors(folder: str) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of a checkpoint folder as (dtype, shape, raw bytes)."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index_path))["weight_map"].values())) if os.path.exists(index_path) else None
    paths = [os.path.join(folder, f) for f in files] if files else glob.glob(os.path.join(folder, "*.safetensors"))
    tensors = {}
    for path in paths:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).contiguous()
                raw = tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
                tensors[name] = (str(tensor.dtype), tuple(tensor.shape), raw)
    return tensors


def bf16_steps(a: float, b: float) -> int:
    """How many bf16 values apart two positive bf16-representable floats are."""
    to_bits = lambda v: int(torch.tensor([v], dtype=torch.bfloat16).view(torch.int16)[0])  # noqa: E731
    return abs(to_bits(a) - to_bits(b))


def full_forward_input_scales(source: str, rows: list[list[int]], ignore_prefixes=("lm_head",)) -> dict[str, float]:
    """Ground truth: input_global_scale of every decoder Linear from a plain transformers
    forward of the whole model (eager attention, causal mask, one sample at a time).
    Keys are the checkpoint tensor prefixes."""
    from compressed_tensors.quantization.utils import generate_gparam
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.linearize import linearize_moe

    config = AutoConfig.from_pretrained(source)
    loader = AutoModelForImageTextToText if config.model_type == "mistral3" else AutoModelForCausalLM
    model = loader.from_pretrained(source, dtype=torch.bfloat16, attn_implementation="eager").eval()
    linearize_moe(model)  # MoE: one Linear per expert, each run on every token (below)
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            value = args[0].abs().amax()
            amax[name] = value if name not in amax else torch.maximum(amax[name], value)

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and "vision" not in name:
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad(), moe_calibration_context():
        for row in rows:
            ids = torch.tensor([row])
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    # module names -> checkpoint names (Mistral3 checkpoints use the legacy layout)
    rename = lambda n: n.replace("model.language_model.", "language_model.model.")  # noqa: E731
    return {rename(n): float(generate_gparam(-a.reshape(1), a.reshape(1))) for n, a in amax.items()}
