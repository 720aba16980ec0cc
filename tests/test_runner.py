"""The decoder runner's CUDA-graph grouping, the part of the graph path a CPU can run:
batches whose inputs to a layer (other than the hidden states) are equal share one graph;
a batch that differs gets a group of its own. On a CPU, graphs stay off. (The replays
themselves are checked bit for bit on the GPU: bench/load_probe.py and the benchmark's
comparison with llm-compressor.)"""

from __future__ import annotations

import torch
import transformers
from models import FAMILIES

from nvfp4_ray.calibration.batches import make_batches
from nvfp4_ray.calibration.graphs import group_batches
from nvfp4_ray.calibration.runner import DecoderRunner


def started_runner(lengths: list[int], graphs: bool) -> DecoderRunner:
    class_name, kwargs = FAMILIES["llama"]
    config = getattr(transformers, class_name)(**kwargs).to_dict()
    runner = DecoderRunner(config, "cpu", graphs=graphs)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, config["vocab_size"], (n,), generator=generator).tolist() for n in lengths]
    embed = torch.randn(config["vocab_size"], config["hidden_size"], generator=generator).bfloat16()
    runner.start(make_batches(rows, None), embed)
    return runner


def test_graphs_stay_off_on_a_cpu():
    runner = started_runner([8, 8], graphs=True)
    assert runner.graphs is None and not runner.graphed and runner.notes == []


def test_batches_with_equal_layer_inputs_share_a_group():
    runner = started_runner([8, 8, 6, 8, 6], graphs=False)
    equal: dict = {}
    for layer in range(runner.num_layers):
        groups = [[state.batch.index for state in group] for group in group_batches(runner.states, layer, equal)]
        assert groups == [[0, 1, 3], [2, 4]]
