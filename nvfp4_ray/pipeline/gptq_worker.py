"""The GPTQ steps a LayerWorker runs for one decoder layer (LayerWorker.gptq), in order:

  hessian_pass  its batches through the layer as loaded, one by one and in order, each only
                as far as its last recorded input: input amax (as calibration
                records them) and the Hessian subtrees of its blocks of samples
                (calibration/hessians.py), kept on the device; the hidden states stay
  partials_of   (for the owners of an input's groups on other workers) its subtrees of
                the input, on the host
  solve         (owner) the group's Hessian from its own subtrees and the others', in the
                tree (or its input's inverse factor, kept from the owner's first group of
                that input), and its GPTQ solve with scales from the loaded weights
  propagate     its batches through the layer with the solved weights: the next layer's
                inputs (llm-compressor's propagate_error), by run_layer (not for the last
                layer); the owner's solved weights never left its device. The writing
                worker keeps the unit file's tensors: the solved groups' and the layer's
                others as loaded
  write_unit    (one worker, in a write thread, beside the next layer's calibration
                pass) the layer's unit file
"""

from __future__ import annotations

import time

import torch

from nvfp4_ray.calibration.hessians import HessianBlocks, distinct_inputs, reduce_partials
from nvfp4_ray.formats import gptq
from nvfp4_ray.io.shards import TensorShard
from nvfp4_ray.io.storage import Store
from nvfp4_ray.pipeline.unit_tasks import write_retrying


