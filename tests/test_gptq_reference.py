"""GPTQ jobs against llm-compressor 0.14's GPTQModifier (oneshot, samples in file order),
tensor by tensor, and the default mode's independence from the number of workers."""

from __future__ import annotations

import json
import os

import pytest
from conftest import quantize
from reference import load_tensors

pytestmark = pytest.mark.usefixtures("ray_instance")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral3"])
def test_exact_gptq_is_byte_identical_to_llmcompressor(family, family_case, gptq_reference, tmp_path):
    case = family_case(family)
    out = str(tmp_path / "out")
    summary = quantize(case.source, out, case.calibration, ignore=case.ignore, exact=True, algorithm="gptq")

    ours, theirs = load_tensors(out), load_tensors(gptq_reference(family))
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert summary["gptq_round_to_nearest"] == []
    for name in ("config.json", "recipe.yaml"):
        with open(os.path.join(out, name)) as mine, open(os.path.join(gptq_reference(family), name)) as expected:
            assert mine.read() == expected.read(), name


def test_default_gptq_gives_the_same_bytes_on_any_number_of_workers(family_case, tmp_path):
    """Hessians summed in fixed blocks of samples, in block order: 1, 2 and 3 simulated
    nodes (one calibration worker each) write identical checkpoints."""
    import subprocess
    import sys

    from conftest import NUM_ROWS

    case = family_case("llama")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    checkpoints = []
    for nodes in (1, 2, 3):
        dest = str(tmp_path / f"nodes-{nodes}")
        process = subprocess.run(
            [sys.executable, os.path.join(repo, "tests", "simulated_cluster.py"), str(nodes), case.source, dest,
             case.calibration, str(NUM_ROWS), "--gptq"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert process.returncode == 0, process.stderr[-3000:]
        assert json.loads(process.stdout.strip().splitlines()[-1])["calibration_workers"] == nodes
        checkpoints.append(load_tensors(dest))
    assert checkpoints[1] == checkpoints[0] and checkpoints[2] == checkpoints[0]
