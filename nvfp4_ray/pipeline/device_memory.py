"""How many layers a worker's device holds at once: chosen from its memory before any load.

A calibration worker's device holds, in bytes:

  hidden    2 x S_w x T x H x 2      its samples' hidden states (S_w samples of T tokens,
                                     hidden size H, bf16), and one snapshot's copy being written
  layers    (1 + ahead) x W          the layer computing and the ones loaded ahead of it
                                     (W: the largest layer as the device holds it: its source
                                     bytes, plus a bf16 copy of every FP8 weight)
  writes    queued x P               quantized layers waiting for the write threads (P: the
                                     largest layer's output: 0.5625 bytes a weight for NVFP4)
  work      2 x heads x T^2 x 4      one sample's eager attention scores, twice (SDPA, which GPTQ's
                                     default mode runs, writes none: then an over-estimate)
            + 4 x T x I x 2          its MLP (or one expert's) intermediates (I: the widest)
            + 12 x N                 the quantizer's float32 copies of the largest Linear (N weights)
            + GPTQ's Hessians        with --algorithm gptq: calibration/hessians.device_bytes

With ``ahead`` <= 2 and ``queued`` <= 4 (what layers of an 8B model use), both shrink,
``ahead`` first, until the sum fits the budget. A layer that still does not fit at
``ahead`` 0 and ``queued`` 1 is loaded in parts when it has routed experts
(calibration/expert_groups.py): its tensors outside the experts (W_0), then G groups of
experts, G = 2, 4, 8, ... up to one expert per group. Then

  layers    (1 + ahead) x (W_0 + W_G)    W_G: the largest group; as many groups wait on
                                         the device as layers do (``groups_held``)
  capture   2 x S_w x T x H x 2          each batch's expert input and its routed sum
            + S_w x T x E x 4            and its routing over the E experts

and a layer that does not fit with one expert per group is refused before any work.
DeepSeek-V3 (W = 22 GB of bf16 experts, P = 6.2 GB, 256 x 1024 tokens: 7.5 GB of hidden
states) needs about 42 GB whole at ahead 0 and queued 1: one 80 GB GPU holds it with
ahead 1; a 32 GB card holds it in 4 expert groups (tests/test_device_memory.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvfp4_ray.calibration.expert_groups import capture_bytes, expert_of, expert_ranges, part_of
from nvfp4_ray.errors import InputError
from nvfp4_ray.io.tensors import torch_dtype

MAX_AHEAD = 2  # calibrated layers on a worker's device beyond the one it computes
MAX_WRITES_QUEUED = 4  # quantized layers waiting for the write threads (worker_loads.WRITES_QUEUED)
_PACKED_BYTES = {"nvfp4-pack-quantized": 0.5625, "float-quantized": 1.0}  # per weight, scales included


@dataclass(frozen=True)
class DevicePlan:
    ahead: int
    writes_queued: int
    budget_bytes: int | None
    need_bytes: int  # the estimate at these settings
    expert_groups: int = 1  # groups each MoE layer's experts are loaded in (1: whole layers)

    def record(self) -> dict:
        gib = lambda b: None if b is None else round(b / 2**30, 3)  # noqa: E731
        return {"layers_ahead": self.ahead, "writes_queued": self.writes_queued, "expert_groups": self.expert_groups,
                "budget_gib": gib(self.budget_bytes), "estimate_gib": gib(self.need_bytes)}  # fmt: skip


def num_experts(unit) -> int:
    """How many routed experts a layer unit holds (0: none)."""
    experts = [expert_of(tensor.name) for tensor in unit.tensors]
    return 1 + max((expert for expert in experts if expert is not None), default=-1)


def unit_parts(unit, groups: int) -> list[list]:
    """The unit's tensors in parts: those outside its routed experts, then ``groups`` groups
    of experts (calibration/expert_groups.py); one part for a layer without experts."""
    count = num_experts(unit)
    if groups == 1 or not count:
        return [list(unit.tensors)]
    ranges = expert_ranges(count, groups)
    parts = [[] for _ in range(1 + len(ranges))]
    for tensor in unit.tensors:
        parts[part_of(tensor.name, ranges)].append(tensor)
    return parts


def _held(entry) -> int:
    """Device bytes of a source tensor: an FP8 weight is dequantized beside its bytes."""
    return entry.nbytes + (math.prod(entry.shape) * 2 if entry.dtype.startswith("F8") else 0)


def layer_sizes(unit) -> tuple[int, int, int]:
    """(W, P, N) of one layer unit: device bytes, output bytes, weights of its largest Linear."""
    held = packed = 0
    quantized = {f"{linear.checkpoint}.weight": linear for linear in unit.spec.linears}
    for tensor in unit.tensors:
        entry = tensor.entry
        numel = math.prod(entry.shape)
        held += _held(entry)
        linear = quantized.get(tensor.name)
        if linear is None:
            packed += entry.nbytes
        else:
            packed += int(numel * _PACKED_BYTES.get(linear.scheme.format.value, torch_dtype(entry.dtype).itemsize))
    largest = max((linear.in_features * linear.out_features for linear in unit.spec.linears), default=0)
    return held, packed, largest


def plan_device(units: list, shares: list[list], text_config: dict, budget_bytes: int | None, extra: int = 0,
                expert_groups: bool = True) -> DevicePlan:  # fmt: skip
    """The largest ``ahead`` and ``writes_queued`` whose estimate fits ``budget_bytes``
    (None: no budget, the defaults), with MoE layers whole or else in as few expert groups
    as fit (``expert_groups`` False: whole layers only). ``shares``: each calibration
    worker's batches; ``extra``: what the algorithm adds (GPTQ's Hessians: hessians.py)."""
    need, parts = estimate(units, shares, text_config, extra)
    if budget_bytes is None:
        return DevicePlan(MAX_AHEAD, MAX_WRITES_QUEUED, None, need(MAX_AHEAD, MAX_WRITES_QUEUED))
    experts = max(num_experts(unit) for unit in units) if expert_groups else 0
    groups = 1
    while True:
        for ahead, queued in ((2, 4), (1, 4), (1, 2), (0, 2), (0, 1)):
            if need(ahead, queued) <= budget_bytes:
                return DevicePlan(ahead, queued, budget_bytes, need(ahead, queued), groups)
        if groups >= experts:
            break
        groups = min(2 * groups, experts)
        need, parts = estimate(units, shares, text_config, extra, groups)
    hessians = f", GPTQ's Hessians {parts['algorithm'] / 2**30:.2f} GiB" if parts["algorithm"] else ""
    what = f"one layer at a time, its experts {groups} groups at a time" if groups > 1 else "one layer at a time"
    raise InputError(
        f"a worker needs about {need(0, 1) / 2**30:.1f} GiB of device memory for {what} "
        f"(largest {'part of a layer' if groups > 1 else 'layer'} {parts['layer'] / 2**30:.2f} GiB, its output {parts['output'] / 2**30:.2f} GiB, hidden "
        f"states {parts['hidden'] / 2**30:.2f} GiB{hessians}), over the {budget_bytes / 2**30:.1f} GiB budget: use more GPUs "
        "(fewer samples each), fewer calibration tokens, or a larger --device-memory-gib"
    )


def estimate(units: list, shares: list[list], text_config: dict, extra: int = 0, groups: int = 1):
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
    if groups > 1:  # the whole layers' sizes, but the MoE layers': a part outside the experts and the largest group
        split = [[sum(_held(t.entry) for t in part) for part in unit_parts(unit, groups)] for unit in units]
        held = max(sizes[i][0] if len(parts) == 1 else parts[0] + max(parts[1:]) for i, parts in enumerate(split))
        fixed += capture_bytes(tokens, hidden, max(num_experts(unit) for unit in units))

    def need(ahead: int, queued: int) -> int:
        return fixed + (1 + ahead) * held + queued * packed

    return need, {"layer": held, "output": packed, "hidden": 2 * tokens * hidden * 2, "fixed": fixed, "algorithm": extra}