class GptqSteps:
    def __init__(self, worker):
        self.worker = worker  # the LayerWorker: its runner, device and loaded layers
        self.index: int | None = None
        self.tensors: dict = {}  # the layer as loaded: parameter name inside it -> device tensor
        self.partials: dict[str, list] = {}  # input name -> this worker's subtrees, on the device
        self.inverses: dict[str, gptq.InverseFactor] = {}  # input name -> its factor, for this worker's next group of it
        self.solved_here: dict[str, tuple] = {}  # local Linear name -> its solved weight and tensors, on the device
        self.units: dict[int, tuple] = {}  # layer -> ((spec, file name, key), tensors) of a unit to write
        # seconds in each step, for the summary (the propagation pass is run_layer's)
        self.seconds = {"calibration_pass": 0.0, "reduction": 0.0, "solves": 0.0}

    def hessian_pass(self, index: int, spec, block_size: int, exact: bool) -> dict:
        worker = self.worker
        self.index, self.tensors, self.inverses = index, worker._take(index), {}
        blocks = HessianBlocks(distinct_inputs(spec.groups), block_size, worker.device, exact)
        attention = [a.local for a in spec.attention]
        began = time.monotonic()
        amax = worker.runner.run_layer(index, self.tensors, list(spec.recorded), attention, advance=False,
                                       inputs_to=blocks.hooks(), eager=True, inputs_only=True)  # fmt: skip
        self.partials = blocks.partials()
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
        self.seconds["calibration_pass"] += time.monotonic() - began
        return {"amax": amax, "snapshots": []}

    def partials_of(self, index: int, name: str, keep: bool) -> list:
        """The subtrees of input ``name``, for its owners elsewhere; ``keep``: this worker
        owns groups of it too (a routed expert's gate/up: hessian_inputs), else they are
        freed. As numpy arrays: Ray reads those in place from the object store, where a torch
        tensor is pickled and copied (2.2x the rate on a 2-core VM; bench/transport_probe.py)."""
        assert index == self.index
        partials = self.partials[name] if keep else self.partials.pop(name)
        # (Ray copies the arrays into the object store as this returns, before this
        # worker's own solve adds into its subtrees in place)
        return [(first, size, hessian.cpu().numpy(), count.cpu()) for first, size, hessian, count in partials]

    def solve(self, index: int, group_linears: list, name: str, first: bool, keep: bool, options, exact: bool,
              ship: bool, *others: list) -> tuple[list, dict | None]:  # fmt: skip
        """``group_linears``: the group's LinearSpecs; ``name``: its input's (hessian_inputs);
        ``first``: this worker's first group of that input, which reduces its Hessian;
        ``keep``: another group of that input follows here, which takes the same inverse
        factor (computed once); ``exact``: llm-compressor's arithmetic
        (gptq.solve_group); ``others``: the other calibration workers' subtrees of the input.
        The results stay on this device for this worker's write and propagation; ``ship``:
        also return them, on the host, for the others.
        -> (the Linears that fell back to round-to-nearest, local name -> (weight, tensors) or None)."""
        assert index == self.index
        device = self.worker.device
        began = time.monotonic()  # the others' subtrees are here: Ray fetched them before the call
        assert first == (name not in self.inverses), f"{name}: solved out of order"
        inverse, reduced = self.inverses.pop(name, None), began
        if first:
            subtrees = self.partials.pop(name, []) + [p for partials in others for p in partials]
            hessian, count = reduce_partials(subtrees, device)
            del subtrees
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            reduced = time.monotonic()
            inverse = gptq.group_inverse(hessian, count, options.dampening_frac, options.ordered, exact)
            del hessian
        if keep:
            self.inverses[name] = inverse
        weights = [self.tensors[f"{linear.local}.weight"] for linear in group_linears]
        solved = gptq.solve_with(weights, inverse, group_linears[0].scheme, options.block_size, exact=exact)
        del inverse
        self.solved_here.update((linear.local, (result.weight, result.tensors)) for linear, result in zip(group_linears, solved))
        shipped = None
        if ship:
            shipped = {linear.local: (result.weight.cpu(), {k: _portable(t.cpu()) for k, t in result.tensors.items()})
                       for linear, result in zip(group_linears, solved)}  # fmt: skip
        elif device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds["reduction"] += reduced - began
        self.seconds["solves"] += time.monotonic() - reduced
        return [linear.local for linear, result in zip(group_linears, solved) if result.fell_back], shipped

    def _solved(self, shipped: tuple) -> dict:
        """local name -> (weight, tensors): this worker's solves, and the others' as shipped."""
        results = dict(self.solved_here)
        for group in shipped:
            results.update((local, (weight, {k: _restored(t) for k, t in tensors.items()}))
                           for local, (weight, tensors) in group.items())  # fmt: skip
        return results

    def propagate(self, index: int, snapshot: str | None, dest_url: str, unit: tuple | None, advance: bool,
                  *shipped: dict) -> dict:  # fmt: skip
        """run_layer on the layer with every solved weight in place of the loaded one. One
        call with the others' results as arguments: if a result is lost, Ray fails the call
        instead of running it. ``unit``: (spec, file name, key) of the unit file this worker
        writes: its tensors are kept for write_unit. ``advance`` False (the last layer):
        only that, the hidden states stay as they are."""
        assert index == self.index
        results, self.solved_here = self._solved(shipped), {}
        if unit is not None:
            self.units[index] = (unit, self._unit_tensors(unit[0], results))
        if not advance:
            return {"amax": {}, "snapshots": self.worker._finished_snapshots(block=False)}
        tensors = dict(self.tensors)
        for local, (weight, _) in results.items():
            tensors[f"{local}.weight"] = weight.to(self.worker.device)
        slot = self.worker._slot(index)
        slot.tensors = tensors
        slot.ready.set()
        return self.worker.run_layer(index, [], [], snapshot, dest_url)

    def _unit_tensors(self, spec, results: dict) -> list:
        """The unit file's tensors, as layer_quantizer.quantize_layer lays it out: the solved
        groups' and the layer's other tensors as loaded (norms, router: small)."""
        out, replaced = [], set()
        for linear in spec.linears:
            out.extend((f"{linear.checkpoint}.{suffix}", t) for suffix, t in results[linear.local][1].items())
            replaced.add(f"{linear.checkpoint}.weight")
        out.extend((name, self.tensors[local]) for name, local in spec.tensors.items() if name not in replaced)
        return out

    def write_unit(self, index: int, dest_url: str):
        """Layer ``index``'s unit file, kept by its propagate, from a write thread
        (LayerWorker.gptq_write) while the next layer's calibration pass runs; on a GPU its
        tensors cross to the host a chunk at a time, as the round-to-nearest writes do
        (their kernels are done: the solves synchronized, and the propagation pass ran)."""
        (_, file_name, key), out = self.units.pop(index)
        with self.worker.write_copier() as (buffer, stream):
            return write_retrying(Store(dest_url), key, TensorShard(file_name, out, buffer, None, stream))


def _portable(tensor):
    """torch cannot pickle float8 tensors (Ray's transport): their bytes travel as uint8."""
    return (tensor.view(torch.uint8), tensor.dtype) if tensor.dtype == torch.float8_e4m3fn else tensor


def _restored(value):
    return value[0].view(value[1]) if isinstance(value, tuple) else value
