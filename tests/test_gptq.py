"""formats/gptq.py against llm-compressor 0.14's own GPTQ functions, bit for bit, on random
weights and inputs (no model, no oneshot: seconds)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import ActivationOrdering

from nvfp4_ray.formats import gptq, linear, nvfp4

NVFP4 = linear.preset("NVFP4")


def reference_args(ordered: bool = True):
    args = NVFP4.weights.model_copy()
    args.actorder = ActivationOrdering.STATIC if ordered else None  # STATIC: GPTQModifier's default
    return args


def random_inputs(columns: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, 7, columns), (1, 12, columns), (1, 3, columns)]
    return [(torch.randn(shape, generator=generator) * 3).to(torch.bfloat16) for shape in shapes]


def reference_hessian(columns: int, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    module = torch.nn.Linear(columns, 8, bias=False)
    hessian, count = make_empty_hessian(module), torch.zeros(())
    for x in inputs:
        hessian, count = accumulate_hessian(x, module, hessian, count)
    return hessian, count


def reference_solve(weight, hessian, count, scale, global_scale, block_size, dampening, ordered=True):
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    quantized, _, fell_back = quantize_weight(
        weight.to(torch.float32).unsqueeze(0), (hessian / count).unsqueeze(0), scale.unsqueeze(0),
        torch.zeros_like(scale).unsqueeze(0), global_scale.reshape(1), reference_args(ordered), block_size, dampening,
    )  # fmt: skip
    return quantized[0].to(weight.dtype), bool(fell_back[0])


def test_hessian_accumulates_exactly_as_llmcompressor():
    inputs = random_inputs(96, seed=1)
    hessian, count = gptq.new_hessian(96, torch.device("cpu"))
    for x in inputs:
        gptq.add_to_hessian(hessian, count, x)
    expected, expected_count = reference_hessian(96, inputs)
    assert torch.equal(hessian, expected)
    assert count.item() == expected_count.item() == 3


@pytest.mark.parametrize("stripes", [1, 3])
def test_default_mode_adds_exact_products(stripes):
    """add_products sums 2 x x^T with every product of two bf16 inputs exact: on small
    integers, whose sums fp32 holds exactly, it is the float64 sum bit for bit once
    fill_upper has mirrored the lower triangle it sums, where llm-compressor's
    (sqrt(2) x)(sqrt(2) x)^T rounds each product."""
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randint(-40, 41, (1, 9 + i, 64), generator=generator).to(torch.bfloat16) for i in range(4)]
    exact = sum(2 * x[0].double().t() @ x[0].double() for x in inputs)
    hessian, count = gptq.new_hessian(64, torch.device("cpu"))
    rounded, _ = gptq.new_hessian(64, torch.device("cpu"))
    for x in inputs:
        gptq.add_products(hessian, count, x, stripes)
        gptq.add_to_hessian(rounded, torch.zeros(()), x)
    assert count.item() == 4
    assert torch.count_nonzero(hessian.triu(22)) == 0 if stripes == 3 else torch.equal(hessian.double(), exact)
    gptq.fill_upper(hessian)
    assert torch.equal(hessian.double(), exact)
    assert not torch.equal(rounded.double(), exact)
    # two forwards in one product (HessianBlocks: FORWARDS_PER_PRODUCT): the same sum and count
    paired, paired_count = gptq.new_hessian(64, torch.device("cpu"))
    gptq.add_products(paired, paired_count, inputs[:2], stripes)
    gptq.add_products(paired, paired_count, inputs[2:], stripes)
    gptq.fill_upper(paired)
    assert paired_count.item() == 4 and torch.equal(paired, hessian)


@pytest.mark.parametrize("rows, columns, block_size, ordered", [(24, 96, 32, True), (16, 80, 128, True), (40, 160, 48, False)])
def test_solve_is_bit_identical_to_llmcompressor(rows, columns, block_size, ordered):
    generator = torch.Generator().manual_seed(rows + columns)
    weights = [(torch.randn(rows, columns, generator=generator) * 0.05).to(torch.bfloat16) for _ in range(2)]
    weights[1][:, 5] *= 20  # an outlier column, and a sibling with a larger amax
    inputs = random_inputs(columns, seed=columns)
    for x in inputs:
        x[..., 7] = 0  # a dead input column: zeroed in the weight
    hessian, count = gptq.new_hessian(columns, torch.device("cpu"))
    for x in inputs:
        gptq.add_to_hessian(hessian, count, x)

    solved = gptq.solve_group(weights, hessian, count, NVFP4, block_size, 0.01, ordered, exact=True)

    global_scale, qparams = linear.weight_qparams(weights, NVFP4.weights)
    for weight, (scale, _), result in zip(weights, qparams, solved):
        expected, fell_back = reference_solve(weight, hessian, count, scale, global_scale, block_size, 0.01, ordered)
        assert not fell_back and not result.fell_back
        assert torch.equal(result.weight.view(torch.int16), expected.view(torch.int16))
        assert torch.equal(result.tensors["weight_packed"], nvfp4.encode(expected, scale, global_scale))
        assert torch.equal(result.tensors["weight_global_scale"], global_scale)
    # GPTQ really moved weights away from round-to-nearest
    rtn = linear.quantize_group(weights, NVFP4)
    assert not torch.equal(rtn[0]["weight_packed"], solved[0].tensors["weight_packed"])


@pytest.mark.parametrize("exact", [True, False])
def test_non_positive_definite_hessian_falls_back_to_round_to_nearest(exact):
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(16, 64, generator=generator) * 0.05).to(torch.bfloat16)
    hessian = -torch.eye(64) * 4  # negative definite: its Cholesky fails
    count = torch.tensor(2.0)

    (result,) = gptq.solve_group([weight], hessian.clone(), count, NVFP4, 128, 0.01, exact=exact)

    global_scale, [(scale, _)] = linear.weight_qparams([weight], NVFP4.weights)
    expected, fell_back = reference_solve(weight, hessian, count, scale, global_scale, 128, 0.01)
    assert fell_back and result.fell_back
    assert torch.equal(result.weight.view(torch.int16), expected.view(torch.int16))


def test_invert_lower_by_halves():
    """The triangular inverse by halves (leaves of 16 columns here: three levels) is the
    inverse, lower triangular, as a triangular solve against the identity gives it."""
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(200, 90, generator=generator, dtype=torch.float64)
    L = torch.linalg.cholesky(x.t() @ x)
    inverse = L.clone()
    gptq.invert_lower(inverse, leaf=16)
    assert torch.equal(inverse, inverse.tril())
    expected = torch.linalg.solve_triangular(L, torch.eye(90, dtype=torch.float64), upper=False)
    assert torch.allclose(inverse, expected, rtol=1e-9, atol=1e-12)


def test_default_mode_solve_is_gptq_with_one_factorization():
    """The default mode's inverse factor (one Cholesky of the reversed Hessian) is
    llm-compressor's (Cholesky, inverse, Cholesky) up to rounding, and its solve of the
    stacked siblings loses as little as llm-compressor's, far less than round-to-nearest
    (GPTQ's objective: the layer output's error, tr((W - Q) H (W - Q)^T))."""
    columns = 160
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(1, 400, columns, generator=generator) * torch.linspace(0.2, 3, columns)).to(torch.bfloat16)
    x[..., 9] = 0  # a dead column
    hessian, count = gptq.new_hessian(columns, torch.device("cpu"))
    gptq.add_products(hessian, count, x)
    gptq.fill_upper(hessian)
    factors = [gptq.inverse_factor(hessian / count, 0.01, True, exact) for exact in (True, False)]
    assert torch.equal(factors[0].perm, factors[1].perm) and torch.equal(factors[0].dead, factors[1].dead)
    assert not torch.equal(factors[0].factor, factors[1].factor)
    assert torch.allclose(factors[0].factor, factors[1].factor, rtol=1e-4, atol=1e-5)

    weights = [(torch.randn(rows, columns, generator=generator) * 0.05).to(torch.bfloat16) for rows in (48, 16, 16)]

    def loss(quantized):
        error = torch.cat([w.double() - q.double() for w, q in zip(weights, quantized)])
        return torch.trace(error @ hessian.double() @ error.t()).item()

    exact = [r.weight for r in gptq.solve_group(weights, hessian, count, NVFP4, 32, 0.01, exact=True)]
    default = [r.weight for r in gptq.solve_group(weights, hessian, count, NVFP4, 32, 0.01, exact=False)]
    nearest = [nvfp4.dequantize_weight(nvfp4.PackedWeight(**t)) for t in linear.quantize_group(weights, NVFP4)]
    assert loss(default) < 1.02 * loss(exact) < 0.9 * loss(nearest)
    for w, q in zip(weights, default):
        assert torch.equal(q[:, 9], torch.zeros_like(q[:, 9]))  # the dead column


def test_subtrees_leave_the_worker_symmetric_over_several_stripes(monkeypatch):
    """The default mode sums the lower triangle by stripes (STRIPE_ROWS lowered here, so
    that 48 inputs make 3 of them, as 14336 make 4); the subtrees HessianBlocks gives out
    are whole: on small integers, the float64 sum of 2 x x^T bit for bit."""
    from nvfp4_ray.calibration.hessians import HessianBlocks, reduce_partials

    monkeypatch.setattr(gptq, "STRIPE_ROWS", 16)
    assert len(gptq._stripes(48)) == 3
    generator = torch.Generator().manual_seed(6)
    forwards = [torch.randint(-30, 31, (1, 5 + i, 48), generator=generator).to(torch.bfloat16) for i in range(6)]
    sums = HessianBlocks({"x": 48}, 2, torch.device("cpu"))
    for batch, x in enumerate(forwards):
        sums.add("x", batch, x)
    hessian, count = reduce_partials(sums.partials()["x"], torch.device("cpu"))
    assert count.item() == 6
    assert torch.equal(hessian.double(), sum(2 * x[0].double().t() @ x[0].double() for x in forwards))


@pytest.mark.parametrize("blocks", [16, 12, 7, 1])
def test_hessian_tree_is_the_same_for_any_split_of_the_blocks(blocks):
    """Workers holding contiguous runs of blocks, each adding its own in the tree and
    shipping whole subtrees: the owner's sum has the same bits for every split, and a
    worker never holds more than log2(16) + 1 sums (its pending subtrees)."""
    from nvfp4_ray.calibration.hessians import HessianBlocks, reduce_partials

    generator = torch.Generator().manual_seed(blocks)
    # three forwards per block, of varied lengths and magnitudes: float sums that depend on order
    forwards = [torch.randn(1, 5 + i % 7, 24, generator=generator) * (1 + i % 5) ** 3 for i in range(3 * blocks)]
    results = set()
    for workers in sorted({1, 2, 3, 5, blocks}):
        subtrees, most_held = [], 0
        for w in range(workers):
            run = range(blocks * w // workers, blocks * (w + 1) // workers)
            sums = HessianBlocks({"x": 24}, 3, torch.device("cpu"))
            for block in run:
                for batch in range(3 * block, 3 * block + 3):
                    sums.add("x", batch, forwards[batch])
                most_held = max(most_held, len(sums.subtrees["x"]) + 1)
            subtrees += sums.partials()["x"] if len(run) else []
        hessian, count = reduce_partials(subtrees, torch.device("cpu"))
        assert count.item() == 3 * blocks
        assert most_held <= 5
        results.add(hessian.numpy().tobytes())
    assert len(results) == 1
    # the tree's sum is not the running sum: a split-dependent order would show
    running, _ = gptq.new_hessian(24, torch.device("cpu"))
    for x in forwards:
        gptq.add_to_hessian(running, torch.zeros(()), x)
    assert blocks == 1 or running.numpy().tobytes() not in results


@pytest.mark.parametrize("exact", [True, False])
def test_warm_up_solves_on_a_device(exact):
    """A GPTQ worker's start (LayerWorker._start_gptq, on a GPU) runs this small solve."""
    gptq.warm_up(torch.device("cpu"), exact)


