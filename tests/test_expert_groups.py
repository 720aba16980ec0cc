"""MoE layers larger than the device budget, loaded and calibrated in expert groups
(calibration/expert_groups.py): the same bytes as llm-compressor, which holds whole layers.

The budget is the plan's own estimate for a given number of groups, so each job is forced
into groups that the whole layers would not fit in. deepseek_v3 is byte-identical to
llm-compressor in the default mode (a dense first layer, shared experts, MLA attention).
From S3, on several nodes with two workers each, layers read part by part
(pipeline/part_streams.py): tests/test_ray_jobs.py."""

from __future__ import annotations

import pytest
from conftest import quantize
from reference import load_tensors

from nvfp4_ray.calibration.batches import deal, make_batches
from nvfp4_ray.calibration.expert_groups import expert_ranges, part_of
from nvfp4_ray.config import QuantizeConfig
from nvfp4_ray.pipeline.device_memory import estimate
from nvfp4_ray.pipeline.plan import build_plan, read_inputs

GIB = 2**30


def budget_for(case, groups: int, tmp_path, workers: int = 1) -> float:
    """GiB that hold the MoE layers in ``groups`` expert groups (at no layer ahead and one
    queued write) and not in half as many."""
    config = QuantizeConfig(source=case.source, dest=str(tmp_path / "probe"), calibration=case.calibration,
                            num_samples=6, max_seq_len=64)  # fmt: skip
    plan = build_plan(config, read_inputs(config))
    shares = deal(make_batches(plan.samples, config.batch_tokens), workers)  # the driver's shares
    fits = estimate(plan.layer_units, shares, plan.source.config, groups=groups)[0](0, 1)
    fewer = estimate(plan.layer_units, shares, plan.source.config, groups=groups // 2)[0](0, 1)
    assert fewer > fits
    return (fits + 0.25 * (fewer - fits)) / GIB


def test_expert_ranges_and_parts():
    assert expert_ranges(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert expert_ranges(256, 16)[-1] == range(240, 256)
    ranges = expert_ranges(8, 4)
    assert part_of("model.layers.3.mlp.experts.5.up_proj.weight", ranges) == 3
    assert part_of("model.layers.3.mlp.shared_experts.up_proj.weight", ranges) == 0
    assert part_of("mlp.experts.0.w1.weight_scale_inv", ranges) == 1


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize("family, groups", [("deepseek_v3", 4)])
def test_expert_groups_give_llmcompressors_bytes(family, groups, family_case, reference, tmp_path):
    case = family_case(family)
    budget = budget_for(case, groups, tmp_path)
    out = str(tmp_path / "out")
    summary = quantize(case.source, out, case.calibration, ignore=case.ignore, device_memory_gib=budget)
    assert summary["device_memory"]["expert_groups"] == groups
    ours, theirs = load_tensors(out), load_tensors(reference(family))
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []

