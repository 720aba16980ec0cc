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



def test_default_mode_calibrates_with_the_causal_mask(family_case, moe_runs, reference):
    """qwen3_moe and mixtral: the default mode's input scales are those of a plain forward
    of the whole model (causal mask, every expert on every token); weights are the reference's."""
    from reference import full_forward_input_scales

    for family in MASKLESS_IN_REFERENCE:
        case = family_case(family)
        ours = reference_names(family, load_tensors(moe_runs(family, exact=False)))
        theirs = load_tensors(reference(family))
        truth = full_forward_input_scales(case.source, case.rows)
        if family == "mixtral":  # module names -> llm-compressor's checkpoint names
            truth = {name.replace(".mlp.", ".block_sparse_moe."): value for name, value in truth.items()}
        scales = {n.removesuffix(".input_global_scale"): scale_of(v[2]) for n, v in ours.items() if n.endswith("input_global_scale")}
        assert scales == truth, family
        # the reference's (maskless) scales differ: the mode matters
        assert any(scale_of(theirs[f"{n}.input_global_scale"][2]) != s for n, s in scales.items()), family
        assert all(ours[n] == theirs[n] for n in theirs if not n.endswith(".input_global_scale")), family


def test_quantized_checkpoint_loads_in_transformers_and_generates(family_case, moe_runs):
    """Through compressed-tensors, one quantized Linear per expert: every expert weight the
    model holds is the checkpoint's NVFP4 weight (not an initialization), and it generates."""
    from transformers import AutoModelForCausalLM

    from nvfp4_ray.experts import loading_linearized
    from nvfp4_ray.formats.nvfp4 import PackedWeight, dequantize_weight

    for family in ("mixtral", "deepseek_v3"):
        out = moe_runs(family, exact=family in MASKLESS_IN_REFERENCE)
        tensors = load_tensors(out)
        with loading_linearized(family):
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        experts = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
        assert experts
        with torch.no_grad():
            model(input_ids=torch.tensor([[1]]))  # compressed-tensors decompresses in the first forward
        for name, module in experts:
            prefix = name.replace(".mlp.", ".block_sparse_moe.") if family == "mixtral" else name
            packed = PackedWeight(*(_tensor(tensors[f"{prefix}.{part}"]) for part in ("weight_packed", "weight_scale", "weight_global_scale")))
            assert torch.equal(module.weight, dequantize_weight(packed)), name
        generated = model.generate(torch.tensor([case_prompt(family_case(family))]), max_new_tokens=8, do_sample=False)
        assert generated.shape == (1, 16)


def case_prompt(case) -> list[int]:
    return case.rows[0][:8]


def _tensor(value) -> torch.Tensor:
    dtype, shape, raw = value
    return torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype.removeprefix("torch."))).reshape(shape)


@pytest.mark.parametrize(
    "ignore, fragment",
    [
        # vLLM runs a layer's experts as one kernel with one scheme
        ("re:.*layers\\.1\\.mlp\\.experts\\.3\\..*", "the experts of model.layers.1.mlp are not all quantized alike"),
        # an expert's gate/up are fused siblings: one GEMM, one global scale
        ("model.layers.2.mlp.experts.0.up_proj", "splits the fused group model.layers.2.mlp.experts.0.gate_proj"),
    ],
)
def test_ignore_lists_vllm_cannot_serve_are_refused(ignore, fragment, family_case, tmp_path):
    from conftest import run_cli

    case = family_case("qwen3_moe")
    dest = str(tmp_path / "dest")
    code, stdout, stderr = run_cli("quantize", case.source, dest, "--calibration", case.calibration, "--num-samples", "6",
                                   "--max-seq-len", "64", "--ignore", "lm_head", ignore)  # fmt: skip
    assert code == 2 and fragment in stderr.splitlines()[-1], stderr
    assert json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 2
    assert not os.path.exists(dest)


def test_ignoring_every_expert_of_a_layer_is_allowed(family_case, tmp_path):
    """All experts of a layer left in bf16 is one scheme for vLLM: accepted, and the
    quantization_config lists each of them under the checkpoint's names."""
    case = family_case("mixtral")
    out = str(tmp_path / "out")
    quantize(case.source, out, case.calibration, ignore=["lm_head", "re:.*layers\\.1\\.mlp\\.experts\\..*"])
    ignored = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["ignore"]
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in ignored
    assert "model.layers.0.block_sparse_moe.gate" in ignored  # routers, as llm-compressor lists them
    tensors = load_tensors(out)
    assert tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"][0] == "torch.bfloat16"
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_packed" in tensors


def test_an_expert_changed_in_source_recomputes_its_layer(family_case, moe_runs, tmp_path):
    """--if-changed: one expert's tensor rewritten in SOURCE redoes the layers whose
    tensors share its shard (and the input scales), reuses the others, and ends
    byte-identical to a fresh run on the new source."""
    import shutil

    from test_requantize import change_tensor, index_files

    case = family_case("glm4_moe")
    source, dest = str(tmp_path / "source"), str(tmp_path / "dest")
    shutil.copytree(case.source, source)  # copies keep their mtimes: the identities the first run saw
    shutil.copytree(moe_runs("glm4_moe", exact=False), dest)
    changed = change_tensor(source, "model.layers.2.mlp.experts.5.gate_proj.weight")  # and so its down_proj input
    changed_layers = {int(name.split(".")[2]) for name in changed if name.startswith("model.layers.")}
    summary = quantize(source, dest, case.calibration, if_changed=True)
    assert summary["status"] == "succeeded"
    assert summary["units_computed"] == len(changed_layers) + 1
    assert summary["units_reused"] == 3 - len(changed_layers) + 1  # other layers + the copy unit
    fresh = str(tmp_path / "fresh")
    quantize(source, fresh, case.calibration)
    assert index_files(dest) == index_files(fresh)
    assert load_tensors(dest) == load_tensors(fresh)


def test_kimi_k2_config_runs_as_deepseek_v3(family_case, moe_runs, tmp_path):
    """Kimi-K2's config.json says model_type kimi_k2 (its remote code), over DeepSeek-V3's
    layers: the same tensors as the DeepSeek-V3 run, and config.json keeps kimi_k2."""
    import shutil

    case = family_case("deepseek_v3")
    source = str(tmp_path / "kimi")
    shutil.copytree(case.source, source)
    config_path = os.path.join(source, "config.json")
    config = json.load(open(config_path))
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    json.dump(config, open(config_path, "w"), indent=2)
    out = str(tmp_path / "out")
    quantize(source, out, case.calibration)
    assert load_tensors(out) == load_tensors(moe_runs("deepseek_v3", exact=False))
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["model_type"] == "kimi_k2" and written["quantization_config"]["format"] == "nvfp4-pack-quantized"
