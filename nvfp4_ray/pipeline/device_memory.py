"""How many layers a worker's device holds at once: chosen from its memory before any load.

A calibration worker's device holds, in bytes:

  hidden    2 x S_w x T x H x 2      its samples' hidden states (S_w samples of T tokens,
                                     hidden size H, bf16), and one snapshot's copy being written
  layers    (1 + ahead) x W          the layer computing and the ones loaded ahead of it
                                     (W: the largest layer as the device holds it: its source
                                     bytes, plus a bf16 copy of every FP8 weight)
  writes    queued x P               quantized layers waiting for the write threads (P: the
                                     largest layer's output: 0.5625 bytes a weight for NVFP4)
  work      2 x heads x T^2 x 4      one sample's eager attention scores, twice
            + 4 x T x I x 2          its MLP (or one expert's) intermediates (I: the widest)
            + 12 x N                 the quantizer's float32 copies of the largest Linear (N weights)
            + GPTQ's Hessians        with --algorithm gptq: calibration/hessians.device_bytes

With ``ahead`` <= 2 and ``queued`` <= 4 (what layers of an 8B model use), both shrink,
``ahead`` first, until the sum fits the budget; at ``ahead`` 0 and ``queued`` 1 a layer
that still does not fit is refused before any work. DeepSeek-V3 (W = 22 GB of bf16
experts, P = 6.2 GB, 256 x 1024 tokens: 7.5 GB of hidden states) needs about 42 GB at
ahead 0 and queued 1: one 80 GB GPU holds it with ahead 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.tensors import torch_dtype

MAX_AHEAD = 2  # calibrated layers on a worker's device beyond the one it computes
MAX_WRITES_QUEUED = 4  # quantized layers waiting for the write threads (workers.WRITES_QUEUED)
_PACKED_BYTES = {"nvfp4-pack-quantized": 0.5625, "float-quantized": 1.0}  # per weight, scales included


@dataclass(frozen=True)
class DevicePlan:
    ahead: int
    writes_queued: int
    budget_bytes: int | None
    need_bytes: int  # the estimate at these settings

    def record(self) -> dict:
        gib = lambda b: None if b is None else round(b / 2**30, 3)  # noqa: E731
        return {"layers_ahead": self.ahead, "writes_queued": self.writes_queued,
                "budget_gib": gib(self.budget_bytes), "estimate_gib": gib(self.need_bytes)}  # fmt: skip


def layer_sizes(unit) -> tuple[int, int, int]:
    """(W, P, N) of one layer unit: device bytes, output bytes, weights of its largest Linear."""
    held = packed = 0
    quantized = {f"{linear.checkpoint}.weight": linear for linear in unit.spec.linears}
    for tensor in unit.tensors:
        entry = tensor.entry
        numel = math.prod(entry.shape)
        held += entry.nbytes + (numel * 2 if entry.dtype.startswith("F8") else 0)
        linear = quantized.get(tensor.name)
        if linear is None:
            packed += entry.nbytes
        else:
            packed += int(numel * _PACKED_BYTES.get(linear.scheme.format.value, torch_dtype(entry.dtype).itemsize))
    largest = max((linear.in_features * linear.out_features for linear in unit.spec.linears), default=0)
    return held, packed, largest


def plan_device(units: list, shares: list[list], text_config: dict, budget_bytes: int | None, extra: int = 0) -> DevicePlan:
    """The largest ``ahead`` and ``writes_queued`` whose estimate fits ``budget_bytes``
    (None: no budget, the defaults). ``shares``: each calibration worker's batches;
    ``extra``: what the algorithm adds (GPTQ's Hessians: calibration/hessians.py)."""
    need, parts = estimate(units, shares, text_config, extra)
    if budget_bytes is None:
        return DevicePlan(MAX_AHEAD, MAX_WRITES_QUEUED, None, need(MAX_AHEAD, MAX_WRITES_QUEUED))
    for ahead, queued in ((2, 4), (1, 4), (1, 2), (0, 2), (0, 1)):
        if need(ahead, queued) <= budget_bytes:
            return DevicePlan(ahead, queued, budget_bytes, need(ahead, queued))
    hessians = f", GPTQ's Hessians {parts['algorithm'] / 2**30:.2f} GiB" if parts["algorithm"] else ""
    raise InputError(
        f"a worker needs about {need(0, 1) / 2**30:.1f} GiB of device memory for one layer at a time "
        f"(largest layer {parts['layer'] / 2**30:.2f} GiB, its output {parts['output'] / 2**30:.2f} GiB, hidden "
        f"states {parts['hidden'] / 2**30:.2f} GiB{hessians}), over the {budget_bytes / 2**30:.1f} GiB budget: use more GPUs "
        "(fewer samples each), fewer calibration tokens, or a larger --device-memory-gib"
    )


def estimate(units: list, shares: list[list], text_config: dict, extra: int = 0):
    """``need(ahead, queued)``: the formula above in bytes, and its parts by name."""
    sizes = [layer_sizes(unit) for unit in units]
    held = max(size[0] for size in sizes)
    packed = max(size[1] for size in sizes)
    largest = max(size[2] for size in sizes)
    hidden = int(text_config.get("hidden_size", 0))
    tokens = max((sum(b.input_ids.numel() for b in share) for share in shares), default=0)
    length = max((b.input_ids.shape[-1] for share in shares for b in share), default=0)
    heads = int(text_config.get("num_attention_heads", 0))
    width = max(int(text_config.get(k) or 0) for k in ("intermediate_size", "moe_intermediate_size", "hidden_size"))
    fixed = 2 * tokens * hidden * 2 + 2 * heads * length**2 * 4 + 4 * length * width * 2 + 12 * largest + extra

    def need(ahead: int, queued: int) -> int:
        return fixed + (1 + ahead) * held + queued * packed

    return need, {"layer": held, "output": packed, "hidden": 2 * tokens * hidden * 2, "fixed": fixed, "algorithm": extra}
