"""GPTQ Hessians of one decoder layer, as partial sums over fixed blocks of samples added
in a fixed binary tree.

The samples are cut into at most 16 blocks of consecutive batches (a function of the
samples alone, never of the workers), and each worker gets a contiguous run of blocks. A
worker sums each block's forwards in batch order, as llm-compressor sums all of them, and
adds finished blocks pairwise as soon as both halves of an aligned node of the tree are
done (blocks 0+1, then 2+3, then (0+1)+(2+3), ...), so it keeps at most log2(16) + 1 sums
of a Linear input and ships its largest whole subtrees, one to four. The owner of a
Linear adds the subtrees of every worker in the same tree. So the Hessian, and every byte
after it, is the same on any number of workers and nodes. The default mode's forwards add
exact products of the bf16 inputs (gptq.add_products: on a GPU, its bf16 tensor cores,
several times the fp32 rate), two consecutive forwards of a block in one product
(FORWARDS_PER_PRODUCT: docs/gptq.md#speed). ``--exact``: a single block over the samples in
llm-compressor's order, each forward added in its arithmetic: llm-compressor's sum itself.

Fused siblings (q/k/v, gate/up) receive the same input, hence one Hessian per group,
taken from its first Linear; and so do the gate/up of every routed expert of a layer:
calibration runs every expert on every token (experts.LinearExperts), so their Hessians
are one sum of the same products, which llm-compressor computes once per expert (the same
bits, E times: ``hessian_inputs``).

Memory, per decoder layer (in: a group's in_features; S = sum over the layer's distinct inputs of
in^2 x 4 bytes; Llama-3-8B: 3 x 4096^2 x 4 + 14336^2 x 4 = 1.0 GB; a 128B layer 5.1 GB),
in device_bytes (the device memory plan adds it):
  device of a calibration worker   (1 + log2 of its blocks, at most 5) x S: the tree's
                                   pending sums and the block being summed; 1 x S with --exact;
                                   and the forwards held for one product, (2 x 2 - 1) x T x
                                   sum of in x 2 for T tokens a forward (Llama-3-8B, T 1024:
                                   0.16 GB); none with --exact
  device of an owner, per solve    4 x in^2 x 4 (the sum, a subtree arriving, the working
                                   copy, its inverse factor in place; or the sum, the
                                   normalized copy and two reordered ones) + the group's
                                   weights: out x in x 10 while solving (the float32
                                   working copy, its reordered or updated copy, the stacked
                                   bf16 input), or out x in x 2 + 12 bytes a weight of its
                                   largest Linear while packing (nvfp4.encode's float32
                                   temporaries), whichever is more
  reduction traffic                the subtrees of the workers that do not own the group,
                                   through Ray's object store: at most 4 x in^2 x 4 per
                                   worker and input, to each owner of the input's groups
                                   (the routed experts' gate/up: up to W - 1 owners); none
                                   on one worker (the owner's own stay on its device)
"""

from __future__ import annotations

import math

import torch

from nvfp4_ray.calibration.expert_groups import EXPERT
from nvfp4_ray.experts import MOE_MODEL_TYPES
from nvfp4_ray.formats import gptq

# The default mode's forwards per product (consecutive, of one block): each product reads
# and writes the whole sum once
FORWARDS_PER_PRODUCT = 2


# the checkpoint names of a routed expert's gate and up projections, in every MoE family
EXPERT_GATE_UP = {name for family in MOE_MODEL_TYPES.values() for name in family.projections[:2]}


def hessian_inputs(groups: list[list]) -> list[str]:
    """For each fused group (of LinearSpecs), the name its Hessian is summed under: its
    first Linear's, but for a routed expert's gate/up the first such expert's of its
    experts module (all of them take the same input: the module docstring)."""
    first: dict[str, str] = {}  # experts module -> the first gate/up Linear of its experts
    names = []
    for group in groups:
        local = group[0].local
        expert = EXPERT.search(f".{local}")
        shared = expert is not None and local.rsplit(".", 1)[-1] in EXPERT_GATE_UP
        names.append(first.setdefault(f".{local}"[: expert.start()], local) if shared else local)
    return names


def distinct_inputs(groups: list[list]) -> dict[str, int]:
    """A layer's distinct Hessian inputs (``hessian_inputs``' names) -> their in_features."""
    return {name: group[0].in_features for name, group in zip(hessian_inputs(groups), groups)}


def reference_order(samples: list[list[int]]) -> list[int]:
    """The order llm-compressor 0.14 runs samples in when not shuffling them (its
    LengthAwareSampler: longest first, ties as torch's argsort leaves them): its Hessian is
    a sum in this order."""
    return torch.argsort(torch.tensor([len(sample) for sample in samples]), descending=True).tolist()


def device_bytes(layer_groups: list[list], blocks_per_worker: int, longest: int = 0) -> int:
    """A calibration worker's device bytes for GPTQ beside the layer and its activations,
    at the largest layer (``layer_groups``: each layer's fused groups of LinearSpecs): its
    pending sums (1 + log2 of its blocks, at most 5) over the layer's distinct inputs, the
    default mode's held forwards (``longest``: the tokens of its longest forward, 0 with
    --exact; per distinct input FORWARDS_PER_PRODUCT - 1 held copies and their
    concatenation, (2 P - 1) x tokens x in x 2 bytes), and an owner's solve of the largest
    group (four copies of its Hessian at most, and what its weights take while solved or
    packed: ``solve_bytes``)."""
    pending = min(1 + math.ceil(math.log2(max(blocks_per_worker, 1))), 5)
    held = (2 * FORWARDS_PER_PRODUCT - 1) * longest * 2 if FORWARDS_PER_PRODUCT > 1 else 0
    need = 0
    for groups in filter(None, layer_groups):
        distinct = distinct_inputs(groups).values()
        sums = sum(features**2 * 4 for features in distinct)
        inputs = sum(distinct)
        solve = max(solve_bytes(group) for group in groups)
        need = max(need, pending * sums + held * inputs + solve)
    return need


