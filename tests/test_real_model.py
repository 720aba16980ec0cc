"""The real pretrained SmolLM2-135M-Instruct: byte-identical to llm-compressor on real
text, and the demo's checkpoint (with its quality report) loads in transformers and still
answers correctly."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli
from reference import load_tensors

pytestmark = [pytest.mark.usefixtures("ray_instance"), pytest.mark.slow]


def test_smollm2_is_byte_identical_to_llmcompressor(smollm2_quantized):
    out, reference, _ = smollm2_quantized
    ours, theirs = load_tensors(out), load_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert sum(name.endswith(".weight_packed") for name in ours) == 30 * 7
    for name in ("config.json", "recipe.yaml"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(reference, name)).read()


def test_demo_output_loads_in_transformers_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nvfp4_ray.quality.evaluate import headline

    dest = str(tmp_path / "demo")
    code, stdout, stderr = run_cli("demo", dest)
    assert code == 0, stderr
    line = stdout.strip().splitlines()[-1]
    summary = json.loads(line)
    assert summary["status"] == "succeeded" and summary["linears_quantized"] == 210
    assert len(line) < 2500  # one short line: the SQNR of each of the 210 Linears is in the manifest
    assert f"output            {dest}" in stderr  # the human summary says where the output is
    assert os.path.exists(os.path.join(dest, "_SUCCESS"))
    # the demo evaluates before committing: the report is in the manifest and printed after the summary
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    assert len(manifest["quality"]["weight_sqnr_db"]["per_linear"]) == 210
    assert summary["quality"] == headline(manifest["quality"])
    assert summary["quality"]["weight_sqnr_db"]["linears"] == 210
    assert stderr.index("Quality of QUANT against BASE") > stderr.index(f"output            {dest}")

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
