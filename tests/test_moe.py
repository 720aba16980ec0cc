"""Mixture-of-Experts checkpoints against llm-compressor, tensor by tensor.

Every expert is calibrated on every token (llm-compressor's moe_calibrate_all_experts)
while the layer output that propagates uses the routed experts only. The random models
(tests/models.py) have a dense first layer, shared experts (glm4_moe, deepseek_v3), MLA
attention (deepseek_v3) and experts of one layer spread over several shards.

* qwen3_moe and mixtral build their causal mask the way llm-compressor 0.14 drops (see
  architecture.REFERENCE_DROPS_CAUSAL_MASK): ``--exact`` is byte-identical to it, the
  default mode is checked against a plain (untraced) forward with the causal mask.
* glm4_moe and deepseek_v3: the default mode is byte-identical (``--exact`` changes nothing).
* Mixtral keeps its checkpoint's w1/w3/w2 names (llm-compressor writes gate/up/down_proj,
  which vLLM's Mixtral loader does not read).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import quantize
from models import MOE_FAMILIES
from reference import load_tensors

pytestmark = pytest.mark.usefixtures("ray_instance")
MASKLESS_IN_REFERENCE = ("mixtral", "qwen3_moe")
MIXTRAL_NAMES = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def reference_names(family: str, tensors: dict) -> dict:
    """Our tensors under the names llm-compressor gives them."""
    if family != "mixtral":
        return tensors
    renamed = {}
    for name, value in tensors.items():
        for ours, theirs in MIXTRAL_NAMES.items():
            name = name.replace(ours, theirs)
        renamed[name] = value
    return renamed


@pytest.fixture(scope="module")
def moe_runs(family_case, reference, tmp_path_factory):
    """(family, exact) -> our output folder, each made once."""
    cache = {}

    def get(family: str, exact: bool) -> str:
        if (family, exact) not in cache:
            case = family_case(family)
            out = str(tmp_path_factory.mktemp(f"{family}-{'exact' if exact else 'default'}") / "out")
            quantize(case.source, out, case.calibration, ignore=case.ignore, exact=exact)
            cache[family, exact] = out
        return cache[family, exact]

    return get


def scale_of(raw: bytes) -> float:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).item()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_checkpoint_is_byte_identical_to_llmcompressor(family, moe_runs, reference):
    out = moe_runs(family, exact=family in MASKLESS_IN_REFERENCE)
    ref = reference(family)
    ours, theirs = reference_names(family, load_tensors(out)), load_tensors(ref)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    experts = [n for n in ours if ".experts." in n and n.endswith(".input_global_scale")]
    assert experts and len(experts) == sum(".experts." in n and n.endswith(".weight_packed") for n in ours)
    for name in ("config.json", "recipe.yaml"):
        with open(os.path.join(out, name)) as mine, open(os.path.join(ref, name)) as expected:
            assert mine.read() == expected.read(), name

