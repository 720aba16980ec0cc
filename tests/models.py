"""Small random checkpoints of every supported architecture, written as real safetensors.

Shapes differ per family, shards are small so that one layer (and its fused q/k/v or
gate/up siblings) spreads over several files, and a few input channels are scaled up to
mimic the outlier channels of trained models.
"""

from __future__ import annotations

import os
import shutil

import torch

# family -> (config class path, kwargs). Every in_features is a multiple of 16.
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512)),
    "mistral": ("MistralConfig", dict(hidden_size=192, intermediate_size=416, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, head_dim=32, vocab_size=2048, sliding_window=None,
                                      max_position_embeddings=512)),
    "qwen3": ("Qwen3Config", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=48, vocab_size=2048, tie_word_embeddings=True,
                                  max_position_embeddings=512)),
    "qwen2": ("Qwen2Config", dict(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=5,
                                  num_key_value_heads=1, vocab_size=2048, max_position_embeddings=512)),
    # Mixture-of-Experts: a dense first layer (mlp_only_layers, first_k_dense_replace), shared
    # experts (glm4_moe, deepseek_v3), MLA attention (deepseek_v3), odd expert widths
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=144, intermediate_size=272, moe_intermediate_size=80, num_experts=6,
                                         num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=32, vocab_size=2048, mlp_only_layers=[0],
                                         norm_topk_prob=True, max_position_embeddings=512)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=128, intermediate_size=208, moe_intermediate_size=48, num_experts=6,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=112, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, mlp_only_layers=[0],
                                         norm_topk_prob=False, max_position_embeddings=512)),
    "mixtral": ("MixtralConfig", dict(hidden_size=128, intermediate_size=176, num_local_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                      max_position_embeddings=512)),
    "glm4_moe": ("Glm4MoeConfig", dict(hidden_size=128, intermediate_size=240, moe_intermediate_size=48, n_routed_experts=8,
                                       num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048, n_group=1,
                                       topk_group=1, max_position_embeddings=512)),
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=160, intermediate_size=288, moe_intermediate_size=64, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                                             kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                                             vocab_size=2048, n_group=2, topk_group=1, max_position_embeddings=512)),
}  # fmt: skip
MOE_FAMILIES = ["deepseek_v3", "glm4_moe", "mixtral", "qwen2_moe", "qwen3_moe"]
# llm-compressor 0.14 fails on deepseek_v3 when calibration rows differ in length (a shape
# error in its traced forward); with rows of one length it runs, and is compared byte for byte.
EQUAL_LENGTH_ROWS = ("deepseek_v3",)
MISTRAL3_TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=2048, max_position_embeddings=1024)  # fmt: skip
MISTRAL3_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       image_size=64, patch_size=16)  # fmt: skip
DENSE_FAMILIES = sorted(set(FAMILIES) - set(MOE_FAMILIES)) + ["mistral3"]
MULTIMODAL_IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
# What llm-compressor must be told to ignore where nvfp4-ray ignores it by itself
# (nvfp4_ray.architecture.ALWAYS_IGNORED): the tests give nvfp4-ray ["lm_head"] alone
REFERENCE_IGNORE = {"qwen2_moe": ["re:.*shared_expert_gate$"]}


def build_model(family: str, seed: int = 0, **overrides):
    """``overrides``: config arguments in place of the family's (not for mistral3)."""
    import transformers

    torch.manual_seed(seed)
    if family == "mistral3":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration
        from transformers.models.ministral3 import Ministral3Config
        from transformers.models.pixtral import PixtralVisionConfig

        config = Mistral3Config(
            text_config=Ministral3Config(**MISTRAL3_TEXT).to_dict(),
            vision_config=PixtralVisionConfig(**MISTRAL3_VISION).to_dict(),
            image_token_index=10,
            spatial_merge_size=2,
        )
        model = Mistral3ForConditionalGeneration(config)
    else:
        class_name, kwargs = FAMILIES[family]
        config = getattr(transformers, class_name)(**{**kwargs, **overrides})
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = torch.randn(module.weight.shape, generator=generator) * 0.05
                outliers = torch.randint(0, weight.shape[1], (2,), generator=generator)
                weight[:, outliers] *= 12.0  # outlier input channels, as in trained models
                weight[0, :3] = -0.0  # negative zeros: their sign must be handled as the reference does
                module.weight.copy_(weight.to(torch.bfloat16))
        _randomize_moe(model, generator)
    return model


def _randomize_moe(model, generator) -> None:
    """Routed experts (3D parameters in transformers 5) and routers get random weights too;
    routers' correction biases stay float32, as real DeepSeek-V3 and GLM-4.x checkpoints hold them."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            for parameter in (module.gate_up_proj, module.down_proj):
                weight = torch.randn(parameter.shape, generator=generator) * 0.05
                outliers = torch.randint(0, weight.shape[-1], (2,), generator=generator)
                weight[..., outliers] *= 12.0
                parameter.copy_(weight.to(parameter.dtype))
        if name.endswith(".gate") and hasattr(module, "weight") and not isinstance(module, torch.nn.Linear):
            module.weight.copy_((torch.randn(module.weight.shape, generator=generator) * 0.2).to(module.weight.dtype))
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                module.e_score_correction_bias = torch.randn(bias.shape, generator=generator, dtype=torch.float32) * 0.05


def save_model(model, path: str, tokenizer_dir: str, max_shard_size: str = "150KB") -> str:
    model.save_pretrained(path, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    return path


def add_mtp_layer(path: str, hidden: int, index: int = 61) -> None:
    """Tensors of a multi-token-prediction layer, as DeepSeek-V3 checkpoints carry at layer
    61, in a shard of their own: transformers does not load them (nor writes them back)."""
    import json

    from safetensors.torch import save_file

    tensors = {f"model.layers.{index}.eh_proj.weight": torch.randn(hidden, 2 * hidden).to(torch.bfloat16),
               f"model.layers.{index}.enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               f"model.layers.{index}.hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}  # fmt: skip
    save_file(tensors, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = os.path.join(path, "model.safetensors.index.json")
    index_json = json.load(open(index_path))
    index_json["weight_map"].update(dict.fromkeys(tensors, "model-mtp.safetensors"))
    json.dump(index_json, open(index_path, "w"), indent=2)


def random_rows(count: int, vocab: int, min_len: int = 8, max_len: int = 48, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        rows.append(torch.randint(0, vocab, (length,), generator=generator).tolist())
    return rows


def write_rows(rows: list[list[int]], path: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": rows}), path)
    return path
