"""Calibration batches, formed once for the whole job so results never depend on sharding.

Default: one sample per forward, in file order, as llm-compressor runs them; the
activations are then bit-identical to the reference's.
``batch_tokens``: samples sorted by length and packed, right-padded, into batches of at
most that many (padded) tokens; padded positions are masked out of every amax. Other GEMM
shapes round differently, so input scales drift by a few bf16 steps (measured in tests).
Either way the batches are a pure function of the samples, and whole batches are dealt
to workers, so the same batch is computed the same way on any number of GPUs or nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# GPTQ's default mode sums each Hessian over at most this many fixed blocks of batches
# (calibration/hessians.py): the most calibration workers a GPTQ job uses
HESSIAN_BLOCKS = 16


@dataclass
class Batch:
    index: int
    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T], 1 for real tokens

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batches(samples: list[list[int]], batch_tokens: int | None) -> list[Batch]:
    if batch_tokens is None:
        groups = [[i] for i in range(len(samples))]
    else:
        order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
        groups: list[list[int]] = []
        for i in order:
            # The first sample of a group is its longest, so the padded size is count * that length.
            if groups and (len(groups[-1]) + 1) * len(samples[groups[-1][0]]) <= batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
    batches = []
    for index, members in enumerate(groups):
        length = max(len(samples[i]) for i in members)
        ids = torch.zeros((len(members), length), dtype=torch.long)
        mask = torch.zeros((len(members), length), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, : len(samples[i])] = torch.tensor(samples[i], dtype=torch.long)
            mask[row, : len(samples[i])] = 1
        batches.append(Batch(index=index, input_ids=ids, attention_mask=mask))
    return batches


def deal(batches: list[Batch], workers: int) -> list[list[Batch]]:
    """Give each worker whole batches, balancing padded tokens (largest first)."""
    shares: list[list[Batch]] = [[] for _ in range(workers)]
    load = [0] * workers
    for batch in sorted(batches, key=lambda b: (-b.input_ids.numel(), b.index)):
        target = min(range(workers), key=lambda w: (load[w], w))
        shares[target].append(batch)
        load[target] += batch.input_ids.numel()
    return [sorted(share, key=lambda b: b.index) for share in shares]


def block_size(batches: int, exact: bool) -> int:
    """A GPTQ job's batches per Hessian block: all of them with ``exact`` (llm-compressor's
    one running sum)."""
    return batches if exact else math.ceil(batches / min(HESSIAN_BLOCKS, batches))


def gptq_workers(workers: int, batches: int, exact: bool) -> int:
    """The calibration workers of a GPTQ job: one per Hessian block at most."""
    return min(workers, math.ceil(batches / block_size(batches, exact)))


def most_gptq_workers(samples: int, exact: bool) -> int:
    """The most calibration workers of a GPTQ job of at most ``samples`` samples, on any
    number of workers: a bound on ``gptq_workers``, known before the samples are read."""
    return 1 if exact else min(HESSIAN_BLOCKS, samples)
