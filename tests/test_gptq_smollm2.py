"""GPTQ on the real pretrained SmolLM2-135M-Instruct, on 8 rows of 128 tokens of the demo
calibration set: ``--exact`` is byte-identical to llm-compressor's GPTQModifier, and the
default mode (Hessians summed in blocks of samples) is as good as it (perplexity within
1%) and closer to the bf16 model than round-to-nearest (mean KL), by `nvfp4-ray
evaluate` on the first 4096 tokens of CPython's docs."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import quantize
from reference import load_tensors

from nvfp4_ray.quality.evaluate import EvaluateOptions, evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.usefixtures("ray_instance"), pytest.mark.slow]
ROWS, SEQ_LEN = 8, 128
# GPTQ solves each Linear column by column: on 2 CPU cores all 210 Linears take 1-2
# minutes per run (llm-compressor 62 s, nvfp4-ray 105 s), so the tests solve the first
# two layers' 14 Linears and leave the others in bf16 (the whole model still runs in
# every forward). docs/gptq.md has the whole model's numbers.
IGNORE = ["lm_head", r"re:model\.layers\.([2-9]|[12][0-9])\..*"]


@pytest.fixture(scope="module")
def smollm2_gptq(smollm2, tmp_path_factory):
    """name -> checkpoint folder: llm-compressor's GPTQ (samples not shuffled), ours with
    --exact and in the default mode, and round-to-nearest, all from the same rows."""
    import pyarrow.parquet as pq
    from llmcompressor.modifiers.gptq import GPTQModifier
    from reference import run_llmcompressor

    from nvfp4_ray.demo import demo_calibration

    folder = tmp_path_factory.mktemp("smollm2-gptq")
    calibration = demo_calibration(smollm2, ROWS, SEQ_LEN)
    rows = pq.read_table(calibration).column("input_ids").to_pylist()
    recipe = GPTQModifier(targets="Linear", scheme="NVFP4", ignore=IGNORE)
    reference = run_llmcompressor(smollm2, rows, IGNORE, str(folder / "reference"), recipe=recipe, shuffle=False)
    folders = {"reference": reference}
    runs = {"exact": dict(exact=True, algorithm="gptq"), "default": dict(algorithm="gptq"), "rtn": {}}
    for name, options in runs.items():
        folders[name] = str(folder / name)
        summary = quantize(smollm2, folders[name], calibration, num_samples=ROWS, max_seq_len=SEQ_LEN, ignore=IGNORE,
                           **options)
        if name != "rtn":
            assert summary["gptq_round_to_nearest"] == [], name
    return folders


def test_exact_gptq_on_smollm2_is_byte_identical_to_llmcompressor(smollm2_gptq):
    ours, theirs = load_tensors(smollm2_gptq["exact"]), load_tensors(smollm2_gptq["reference"])
    assert sorted(ours) == sorted(theirs)
    assert sum(name.endswith(".weight_packed") for name in ours) == 2 * 7
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    # GPTQ moved the weights: not round-to-nearest's bytes
    rtn = load_tensors(smollm2_gptq["rtn"])
    packed = [name for name in ours if name.endswith(".weight_packed")]
    assert sum(ours[name] != rtn[name] for name in packed) == len(packed)


def test_default_gptq_on_smollm2_is_as_good_as_llmcompressor_and_closer_than_rtn(smollm2, smollm2_gptq, tmp_path):
    # The held-out text: the first 4096 tokens of CPython's docs (the shipped text,
    # 1440 tokens, moved llm-compressor's own perplexity by 6% between sample orders)
    if REPO not in sys.path:  # bench/ is imported from the checkout
        sys.path.insert(0, REPO)
    from bench.gptq_quality_probe import pydoc_text

    text = pydoc_text(str(tmp_path / "pydoc-topics.txt"))
    names = ("default", "reference", "rtn")
    reports = {name: evaluate(EvaluateOptions(base=smollm2, quant=smollm2_gptq[name], text=text)) for name in names}
    ppl = {name: report["perplexity"]["quant"] for name, report in reports.items()}
    print(json.dumps({"base": reports["rtn"]["perplexity"]["base"], **ppl,
                      **{f"kl_{name}": report["mean_kl"] for name, report in reports.items()}}))  # fmt: skip
    # the default mode sums the Hessians in other blocks (other float roundings) and runs
    # SDPA attention: other bytes, the same quality
    assert load_tensors(smollm2_gptq["default"]) != load_tensors(smollm2_gptq["reference"])
    assert abs(ppl["default"] / ppl["reference"] - 1) < 0.01
    # GPTQ stays closer to the bf16 model than round-to-nearest (mean KL: measured 0.0293,
    # llm-compressor 0.0297, round-to-nearest 0.0420). Its perplexity beats round-to-
    # nearest's by only 0.5% from 8 rows on 2 layers (base 14.72, default 14.96,
    # llm-compressor 14.98, round-to-nearest 15.05): not asserted.
    assert reports["default"]["mean_kl"] < reports["rtn"]["mean_kl"]
    assert reports["reference"]["mean_kl"] < reports["rtn"]["mean_kl"]
