"""The decoder runner's CUDA-graph grouping, the part of the graph path a CPU can run:
batches whose inputs to a layer (other than the hidden states) are equal share one graph;
a batch that differs gets a group of its own. On a CPU, graphs stay off. (The replays
themselves are checked bit for bit on the GPU: bench/load_probe.py and the benchmark's
comparison with llm-compressor.)"""

from __future__ import annotations

import pytest
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


def _layer_weights(config: dict, index: int) -> dict:
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    return {name: tensor.detach().bfloat16() for name, tensor in model.model.layers[index].state_dict().items()}


def test_a_pass_for_inputs_only_stops_after_the_last_input_and_records_the_same():
    """GPTQ's Hessian pass skips down_proj's product (its output feeds nothing recorded):
    every recorded amax and every hooked input is what the whole forward gives."""
    runner = started_runner([8, 6, 8], graphs=False)
    torch.manual_seed(0)
    config = runner.backbone.config.to_dict()
    weights = _layer_weights(config, 1)
    linears = [name for name, module in runner.layers[1].named_modules() if isinstance(module, torch.nn.Linear)]
    runs = {}
    for inputs_only in (False, True):
        seen, outputs = [], []
        hooks = {name: lambda batch, x, name=name, seen=seen: seen.append((batch, name, x.clone())) for name in ("self_attn.q_proj", "mlp.down_proj")}
        handle = runner.layers[1].mlp.down_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            amax = runner.run_layer(1, weights, linears, ["self_attn"], advance=False, inputs_to=hooks, eager=True,
                                    inputs_only=inputs_only)  # fmt: skip
        finally:
            handle.remove()
        runs[inputs_only] = amax, seen, len(outputs)
    (whole, whole_seen, whole_calls), (only, only_seen, only_calls) = runs[False], runs[True]
    assert whole_calls == 3 and only_calls == 0
    assert only == whole and set(only) == set(linears) | {"self_attn.k", "self_attn.v"}
    assert [(b, n) for b, n, _ in only_seen] == [(b, n) for b, n, _ in whole_seen]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(only_seen, whole_seen))
    with pytest.raises(ValueError, match="inputs_only runs eagerly"):
        runner.run_layer(1, weights, linears, advance=True, eager=True, inputs_only=True)


def test_attention_is_eager_where_the_bytes_are_llmcompressors_and_sdpa_elsewhere():
    """Round-to-nearest and --exact run the reference's eager attention; GPTQ's default mode
    and padded batches PyTorch's SDPA. Dropping the causal mask (the reference's quirk,
    --exact) needs eager attention: SDPA would stay causal without the mask."""
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.plan import attention_of

    paths = dict(source="/source", dest="/dest")
    assert attention_of(QuantizeConfig(**paths), gptq=False) == "eager"
    assert attention_of(QuantizeConfig(**paths, exact=True), gptq=False) == "eager"
    assert attention_of(QuantizeConfig(**paths, exact=True), gptq=True) == "eager"
    assert attention_of(QuantizeConfig(**paths), gptq=True) == "sdpa"
    assert attention_of(QuantizeConfig(**paths, batch_tokens=512), gptq=False) == "sdpa"
    class_name, kwargs = FAMILIES["mistral"]
    config = getattr(transformers, class_name)(**kwargs).to_dict()
    with pytest.raises(ValueError, match="attention must be eager"):
        DecoderRunner(config, "cpu", "sdpa", drop_causal_mask=True)
    DecoderRunner(config, "cpu", "eager", drop_causal_mask=True)
