"""Output quality of QUANT against BASE on held-out token windows.

Both models see the same windows, one window per forward (no padding, no batching, so
nothing but the weights and the activation quantization differs). At every position
that predicts a next token:

  perplexity       exp(mean negative log-likelihood of the actual next token), per model
  top-1 agreement  share of positions where both models rank the same token first
  mean KL          KL(BASE || QUANT) of the next-token distributions, nats per position

Logits are widened to float64 before the softmax and every sum is a float64 sum over
positions taken in order, so the same models and windows give the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import math

import torch


def load_model(folder: str, dtype: torch.dtype, device: str):
    """A transformers model of a local checkpoint. NVFP4 checkpoints load through
    compressed-tensors, which dequantizes the weights and fake-quantizes every quantized
    Linear's input to FP4 the way the W4A4 kernels do (emulation, on any device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from nvfp4_ray.experts import loading_linearized

    config = AutoConfig.from_pretrained(folder)
    loader = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    # transformers and compressed-tensors draw progress bars on stderr while loading, and
    # compressed-tensors decompresses the weights in the first forward; both happen here,
    # silently (the job reports its own progress; logging warnings still go through).
    # MoE: one Linear per expert, as NVFP4 checkpoints store them (a bf16 BASE loads so too)
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad(), loading_linearized(config.model_type):
        model = loader.from_pretrained(folder, dtype=dtype).to(device).eval()
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    return model


def compare(base_model, quant_model, windows: list[list[int]], device: str, on_window=None) -> dict:
    nll_base = nll_quant = kl = 0.0
    agree = positions = 0
    with torch.inference_mode():
        for ids in windows:
            inputs = torch.tensor([ids], device=device)
            base_logp = _next_token_logprobs(base_model, inputs)
            quant_logp = _next_token_logprobs(quant_model, inputs)
            targets = inputs[0, 1:, None]
            nll_base -= float(base_logp.gather(1, targets).sum())
            nll_quant -= float(quant_logp.gather(1, targets).sum())
            kl += float((base_logp.exp() * (base_logp - quant_logp)).sum())
            agree += int((base_logp.argmax(-1) == quant_logp.argmax(-1)).sum())
            positions += len(ids) - 1
            if on_window is not None:
                on_window()
    return {
        "perplexity": {"base": math.exp(nll_base / positions), "quant": math.exp(nll_quant / positions)},
        "top1_agreement": agree / positions,
        "mean_kl": kl / positions,
    }


def _next_token_logprobs(model, inputs: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.to(torch.float64), dim=-1)
