"""How many layers a worker's device holds (pipeline/device_memory.py), at real model
shapes (headers only: no weights are made) and in a real job with a tight budget."""

from __future__ import annotations

import math

import pytest
from conftest import quantize
from reference import load_tensors

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.checkpoint import SourceTensor
from nvfp4_ray.io.safetensors_format import TensorEntry
from nvfp4_ray.pipeline.device_memory import estimate, plan_device

GIB = 2**30


def headers_only_units(config: dict) -> list:
    """The layer units of a model of ``config``, from checkpoint headers that describe
    its bf16 tensors (as the planner sees a real checkpoint's), without any tensor data."""
    from types import SimpleNamespace

    from nvfp4_ray.architecture import build_meta_model, describe_model
    from nvfp4_ray.recipe import load_recipe

    meta = build_meta_model(config)
    tensors, offset = {}, 0
    for name, tensor in meta.state_dict().items():
        size = math.prod(tensor.shape) * 2
        tensors[name] = SourceTensor("model.safetensors", TensorEntry(name, "BF16", tuple(tensor.shape), offset, offset + size))
        offset += size
    spec, _ = describe_model(config, tensors, load_recipe(None, "NVFP4", ["lm_head"]))
    return [SimpleNamespace(spec=layer, tensors=[tensors[name] for name in layer.tensors]) for layer in spec.layers]


def calibration_shares(workers: int, samples: int, length: int) -> list[list]:
    from nvfp4_ray.calibration.batches import deal, make_batches

    return deal(make_batches([[0] * length] * samples, None), workers)