def test_workers_know_a_gptq_job_from_its_command_line(tmp_path):
    """Workers start before the inputs are read (worker_start.start_workers), and a GPTQ
    job's make its steps ready from their start: --algorithm gptq, or a recipe that names
    a GPTQModifier; not for round-to-nearest, nor for a recipe that can't be read (the
    inputs' check reports it)."""
    from types import SimpleNamespace

    from nvfp4_ray.pipeline.worker_start import expects_gptq

    stage = "quant_stage:\n  quant_modifiers:\n    %s: {targets: [Linear], scheme: NVFP4}\n"
    (tmp_path / "gptq.yaml").write_text(stage % "GPTQModifier")
    (tmp_path / "rtn.yaml").write_text(stage % "QuantizationModifier")
    config = lambda recipe=None, algorithm="rtn": SimpleNamespace(  # noqa: E731
        recipe=recipe and str(tmp_path / recipe), algorithm=algorithm
    )
    assert expects_gptq(config(algorithm="gptq")) and not expects_gptq(config())
    assert expects_gptq(config("gptq.yaml")) and not expects_gptq(config("rtn.yaml"))
    assert not expects_gptq(config("missing.yaml"))


def test_only_workers_that_calibrate_make_gptq_ready(monkeypatch):
    """Workers start before the samples are read (start_workers); which of them calibrate
    a GPTQ job is known after (configure_workers, and GptqExecution through
    calibration_worker_count: one per Hessian block, one with --exact). Those that make
    GPTQ's steps ready from their start are the first most_gptq_workers: every worker that
    will calibrate, for fewer samples than asked for too, and only those that may; and
    only the calibrating ones are configured (configure would make the others ready too).
    The actor calls are recorded here: LayerWorker's own start is tested through every
    GPTQ job of the suite."""
    from types import SimpleNamespace

    from nvfp4_ray.calibration.batches import gptq_workers
    from nvfp4_ray.pipeline import worker_start

    configured = []
    monkeypatch.setattr(worker_start, "new_worker", lambda placement, i, gptq, exact: SimpleNamespace(i=i, gptq=gptq))
    monkeypatch.setattr(worker_start, "configure", lambda worker, config, model, gptq: configured.append((worker.i, gptq)))
    for exact in (False, True):
        for asked in (1, 2, 7, 16, 17, 40, 256):
            config = SimpleNamespace(recipe=None, algorithm="gptq", num_samples=asked, exact=exact, batch_tokens=None)
            for size in (1, 2, 3, 16, 20, 64):
                workers = worker_start.start_workers(SimpleNamespace(size=size), config)
                ready = [w.i for w in workers if w.gptq]
                assert ready == list(range(min(size, 1 if exact else 16, asked)))
                for samples in sorted({1, asked // 3 or 1, asked}):  # the rows the calibration file had
                    configured.clear()
                    inputs = SimpleNamespace(samples=[[0]] * samples, recipe=SimpleNamespace(gptq=object()),
                                             source=SimpleNamespace(config={}))  # fmt: skip
                    worker_start.configure_workers(workers, config, inputs)
                    calibrating = gptq_workers(size, samples, exact)
                    assert configured == [(i, True) for i in range(calibrating)]
                    assert calibrating == worker_start.calibration_worker_count(size, config, inputs.samples, True)
                    assert set(range(calibrating)) <= set(ready)


def test_a_worker_runs_llmcompressors_gptq_modules_alone():
    """A worker imports llm-compressor's block update and its helpers only (workers.
    _gptq_modules_alone), in a process set up as a worker is: not datasets, pandas or
    llm-compressor's entrypoints, which its package's __init__ imports. The GPTQ tests
    through workers (test_gptq_reference.py) check that the solves stay llm-compressor's."""
    import json
    import subprocess
    import sys

    code = """
import json, sys
from nvfp4_ray.pipeline import workers
for name in workers.UNUSED_BY_WORKERS:
    sys.modules.setdefault(name, None)
import nvfp4_ray.layer_quantizer
workers._gptq_modules_alone()
from nvfp4_ray.pipeline.gptq_worker import GptqSteps
from nvfp4_ray.formats import gptq
heavy = [m for m in ("datasets", "pyarrow", "pandas", "llmcompressor.entrypoints") if sys.modules.get(m) is not None]
print(json.dumps([sys.modules[gptq.gptq_block_update.__module__].__file__, heavy]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    source, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert source.endswith("llmcompressor/modifiers/gptq/gptq_quantize.py") and heavy == []


def test_routed_experts_gate_up_take_one_hessian_and_every_other_group_its_own():
    """Every routed expert runs on every token in calibration: their gate/up (Mixtral's
    w1/w3) share one Hessian, the first expert's; down_proj, shared experts and attention
    keep their own."""
    from types import SimpleNamespace

    from nvfp4_ray.calibration.hessians import hessian_inputs

    def group(*names):
        return [SimpleNamespace(local=name) for name in names]

    moe = "block_sparse_moe.experts"
    groups = [group("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), group(f"{moe}.0.w1", f"{moe}.0.w3"),
              group(f"{moe}.0.w2"), group(f"{moe}.1.w1", f"{moe}.1.w3"), group(f"{moe}.1.w2"),
              group("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), group("mlp.experts.7.up_proj"),
              group("mlp.experts.9.gate_proj", "mlp.experts.9.up_proj")]  # fmt: skip
    assert hessian_inputs(groups) == ["self_attn.q_proj", f"{moe}.0.w1", f"{moe}.0.w2", f"{moe}.0.w1", f"{moe}.1.w2",
                                      "mlp.shared_experts.gate_proj", "mlp.experts.7.up_proj", "mlp.experts.7.up_proj"]  # fmt: skip
