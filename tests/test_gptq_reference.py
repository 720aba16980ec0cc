"""GPTQ jobs against llm-compressor 0.14's GPTQModifier (oneshot, samples not shuffled),
tensor by tensor: dense and Mixture-of-Experts families, and Linears whose Hessian is not
positive definite; and the default mode's independence from the number of workers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import quantize
from reference import load_tensors

pytestmark = pytest.mark.usefixtures("ray_instance")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral3", "qwen3_moe"])
def test_exact_gptq_is_byte_identical_to_llmcompressor(family, family_case, gptq_reference, tmp_path):
    """qwen3_moe: llm-compressor linearizes the experts itself and runs every expert on every
    token (moe_calibrate_all_experts), so each expert's Hessian is over all tokens, with one
    sample counted per forward, as a dense Linear's."""
    case = family_case(family)
    out = str(tmp_path / "out")
    summary = quantize(case.source, out, case.calibration, ignore=case.ignore, exact=True, algorithm="gptq")

    ours, theirs = load_tensors(out), load_tensors(gptq_reference(family))
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert summary["gptq_round_to_nearest"] == []
    # the GPTQ start, each step timed, in the summary (the worker's, merged in after the layers)
    steps = {"gptq_runtime_s", "gptq_imports_wait_s", "gptq_warm_up_s", "gptq_ready_s", "gptq_first_step_wait_s"}
    assert steps <= set(summary["worker_startup_s"][0])
    for name in ("config.json", "recipe.yaml"):
        with open(os.path.join(out, name)) as mine, open(os.path.join(gptq_reference(family), name)) as expected:
            assert mine.read() == expected.read(), name


def test_default_gptq_gives_the_same_bytes_on_any_number_of_workers(family_case, tmp_path):
    """Hessians summed in fixed blocks of samples, in block order: jobs with 1, 2 and 3
    calibration workers, each on its own (fake) GPU node of one simulated 3-node cluster,
    write identical checkpoints."""
    import subprocess
    import sys

    from conftest import NUM_ROWS

    case = family_case("llama")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    dest = str(tmp_path / "cluster")
    process = subprocess.run(
        [sys.executable, os.path.join(repo, "tests", "simulated_cluster.py"), "3", case.source, dest,
         case.calibration, str(NUM_ROWS), "--gptq", "--workers", "1,2,3"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summaries = json.loads(process.stdout.strip().splitlines()[-1])
    assert [s["calibration_workers"] for s in summaries] == [1, 2, 3]
    assert [len(s["layer_reads_per_node"]) for s in summaries] == [1, 2, 3]  # one node per worker
    checkpoints = [load_tensors(os.path.join(dest, f"workers-{n}")) for n in (1, 2, 3)]
    assert checkpoints[1] == checkpoints[0] and checkpoints[2] == checkpoints[0]


def test_a_hessian_that_is_not_positive_definite_falls_back_to_round_to_nearest(family_case, reference, tmp_path):
    """No dampening (dampening_frac 0) and fewer calibration tokens than a Linear's inputs:
    its Hessian is singular, its Cholesky fails and llm-compressor quantizes it with
    round-to-nearest, warning. 8 rows of 40-48 tokens: the 256-input Linears get a full-rank
    Hessian, each down_proj (512 inputs) a singular one. Byte-identical to llm-compressor's
    run with the same recipe; the fallen-back weights have round-to-nearest's values; the warning
    and the summary name exactly them."""
    import io

    from llmcompressor.modifiers.gptq import GPTQModifier
    from models import random_rows, write_rows
    from reference import run_llmcompressor

    case = family_case("llama")
    rows = random_rows(8, 2048, min_len=40, max_len=48, seed=5)
    calibration = write_rows(rows, str(tmp_path / "calibration.parquet"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier: {targets: [Linear], scheme: NVFP4, "
                      "ignore: [lm_head], dampening_frac: 0.0}\n")  # fmt: skip
    out, events = str(tmp_path / "out"), io.StringIO()
    summary = quantize(case.source, out, calibration, events=events, num_samples=8, exact=True, recipe=str(recipe))

    down = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert summary["gptq_round_to_nearest"] == down
    (warning,) = [e for e in map(json.loads, events.getvalue().splitlines()) if e["event"] == "warning" and "linears" in e]
    assert warning["linears"] == down and all(name in warning["message"] for name in down)

    modifier = GPTQModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"], dampening_frac=0.0)
    theirs = run_llmcompressor(case.source, rows, ["lm_head"], str(tmp_path / "reference"), recipe=modifier, shuffle=False)
    ours, theirs, rtn = load_tensors(out), load_tensors(theirs), load_tensors(reference("llama"))
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    for name in ours:
        if name.endswith(".weight_packed"):  # GPTQ's own weights except where it fell back
            same = torch.equal(fp4_values(ours[name][2]), fp4_values(rtn[name][2]))
            assert same == (name.rsplit(".", 1)[0] in down), name


def fp4_values(raw: bytes):
    """The FP4 codes of a packed weight with -0 (code 8) read as +0 (code 0): GPTQ writes
    +0 where round-to-nearest writes -0 (a weight it rounds to zero is dequantized, then
    packed again), in llm-compressor as here; the values are the same."""
    packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    codes = torch.stack([packed & 15, packed >> 4])
    return torch.where(codes == 8, 0, codes)