@pytest.fixture(scope="module")
def deepseek_v3():
    """DeepSeek-V3's own dimensions (transformers' defaults): a dense layer, then an MoE
    layer of 256 experts of 2048 and a shared expert; 2 layers stand for the 61."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1).to_dict()
    return config, headers_only_units(config)


def test_deepseek_v3_fits_one_80gb_gpu_with_256_x_1024_tokens(deepseek_v3):
    config, units = deepseek_v3
    need, parts = estimate(units, calibration_shares(1, 256, 1024), config)
    assert 21 * GIB < parts["layer"] < 22 * GIB  # 256 x 3 x 7168 x 2048 x 2 bytes of experts, and attention
    plan = plan_device(units, calibration_shares(1, 256, 1024), config, int(0.9 * 80 * GIB))
    assert (plan.ahead, plan.writes_queued) == (1, 2)
    assert plan.need_bytes <= 0.9 * 80 * GIB
    assert plan.expert_groups == 1


def test_deepseek_v3_fits_a_32gb_card_in_expert_groups(deepseek_v3):
    """An RTX 5090 (32 GB) cannot hold one whole MoE layer with its output: it takes the
    experts 4 groups at a time (a quarter of the 22 GB, beside the expert inputs and sums
    of 256 x 1024 tokens: 7.0 GiB); GPTQ, which needs whole layers, is refused. Below what
    one expert per group needs, the job is refused before any work."""
    config, units = deepseek_v3
    shares = calibration_shares(1, 256, 1024)
    whole = estimate(units, shares, config)[0](0, 1)
    plan = plan_device(units, shares, config, int(0.9 * 32 * GIB))
    assert (plan.ahead, plan.writes_queued, plan.expert_groups) == (0, 1, 4)
    assert plan.need_bytes <= 0.9 * 32 * GIB < whole
    need, parts = estimate(units, shares, config, groups=4)
    assert need(0, 1) == plan.need_bytes and parts["fixed"] - estimate(units, shares, config)[1]["fixed"] == 2 * 256 * 1024 * 7168 * 2 + 256 * 1024 * 256 * 4
    with pytest.raises(InputError, match=r"needs about \d+\.\d GiB of device memory for one layer at a time \(largest layer"):
        plan_device(units, shares, config, int(0.9 * 32 * GIB), expert_groups=False)
    with pytest.raises(InputError, match=r"for one layer at a time, its experts 256 groups at a time"):
        plan_device(units, shares, config, int(0.9 * 24 * GIB))


def test_gptq_sums_one_hessian_for_every_routed_experts_gate_up_of_deepseek_v3(deepseek_v3):
    """Calibration runs every routed expert on every token, so the 256 experts' gate/up
    take one input, hence one Hessian sum (hessians.hessian_inputs): DeepSeek-V3's MoE
    layer sums 6.0 GB, not 58.4 GB. Its whole layers then fit an 80 GB GPU with GPTQ on
    two workers (8 blocks of samples each); one worker with all 16 blocks of 256 x 1024
    tokens keeps five sums at once, and is refused before any work."""
    from nvfp4_ray.calibration.hessians import device_bytes, distinct_inputs, hessian_inputs

    config, units = deepseek_v3
    groups = [unit.spec.groups for unit in units]
    moe = groups[1]
    inputs = distinct_inputs(moe)
    experts_gate_up = [g for g in moe if ".experts." in g[0].local and g[0].local.endswith("gate_proj")]
    assert len(experts_gate_up) == 256 and len({hessian_inputs(moe)[moe.index(g)] for g in experts_gate_up}) == 1
    assert len(moe) == 518 and len(inputs) == 263  # one gate/up input for 256 experts, 256 down_proj inputs
    assert sum(n**2 * 4 for n in inputs.values()) == 6012534784
    two = plan_device(units, calibration_shares(2, 256, 1024), config, int(0.9 * 80 * GIB), device_bytes(groups, 8, 1024),
                      expert_groups=False)  # fmt: skip
    assert two.expert_groups == 1 and two.need_bytes <= 0.9 * 80 * GIB
    with pytest.raises(InputError, match="GPTQ's Hessians"):
        plan_device(units, calibration_shares(1, 256, 1024), config, int(0.9 * 80 * GIB), device_bytes(groups, 16, 1024),
                    expert_groups=False)  # fmt: skip


def test_gptq_owners_of_deepseek_v3_on_16_workers(deepseek_v3):
    """Who solves what in DeepSeek-V3's MoE layer on 16 calibration workers (gptq_flow.owners),
    and what the owners receive, as docs/gptq.md#memory-and-traffic counts it: each group's
    owner gets the subtrees of its input from the 15 other workers (one each with one block
    of samples a worker). The solves are balanced (by in_features²) and the 256 routed
    experts' gate/up spread over all 16 owners, so their shared input goes to every one; the
    traffic is not balanced: o_proj's input (16384², 1.07 GB) goes whole to its owner."""
    from nvfp4_ray.calibration.hessians import distinct_inputs, hessian_inputs
    from nvfp4_ray.pipeline.gptq_flow import owners

    config, units = deepseek_v3
    moe, workers = units[1].spec.groups, 16
    owner = owners(moe, workers)
    load = [sum(g[0].in_features ** 2 for g, o in zip(moe, owner) if o == w) for w in range(workers)]
    assert max(load) <= 1.01 * sum(load) / workers
    routed = [i for i, g in enumerate(moe) if ".experts." in g[0].local and g[0].local.endswith("gate_proj")]
    assert {owner[i] for i in routed} == set(range(workers))
    inputs, names = distinct_inputs(moe), hessian_inputs(moe)
    sums = {name: features**2 * 4 for name, features in inputs.items()}
    received = [0] * workers
    for name in inputs:
        for w in {o for n, o in zip(names, owner) if n == name}:
            received[w] += (workers - 1) * sums[name]
    shared = sums[names[routed[0]]]  # the routed experts' one gate/up input: 7168² x 4 bytes
    assert sum(received) == (workers - 1) * (sum(sums.values()) + (workers - 1) * shared)  # 136 GB a layer
    o_proj = owner[next(i for i, g in enumerate(moe) if g[0].local.endswith("o_proj"))]
    assert received.index(max(received)) == o_proj and 23.5e9 < max(received) < 24.5e9
    assert 5.3e9 < min(received) < 5.5e9 and round(sum(received) / 1e9, 1) == 136.4


