"""The benchmark harness end to end on the CPU, as a user runs it (python bench/run.py):
a 2-layer tiny model, a few calibration rows, llm-compressor and nvfp4-ray, the comparison
and the JSON record."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every record must have these (issue 5, "The benchmark").
REQUIRED_FIELDS = (
    "device", "date", "gpus", "model", "params", "samples", "seq_len", "llmcompressor_s", "nvfp4_ray_s",
    "speedup_vs_llmcompressor", "outputs_equal", "stages_s", "calibration_tokens_per_s", "weight_gb_per_s",
    "peak_rss_gib", "peak_gpu_gib", "source_read_s", "calibration_speedup_vs_1gpu",
)  # fmt: skip


@pytest.mark.slow
def test_tiny_benchmark_writes_a_complete_record(tmp_path):
    results = tmp_path / "results"
    command = [
        sys.executable, os.path.join(REPO, "bench", "run.py"), "--preset", "tiny", "--layers", "2",
        "--samples", "4", "--seq-len", "32", "--work", str(tmp_path / "work"), "--out", str(results),
        # evict the model's pages only: a whole-cache drop (the default where root may) makes the
        # machine read every package back, three times, which takes most of a minute on CI
        "--page-cache", "fadvise",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    (path,) = glob.glob(str(results / "*-tiny-2L-0gpu.json"))
    with open(path) as handle:
        record = json.load(handle)
    assert [field for field in REQUIRED_FIELDS if field not in record] == []
    assert record["outputs_equal"] is True
    assert record["max_input_scale_diff_bf16_steps"] == 0
    assert (record["gpus"], record["samples"], record["seq_len"]) == (0, 4, 32)
    assert record["model"] == "random-llama-tiny-2L"
    assert record["llmcompressor_s"] > 0 and record["nvfp4_ray_s"] > 0 and record["source_read_s"] > 0
    assert record["peak_rss_gib"] > 0 and record["peak_gpu_gib"] is None
    assert {"plan", "layers", "commit"} <= set(record["stages_s"])
    assert record["calibration_speedup_vs_1gpu"] is None  # one run, on the CPU
    assert set(record["page_cache_drop"].values()) == {"fadvise"}
    assert "speedup_vs_llmcompressor" in done.stdout  # the table
