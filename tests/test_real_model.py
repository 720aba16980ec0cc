"""The real pretrained SmolLM2-135M-Instruct: byte-identical to llm-compressor on real
text, and the demo's checkpoint loads in transformers and still answers correctly."""

from __future__ import annotations

import json
import os

import pytest
from conftest import quantize, run_cli
from reference import load_tensors, run_llmcompressor

pytestmark = [pytest.mark.usefixtures("ray_instance"), pytest.mark.slow]


def test_smollm2_is_byte_identical_to_llmcompressor(smollm2, tmp_path):
    import pyarrow.parquet as pq

    from nvfp4_ray.demo import demo_calibration

    calibration = demo_calibration(smollm2, 12, 128)
    rows = pq.read_table(calibration).column("input_ids").to_pylist()
    reference = run_llmcompressor(smollm2, rows, ["lm_head"], str(tmp_path / "reference"))
    out = str(tmp_path / "out")
    quantize(smollm2, out, calibration, num_samples=len(rows), max_seq_len=128)

    ours, theirs = load_tensors(out), load_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert sum(name.endswith(".weight_packed") for name in ours) == 30 * 7
    for name in ("config.json", "recipe.yaml"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(reference, name)).read()


def test_demo_output_loads_in_transformers_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = str(tmp_path / "demo")
    code, stdout, stderr = run_cli("demo", dest)
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["linears_quantized"] == 210
    assert f"output            {dest}" in stderr  # the human summary says where the output is
    assert os.path.exists(os.path.join(dest, "_SUCCESS"))

    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert json.load(open(os.path.join(dest, "config.json")))["quantization_config"]["format"] == "nvfp4-pack-quantized"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])
    assert "Paris" in answer