def test_gptq_hessians_enter_the_plan_at_the_128b_shape():
    """The Mistral-Medium-3.5 decoder layer (hidden 12288, intermediate 28672) with GPTQ:
    a worker holding all 16 blocks keeps up to 5 Hessian sums of the layer's four inputs
    (5.1 GB) and solves down_proj (4 x 28672^2 x 4 + 12288 x 28672 x 14 bytes: one
    Linear, whose packing takes more than its solve); with
    --exact (one block) a single sum. That fits an 80 GB GPU with the layer, its output
    and 256 x 1024 tokens of hidden states; RTN's plan of the same layer is the smaller."""
    from transformers import LlamaConfig

    from nvfp4_ray.calibration.hessians import device_bytes

    config = LlamaConfig(hidden_size=12288, intermediate_size=28672, num_attention_heads=96, num_key_value_heads=8,
                         num_hidden_layers=1, vocab_size=1024).to_dict()  # fmt: skip
    units = headers_only_units(config)
    groups = [unit.spec.groups for unit in units]
    sums = (3 * 12288**2 + 28672**2) * 4
    down = 4 * 28672**2 * 4 + 12288 * 28672 * 14
    assert device_bytes(groups, 16) == 5 * sums + down
    assert device_bytes(groups, 1) == sums + down
    assert device_bytes(groups, 2) == 2 * sums + down
    # the default mode holds two forwards of 1024 tokens per distinct input and their concatenation
    assert device_bytes(groups, 16, 1024) == 5 * sums + 3 * 1024 * (3 * 12288 + 28672) * 2 + down
    shares = calibration_shares(1, 256, 1024)
    rtn = plan_device(units, shares, config, int(0.9 * 80 * GIB))
    gptq = plan_device(units, shares, config, int(0.9 * 80 * GIB), device_bytes(groups, 16))
    assert (gptq.ahead, gptq.writes_queued) == (rtn.ahead, rtn.writes_queued) == (2, 4)
    assert gptq.need_bytes - rtn.need_bytes == 5 * sums + down
    assert gptq.need_bytes < 0.9 * 80 * GIB
    with pytest.raises(InputError, match=rf"GPTQ's Hessians {(5 * sums + down) / GIB:.2f} GiB"):
        plan_device(units, shares, config, int(0.9 * 32 * GIB), device_bytes(groups, 16))


@pytest.mark.usefixtures("ray_instance")
def test_the_memory_plan_holds_in_a_real_job(family_case, tmp_path):
    """A budget that fits one layer and one queued write: the job loads no layer ahead,
    its device never held more than one calibrated layer, and the bytes are the same as
    with no budget (a CPU worker's default)."""
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.plan import build_plan, read_inputs

    case = family_case("glm4_moe")
    config = QuantizeConfig(source=case.source, dest=str(tmp_path / "probe"), calibration=case.calibration,
                            num_samples=6, max_seq_len=64)  # fmt: skip
    plan = build_plan(config, read_inputs(config))
    text = plan.source.config
    need, _ = estimate(plan.layer_units, calibration_shares(1, 6, 40), text)
    budget_gib = (need(0, 1) + need(0, 2)) / 2 / GIB  # room for one queued write, not two

    tight, free = str(tmp_path / "tight"), str(tmp_path / "free")
    summary = quantize(case.source, tight, case.calibration, device_memory_gib=budget_gib)
    assert summary["device_memory"]["layers_ahead"] == 0 and summary["device_memory"]["writes_queued"] == 1
    assert summary["device_memory"]["max_layers_held"] == 1
    default = quantize(case.source, free, case.calibration)
    assert default["device_memory"]["layers_ahead"] == 2 and default["device_memory"]["budget_gib"] is None
    assert load_tensors(tight) == load_tensors(free)


@pytest.mark.usefixtures("ray_instance")
def test_a_budget_too_small_for_one_layer_is_refused(family_case, tmp_path):
    import json
    import os

    from conftest import run_cli

    case = family_case("glm4_moe")
    dest = str(tmp_path / "dest")
    code, stdout, stderr = run_cli("quantize", case.source, dest, "--calibration", case.calibration,
                                   "--num-samples", "6", "--max-seq-len", "64", "--device-memory-gib", "0.0001")  # fmt: skip
    assert code == 2, stderr
    assert "of device memory for one layer at a time" in json.loads(stdout.strip().splitlines()[-1])["error"]
    written = os.listdir(dest) if os.path.exists(dest) else []
    assert "_SUCCESS" not in written and not any(name.endswith(".safetensors") for name in written)  # no layer was loaded
