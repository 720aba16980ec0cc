"""Number-format properties of formats/linear.py, with expected values worked out by hand."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4_ray.formats import linear, nvfp4

BF16 = torch.bfloat16
NVFP4 = linear.preset("NVFP4")
FP8 = linear.preset("FP8")


def nvfp4_global_scale(amax: float) -> float:
    return linear.activation_tensors("input", NVFP4.input_activations, amax, BF16)["input_global_scale"].item()


def test_fp4_codes_round_half_to_even_and_pack_even_column_low():
    # The group's amax is 6, so the global scale is 448 and the e4m3 group scale 448:
    # the effective scale is exactly 1 and every value maps onto the FP4 grid directly.
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]
    # e2m1 codes: 0,0.5,1,1.5,2,3,4,6 -> 0..7, sign in bit 3; ties go to the even code
    expected = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 15]
    (out,) = linear.quantize_group([torch.tensor([row], dtype=BF16)], NVFP4)
    assert out["weight_global_scale"].item() == 448.0
    assert out["weight_scale"].to(torch.float32).tolist() == [[448.0]]
    assert out["weight_packed"].tolist() == [[expected[i] | (expected[i + 1] << 4) for i in range(0, 16, 2)]]


def test_negative_zero_weights_become_positive_zero_codes():
    """The reference adds its (zero) zero-point before rounding, so -0.0 turns into +0."""
    row = torch.tensor([[6.0, -0.0] + [0.0] * 14], dtype=BF16)
    (out,) = linear.quantize_group([row], NVFP4)
    assert out["weight_packed"][0, 0].item() == 0x07  # high nibble: code 0, not 8 (negative zero)


def test_global_scale_is_divided_in_bf16():
    # bf16 holds 0.3 as 0.30078125; 2688 / that is 8936.7 in float32, but the reference
    # divides in bf16 and gets 8960
    assert nvfp4_global_scale(0.3) == 8960.0


def test_fused_siblings_share_the_largest_amax():
    small = torch.full((2, 16), 1.0, dtype=BF16)
    large = torch.full((2, 16), -4.0, dtype=BF16)
    results = linear.quantize_group([small, large], NVFP4)
    assert [r["weight_global_scale"].item() for r in results] == [672.0, 672.0]  # 2688 / 4


def test_zero_weight_and_nan_amax():
    (out,) = linear.quantize_group([torch.zeros(4, 32, dtype=BF16)], NVFP4)
    assert out["weight_global_scale"].item() == 1.0  # 2688/tiny overflows; the reference falls back to 1
    assert int(out["weight_packed"].abs().sum()) == 0
    assert nvfp4_global_scale(float("nan")) == 1.0


def test_nvfp4_shapes_and_dtypes():
    (out,) = linear.quantize_group([torch.randn(48, 64, dtype=BF16)], NVFP4)
    assert out["weight_packed"].shape == (48, 32) and out["weight_packed"].dtype == torch.uint8
    assert out["weight_scale"].shape == (48, 4) and out["weight_scale"].dtype == torch.float8_e4m3fn
    assert sorted(out) == ["weight_global_scale", "weight_packed", "weight_scale"]


def test_fp8_per_tensor_scale_and_values():
    weight = torch.tensor([[4.48, -2.24, 1.0, 0.0]], dtype=BF16)
    (out,) = linear.quantize_group([weight], FP8)
    scale = out["weight_scale"]
    assert scale.dtype == BF16 and scale.shape == (1,)
    assert scale.item() == (torch.tensor(4.48, dtype=BF16) / torch.tensor(448.0, dtype=BF16)).item()  # bf16 division
    assert out["weight"].dtype == torch.float8_e4m3fn
    assert out["weight"].float()[0, 0].item() == 448.0  # the amax maps to the top of the e4m3 range
    static = linear.activation_tensors("input", FP8.input_activations, 8.96, BF16)
    assert list(static) == ["input_scale"] and static["input_scale"].dtype == BF16


def test_fp8_dynamic_has_per_channel_weight_scales_and_no_activation_scales():
    scheme = linear.preset("FP8_DYNAMIC")
    (out,) = linear.quantize_group([torch.randn(8, 32, dtype=BF16)], scheme)
    assert out["weight_scale"].shape == (8, 1)
    assert not linear.needs_calibration(scheme.input_activations)
    assert linear.activation_tensors("input", scheme.input_activations, 1.0, BF16) == {}


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 6),
    outlier=st.floats(1.0, 200.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_nvfp4_round_trip_error_is_bounded(rows, groups, outlier, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * 16, generator=generator)
    weight[:, 0] *= outlier
    weight = weight.to(BF16)
    (out,) = linear.quantize_group([weight], NVFP4)
    restored = nvfp4.dequantize_weight(nvfp4.PackedWeight(**out), torch.float32)
    # Each value is within half an FP4 step of its group's grid (at most 1/3 of the group
    # amax for the coarsest step, 6->4) plus the e4m3 scale's rounding: a few percent.
    group_amax = weight.float().abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True)
    error = (restored - weight.float()).abs().unflatten(-1, (-1, 16))
    assert bool((error <= group_amax * 0.2 + 1e-6).all())


def reference_nvfp4(weight: torch.Tensor) -> dict:
    """compressed-tensors' own NVFP4 compressor, fed as llm-compressor feeds it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = NVFP4.weights
    groups = weight.unflatten(-1, (-1, 16))
    lo, hi = torch.aminmax(groups, dim=-1)
    amax = torch.maximum(hi.max(), -lo.min())
    global_scale = generate_gparam(-amax.reshape(1), amax.reshape(1))
    scale, zero_point = calculate_qparams(lo, hi, args, global_scale=global_scale)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point,
             "weight_global_scale": global_scale}  # fmt: skip
    return dict(BaseCompressor.get_value_from_registry("nvfp4-pack-quantized").compress(state, NVFP4))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    style=st.sampled_from(["normal", "grid_ties", "tiny", "zeros_and_signs", "outliers"]),
)
def test_fast_nvfp4_encoder_equals_compressed_tensors(rows, groups, seed, style):
    """The encoder used for every NVFP4 weight, against compressed-tensors' compressor, bit
    for bit, including values exactly on the rounding midpoints, negative zeros and
    negative values that round to zero."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, groups * 16)
    if style == "grid_ties":  # every midpoint of the e2m1 grid, scaled by the group max 6
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
        weight = ties[torch.randint(0, 8, shape, generator=generator)] * torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
        weight[:, ::16] = 6.0
    elif style == "tiny":
        weight = torch.randn(shape, generator=generator) * 1e-3
        weight[:, ::16] = 1.0
    elif style == "zeros_and_signs":
        weight = torch.randn(shape, generator=generator)
        weight[torch.rand(shape, generator=generator) < 0.3] = -0.0
        weight[torch.rand(shape, generator=generator) < 0.1] = 0.0
    elif style == "outliers":
        weight = torch.randn(shape, generator=generator)
        weight[:, torch.randint(0, shape[1], (2,), generator=generator)] *= 300.0
    else:
        weight = torch.randn(shape, generator=generator)
    weight = weight.to(BF16)
    (ours,) = linear.quantize_group([weight], NVFP4)
    theirs = reference_nvfp4(weight)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name].view(torch.uint8) if ours[name].dtype == torch.float8_e4m3fn else ours[name],
                                                                       theirs[name].view(torch.uint8) if theirs[name].dtype == torch.float8_e4m3fn else theirs[name]), name


def test_a_layer_crossing_whole_gives_every_tensor_back():
    """What a worker puts on the GPU in one copy is viewed back as each tensor, also where
    a tensor's bytes are not aligned to its element size."""
    import numpy as np

    from nvfp4_ray.io.tensors import TensorBundle, safetensors_dtype
    from nvfp4_ray.layer_quantizer import _view

    tensors = {"a": torch.randn(3).bfloat16(), "b": torch.randn(2, 3), "c": torch.arange(5, dtype=torch.uint8),
               "d": torch.randn(4).half()}  # fmt: skip
    parts, entries, offset = [], {}, 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        entries[name] = (offset, safetensors_dtype(tensor.dtype), tuple(tensor.shape))
        parts.append(raw)
        offset += raw.size
    bundle = TensorBundle(np.concatenate(parts), entries)
    assert entries["b"][0] % 4  # "b" (float32) starts 6 bytes in: the unaligned case is covered
    whole = bundle.as_tensor().clone()
    for name, tensor in tensors.items():
        assert torch.equal(_view(whole, bundle.entries[name]), tensor)
        assert _view(whole, bundle.entries[name]).dtype == tensor.dtype
