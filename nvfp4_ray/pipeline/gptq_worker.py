"""The GPTQ steps a LayerWorker runs for one decoder layer (LayerWorker.gptq), in order:

  hessian_pass  its batches through the layer as loaded: input amax (as calibration
                records them) and the Hessian partial of each block of its samples;
                the hidden states stay
  partials      the partials of one fused group, for the group's owner
  solve         (owner) the group's Hessian from every block's partial, in block order,
                and its GPTQ solve with scales from the loaded weights
  write_unit    (one worker) the layer's unit file: the solved groups' tensors and the
                layer's other tensors as loaded
  stage         the layer with its solved weights, for run_layer to propagate through
                (llm-compressor's propagate_error)
"""

from __future__ import annotations

import torch

from nvfp4_ray.calibration.hessians import HessianBlocks, reduce_partials
from nvfp4_ray.formats import gptq
from nvfp4_ray.io.storage import Store
from nvfp4_ray.io.tensors import TensorShard


class GptqSteps:
    def __init__(self, worker):
        self.worker = worker  # the LayerWorker: its runner, device and loaded layers
        self.index: int | None = None
        self.tensors: dict = {}  # the layer as loaded: parameter name inside it -> device tensor
        self.partials: dict[str, list] = {}

    def hessian_pass(self, index: int, spec, block_size: int) -> dict:
        worker = self.worker
        self.index, self.tensors = index, worker._take(index)
        inputs = {group[0].local: group[0].in_features for group in spec.groups}
        blocks = HessianBlocks(inputs, block_size, worker.device)
        attention = [a.local for a in spec.attention]
        amax = worker.runner.run_layer(index, self.tensors, list(spec.recorded), attention, advance=False,
                                       inputs_to=blocks.hooks())  # fmt: skip
        self.partials = blocks.partials()
        return {"amax": amax, "snapshots": []}

    def partials_of(self, index: int, group: str) -> list:
        assert index == self.index
        return self.partials.pop(group)

    def solve(self, index: int, group_linears: list, options, *worker_partials) -> dict:
        """``group_linears``: the group's LinearSpecs; ``worker_partials``: each calibration
        worker's partials of the group. -> local name -> (weight, tensors, fell back), on the host."""
        assert index == self.index
        device = self.worker.device
        hessian, count = reduce_partials([p for partials in worker_partials for p in partials], device)
        weights = [self.tensors[f"{linear.local}.weight"] for linear in group_linears]
        solved = gptq.solve_group(
            weights, hessian, count, group_linears[0].scheme, options.block_size, options.dampening_frac, options.ordered
        )
        return {
            linear.local: (result.weight.cpu(), {k: _portable(t.cpu()) for k, t in result.tensors.items()}, result.fell_back)
            for linear, result in zip(group_linears, solved)
        }

    def write_unit(self, index: int, spec, file_name: str, key: str, dest_url: str, *solved: dict):
        """The unit file, as layer_quantizer.quantize_layer lays it out."""
        from nvfp4_ray.pipeline.workers import write_unit

        assert index == self.index
        results = {local: result for group in solved for local, result in group.items()}
        out, replaced = [], set()
        for linear in spec.linears:
            out.extend((f"{linear.checkpoint}.{suffix}", _restored(t)) for suffix, t in results[linear.local][1].items())
            replaced.add(f"{linear.checkpoint}.weight")
        out.extend((name, self.tensors[local].cpu()) for name, local in spec.tensors.items() if name not in replaced)
        return write_unit(Store(dest_url), key, TensorShard(file_name, out))

    def stage(self, index: int, *solved: dict) -> None:
        """Hand run_layer the layer with every solved weight in place of the loaded one."""
        assert index == self.index
        tensors = dict(self.tensors)
        for group in solved:
            for local, (weight, _, _) in group.items():
                tensors[f"{local}.weight"] = weight.to(self.worker.device)
        slot = self.worker._slot(index)
        slot.tensors = tensors
        slot.ready.set()


def _portable(tensor):
    """torch cannot pickle float8 tensors (Ray's transport): their bytes travel as uint8."""
    return (tensor.view(torch.uint8), tensor.dtype) if tensor.dtype == torch.float8_e4m3fn else tensor


def _restored(value):
    return value[0].view(value[1]) if isinstance(value, tuple) else value