def solve_bytes(group: list) -> int:
    """An owner's device bytes for one fused group's solve (formats/gptq.py): four copies
    of its Hessian at most, and the group's weights, ten bytes each while solved (float32
    working copy, its reordered or updated copy, the stacked bf16 input) or two each and
    twelve for each of its largest Linear's while packed (nvfp4.encode's temporaries)."""
    columns = group[0].in_features
    rows, largest = sum(linear.out_features for linear in group), max(linear.out_features for linear in group)
    return 4 * columns**2 * 4 + max(10 * rows, 2 * rows + 12 * largest) * columns


def blocks_of(batches: list, size: int) -> list[list]:
    """Consecutive batches (by index), ``size`` at a time."""
    ordered = sorted(batches, key=lambda batch: batch.index)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def worker_runs(batches: list, size: int, workers: int) -> list[list]:
    """A contiguous run of whole blocks (``size`` batches each) to each of ``workers``, so
    that each adds whole subtrees of the tree, as even in blocks as can be: its batches."""
    blocks = blocks_of(batches, size)
    runs = [blocks[len(blocks) * w // workers : len(blocks) * (w + 1) // workers] for w in range(workers)]
    return [[batch for block in run for batch in block] for run in runs]


class HessianBlocks:
    def __init__(self, inputs: dict[str, int], block_size: int, device: torch.device, exact: bool = False):
        """``inputs``: each distinct input's name (``hessian_inputs``: a Linear inside the
        layer) -> its in_features. ``exact``: each forward added as llm-compressor adds it; else with
        exact products (gptq.add_products: on a GPU, the bf16 tensor cores)."""
        self.inputs, self.size, self.device = inputs, block_size, device
        self.add_forward = gptq.add_to_hessian if exact else gptq.add_products
        self.per_product = 1 if exact else FORWARDS_PER_PRODUCT
        self.current: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> block, hessian, count
        self.held: dict[str, list[torch.Tensor]] = {name: [] for name in inputs}  # forwards of the next product
        # name -> the finished aligned subtrees, oldest first: (first block, blocks, hessian, count)
        self.subtrees: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {name: [] for name in inputs}

    def hooks(self) -> dict:
        """For DecoderRunner.run_layer(inputs_to=...)."""
        return {name: lambda batch, x, name=name: self.add(name, batch, x) for name in self.inputs}

    def add(self, name: str, batch: int, x: torch.Tensor) -> None:
        block = batch // self.size
        current = self.current.get(name)
        if current is None or current[0] != block:
            if current is not None:
                self._finish(name)
            current = self.current[name] = (block, *gptq.new_hessian(self.inputs[name], self.device))
        if self.per_product == 1:
            self.add_forward(current[1], current[2], x)
            return
        held = self.held[name]
        held.append(x.clone())  # the layer's forward goes on: a module after may change its input
        if len(held) == self.per_product:
            self._add_held(name)

    def _add_held(self, name: str) -> None:
        held, (_, hessian, count) = self.held[name], self.current[name]
        if held:
            self.add_forward(hessian, count, list(held))
            held.clear()

    def _finish(self, name: str) -> None:
        self._add_held(name)
        block, hessian, count = self.current.pop(name)
        stack = self.subtrees[name]
        stack.append((block, 1, hessian, count))
        # two neighbours of one size whose left one starts a node of twice the size: that node
        while len(stack) > 1 and stack[-2][1] == stack[-1][1] and stack[-2][0] % (2 * stack[-2][1]) == 0 \
                and stack[-2][0] + stack[-2][1] == stack[-1][0]:  # fmt: skip
            (first, size, left, left_count), (_, _, right, right_count) = stack[-2], stack.pop()
            left += right
            left_count += right_count
            stack[-1] = (first, 2 * size, left, left_count)

    def partials(self) -> dict[str, list]:
        """Every input's finished subtrees (first block, blocks, hessian, count), on the
        device, each symmetric (add_products sums the lower triangle)."""
        for name in list(self.current):
            self._finish(name)
        if self.add_forward is gptq.add_products:
            for _, _, hessian, _ in (subtree for subtrees in self.subtrees.values() for subtree in subtrees):
                gptq.fill_upper(hessian)
        return self.subtrees


def reduce_partials(subtrees: list[tuple[int, int, torch.Tensor, torch.Tensor]], device: torch.device):
    """The Hessian and count over all blocks from the workers' subtrees, added in the tree.
    Another worker's Hessian comes as a numpy array in the object store (read-only): it
    is copied once, onto ``device``."""
    found = {(first, size): (hessian, count) for first, size, hessian, count in subtrees}
    blocks = max(first + size for first, size, _, _ in subtrees)

    def node(first: int, size: int):
        if (first, size) in found:
            hessian, count = found.pop((first, size))
            on_device = hessian.to(device) if isinstance(hessian, torch.Tensor) else torch.tensor(hessian, device=device)
            return on_device, count.to(device)
        if first >= blocks or size == 1:
            return None
        left, right = node(first, size // 2), node(first + size // 2, size // 2)
        if right is None:
            return left
        left[0].add_(right[0])
        left[1].add_(right[1])
        return left

    total = node(0, 1 << (blocks - 1).bit_length())
    assert not found, f"subtrees outside the tree: {sorted(found)}"
    return total
