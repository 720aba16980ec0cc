"""NVFP4 number-format properties, with expected values worked out by hand."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4_ray.formats import nvfp4

BF16 = torch.bfloat16


def test_fp4_codes_round_half_to_even_and_pack_even_column_low():
    # The group's amax is 6, so the global scale is 448 and the e4m3 group scale 448:
    # the effective scale is exactly 1 and every value maps onto the FP4 grid directly.
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]
    # e2m1 codes: 0,0.5,1,1.5,2,3,4,6 -> 0..7, sign in bit 3; ties go to the even code
    expected = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 15]
    packed = nvfp4.quantize_weight(torch.tensor([row], dtype=BF16), nvfp4.global_scale(torch.tensor(6.0, dtype=BF16)))
    assert packed.weight_global_scale.item() == 448.0
    assert packed.weight_scale.to(torch.float32).tolist() == [[448.0]]
    low = [expected[i] | (expected[i + 1] << 4) for i in range(0, 16, 2)]
    assert packed.weight_packed.tolist() == [low]


def test_global_scale_is_divided_in_bf16():
    amax = torch.tensor(0.3, dtype=BF16)  # bf16 holds 0.30078125
    assert 2688 / 0.30078125 != 8960.0  # float32 would give 8936.7...
    assert nvfp4.global_scale(amax).item() == 8960.0  # ...the reference rounds it to bf16 first
    assert nvfp4.global_scale(amax).dtype == torch.float32


def test_fused_siblings_share_the_largest_amax():
    small = torch.full((2, 16), 1.0, dtype=BF16)
    large = torch.full((2, 16), -4.0, dtype=BF16)
    results = nvfp4.quantize_fused_group([small, large])
    assert [r.weight_global_scale.item() for r in results] == [672.0, 672.0]  # 2688 / 4


def test_zero_weight():
    packed = nvfp4.quantize_weight(torch.zeros(4, 32, dtype=BF16), nvfp4.global_scale(torch.tensor(0.0, dtype=BF16)))
    assert packed.weight_global_scale.item() == 1.0  # 2688/tiny overflows; the reference falls back to 1
    assert int(packed.weight_packed.abs().sum()) == 0


def test_nan_amax_gives_unit_global_scale():
    assert nvfp4.global_scale(torch.tensor(float("nan"), dtype=BF16)).item() == 1.0


def test_shapes_and_dtypes():
    packed = nvfp4.quantize_weight(torch.randn(48, 64, dtype=BF16), torch.tensor([100.0]))
    assert packed.weight_packed.shape == (48, 32) and packed.weight_packed.dtype == torch.uint8
    assert packed.weight_scale.shape == (48, 4) and packed.weight_scale.dtype == torch.float8_e4m3fn


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 6),
    outlier=st.floats(1.0, 200.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_is_bounded(rows, groups, outlier, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * 16, generator=generator)
    weight[:, 0] *= outlier
    weight = weight.to(BF16)
    (packed,) = nvfp4.quantize_fused_group([weight])
    restored = nvfp4.dequantize_weight(packed, torch.float32)
    # Each value is within half an FP4 step of its group's grid (at most 1/3 of the group
    # amax for the coarsest step, 6->4) plus the e4m3 scale's rounding: a few percent.
    group_amax = weight.float().abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True)
    error = (restored - weight.float()).abs().unflatten(-1, (-1, 16))
    assert bool((error <= group_amax * 0.2 + 1e-6).all())


def test_absmax_is_order_free():
    values = torch.randn(1000).to(BF16)
    halves = torch.maximum(nvfp4.absmax(values[:500]), nvfp4.absmax(values[500:]))
    assert halves.item() == nvfp4.absmax(values).item() == values.abs().max().item()
