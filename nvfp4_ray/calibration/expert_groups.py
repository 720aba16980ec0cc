"""MoE layers too large for a device, calibrated and quantized an expert group at a time.

A DeepSeek-V3 layer is 22 GB of bf16 experts: with its calibration activations it does not
fit a 32 GB card whole. When the device plan (pipeline/device_memory.py) says so, such a
layer reaches a worker in parts: part 0 the tensors outside its routed experts (attention,
router, shared experts, norms), then each group of experts, contiguous and in expert
order. The layer then runs three times over the worker's batches, eagerly:

  1. the layer, its experts module replaced by a stand-in that keeps each batch's expert
     input and routing and returns zeros: attention and shared experts record their input
     amax here (none of them sees the routed experts' output);
  2. each group of experts, loaded alone, on every captured token: their input amax, and
     their routed output added to the batch's sum exactly as LinearExperts.forward adds it
     (the same products, summed in the same expert order: the same bits as whole layers);
  3. the layer again, the stand-in returning each batch's sum: the hidden states advance.

The owner quantizes the parts as they arrive (a fused group never spans two parts: an
expert's gate/up are in one group, q/k/v in part 0) and writes the unit once all are done.

Device memory beside the parts: the captured inputs and their sums, 2 x T x H x 2 bytes
for T tokens of hidden size H, and the routing, T x E x 4 (``capture_bytes``).
"""

from __future__ import annotations

import math
import re

import torch

from nvfp4_ray.experts import LinearExperts

EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_of(name: str) -> int | None:
    """The routed expert a tensor (checkpoint or layer-local name) belongs to, if any."""
    match = EXPERT.search(f".{name}")
    return int(match.group(1)) if match else None


def expert_ranges(num_experts: int, groups: int) -> list[range]:
    """``groups`` contiguous ranges of experts, as equal as possible, in expert order."""
    size = math.ceil(num_experts / groups)
    return [range(first, min(first + size, num_experts)) for first in range(0, num_experts, size)]


def part_of(name: str, ranges: list[range]) -> int:
    """0 for a tensor outside the routed experts, else 1 + the group holding its expert."""
    expert = expert_of(name)
    return 0 if expert is None else 1 + next(g for g, r in enumerate(ranges) if expert in r)


def capture_bytes(tokens: int, hidden: int, num_experts: int) -> int:
    return 2 * tokens * hidden * 2 + tokens * num_experts * 4


def run_layer_in_groups(runner, index: int, take, release, ranges: list[range], record: list[str], attention: list[str]) -> dict:
    """Layer ``index`` through ``runner`` (a DecoderRunner) in expert groups; the amax of
    what ``record`` and ``attention`` name. ``take(part)``: the part's tensors on the
    device (names inside the layer); ``release(part)``: the worker may drop them."""
    layer = runner.layers[index]
    path = next(name for name, module in layer.named_modules() if isinstance(module, LinearExperts))
    parent_name, _, attr = path.rpartition(".")
    parent = layer.get_submodule(parent_name)
    experts = getattr(parent, attr)
    prefix = f"{path}."
    capture = _Capture(experts)
    setattr(parent, attr, capture)
    try:
        base = take(0)
        outside = [name for name in record if not name.startswith(prefix)]
        amax = runner.run_layer(index, base, outside, attention, advance=False, eager=True)
        sums = [torch.zeros_like(hidden) for hidden, _ in capture.inputs]
        for part, indices in enumerate(ranges, start=1):
            weights = take(part)
            inside = [name for name in record if name.startswith(prefix) and expert_of(name) in indices]
            runner.layers[index] = _GroupPass(path, experts, indices, capture.inputs, sums)
            try:
                amax.update(runner.run_layer(index, weights, inside, [], advance=False, eager=True))
            finally:
                runner.layers[index] = layer
            del weights
            release(part)
        capture.inputs.clear()
        setattr(parent, attr, _Replay(sums))
        runner.run_layer(index, base, [], [], advance=True, eager=True)
    finally:
        setattr(parent, attr, experts)
    release(0)
    return amax


class _Capture(torch.nn.Module):
    """Stands in for the experts module in pass 1: keeps each batch's input and routing."""

    def __init__(self, experts: LinearExperts):
        super().__init__()
        self._experts = [experts]  # not a submodule: its parameters are not the layer's now
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.inputs.append((hidden_states, self._experts[0].routing(top_k_index, top_k_weights)))
        return torch.zeros_like(hidden_states)


class _GroupPass(torch.nn.Module):
    """Stands in for the decoder layer in pass 2: its modules are one group's experts under
    their names in the layer (where the loaded weights and the amax hooks find them); each
    call runs them on the next batch's captured tokens."""

    def __init__(self, path: str, experts: LinearExperts, indices: range, inputs: list, sums: list):
        super().__init__()
        holder: torch.nn.Module = self
        *parents, last = path.split(".")
        for name in parents:
            holder.add_module(name, torch.nn.Module())
            holder = getattr(holder, name)
        holder.add_module(last, torch.nn.ModuleDict({str(i): experts[i] for i in indices}))
        self._experts, self.indices, self.inputs, self.sums = [experts], indices, inputs, sums
        self.calls = 0

    def forward(self, hidden_states, **kwargs):
        captured, routing = self.inputs[self.calls]
        self._experts[0].add_experts(self.sums[self.calls], captured, routing, self.indices)
        self.calls += 1
        return hidden_states


class _Replay(torch.nn.Module):
    """Stands in for the experts module in pass 3: each batch's summed routed output."""

    def __init__(self, sums: list):
        super().__init__()
        self.sums, self.calls = sums, 0

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = self.sums[self.calls]
        self.sums[self.calls] = None  # the layer's output holds it from here
        self.calls += 1
        return out
