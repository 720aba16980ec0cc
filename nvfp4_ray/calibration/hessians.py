"""GPTQ Hessians of one decoder layer, one partial sum per block of samples.

The samples are cut into fixed blocks of consecutive batches (a function of the samples
alone, never of the workers), and every block lies on one worker. A worker sums each
block's forwards in batch order, as llm-compressor sums all of them; the owner of a
Linear adds the blocks' partials in block order, whichever worker computed them. So the
Hessian, and every byte after it, is the same on any number of workers and nodes; with
a single block over the samples in llm-compressor's order (``--exact``) it is
llm-compressor's sum itself.

Fused siblings (q/k/v, gate/up) receive the same input, hence one Hessian per group,
taken from its first Linear.

Memory, per decoder layer (in: a group's in_features; 4 bytes per fp32 entry):
  device of a calibration worker   sum over the layer's groups of in^2 x 4 (the block
                                   being summed), beside the layer and its activations;
                                   Llama-3-8B: 3 x 4096^2 x 4 + 14336^2 x 4 = 1.0 GB
  host of a calibration worker     its blocks x the same sum (finished partials waiting)
  device of an owner, per solve    3 x in^2 x 4 (the sum, the working copy, its inverse
                                   factor in place) + out x in x 4 (working weight)
  reduction traffic                every block's partial of a group to its owner, through
                                   Ray's object store: blocks x in^2 x 4 per group (a
                                   128B model's down_proj: 28672^2 x 4 = 3.3 GB per block)
"""

from __future__ import annotations

import math

import torch

from nvfp4_ray.formats import gptq

# Blocks of samples in the default mode: the most calibration workers GPTQ uses, and the
# partials a single worker keeps in host memory (per distinct Linear input of a layer)
HESSIAN_BLOCKS = 16


def reference_order(samples: list[list[int]]) -> list[int]:
    """The order llm-compressor 0.14 runs samples in when not shuffling them (its
    LengthAwareSampler: longest first, ties as torch's argsort leaves them): its Hessian is
    a sum in this order."""
    return torch.argsort(torch.tensor([len(sample) for sample in samples]), descending=True).tolist()


def block_size(batches: int, exact: bool) -> int:
    """Batches per block: all of them with ``exact`` (llm-compressor's one running sum)."""
    return batches if exact else math.ceil(batches / min(HESSIAN_BLOCKS, batches))


def blocks_of(batches: list, size: int) -> list[list]:
    """Consecutive batches (by index), ``size`` at a time."""
    ordered = sorted(batches, key=lambda batch: batch.index)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class HessianBlocks:
    def __init__(self, inputs: dict[str, int], block_size: int, device: torch.device):
        """``inputs``: the first Linear of each fused group (name inside the layer) -> its
        in_features."""
        self.inputs, self.size, self.device = inputs, block_size, device
        self.current: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> block, hessian, count
        self.finished: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {name: [] for name in inputs}

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
        gptq.add_to_hessian(current[1], current[2], x)

    def _finish(self, name: str) -> None:
        block, hessian, count = self.current.pop(name)
        self.finished[name].append((block, hessian.cpu(), count.cpu()))

    def partials(self) -> dict[str, list]:
        """Every block's (block index, hessian, count), on the host, by input name."""
        for name in list(self.current):
            self._finish(name)
        return self.finished


def reduce_partials(partials: list[tuple[int, torch.Tensor, torch.Tensor]], device: torch.device):
    """The Hessian and count over all blocks: partial sums added in block order."""
    ordered = sorted(partials, key=lambda partial: partial[0])
    hessian, count = ordered[0][1].to(device), ordered[0][2].to(device)
    for _, more, more_count in ordered[1:]:
        hessian += more.to(device)
        count += more_count.to(device)
    return hessian, count
