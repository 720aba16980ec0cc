"""Benchmark inputs: a Llama-, Qwen3-MoE- or DeepSeek-V3-shaped checkpoint with random weights, a
tokenizer built in code, and random calibration rows.

The checkpoint is written tensor by tensor as sharded bf16 safetensors with the Hugging
Face names, so the whole model is never in memory (the largest tensor is). Weights are
normal * 0.02 with a few input channels of every decoder Linear scaled by 10, like the
outlier channels of trained models; each tensor has its own seed, so the bytes depend
only on the shape and the seed (and on the device that drew them: CUDA when present).

run.py writes the checkpoint in a child process, ``python -m bench.model SPEC_JSON DIR``,
so that the benchmark's own process never holds a CUDA context or the generator's memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time

import torch

from bench import log

PRESETS = {
    "8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256, samples=128, seq_len=1024),
    "8b-16": dict(hidden=4096, layers=16, intermediate=14336, heads=32, kv_heads=8, vocab=128256, samples=128, seq_len=1024),
    "tiny": dict(hidden=512, layers=4, intermediate=1536, heads=8, kv_heads=2, vocab=8192, samples=32, seq_len=128),
    # a ~1B model for CPU boxes: big enough that loading, saving and two passes per layer count
    "1b-cpu": dict(hidden=2048, layers=16, intermediate=5632, heads=16, kv_heads=4, vocab=32000, samples=16, seq_len=256),
    # the decoder layer of Mistral-Medium-3.5 (128B), Llama layout, a few layers: per-layer seconds and GPU memory
    "mm35": dict(hidden=12288, layers=4, intermediate=28672, heads=96, kv_heads=8, vocab=131072, samples=256, seq_len=1024),
    # Qwen3-30B-A3B with 8 of its 48 layers: 128 experts (8 per token), head_dim 128 (> hidden / heads), q/k norms
    "moe": dict(arch="qwen3_moe", hidden=2048, layers=8, intermediate=6144, moe_intermediate=768, experts=128,
                experts_per_tok=8, heads=32, kv_heads=4, head_dim=128, vocab=151936, samples=256, seq_len=1024),
    # DeepSeek-V3's own dimensions (transformers' defaults: MLA, 256 experts of 2048, top-8, a
    # shared expert, a dense first layer): a dense layer and one 22 GB MoE layer stand for the 61
    "dsv3": dict(arch="deepseek_v3", hidden=7168, layers=2, intermediate=18432, heads=128, kv_heads=128, vocab=129280,
                 samples=256, seq_len=1024),
}  # fmt: skip
CALIBRATION_KEYS = ("samples", "seq_len")  # the rest of a preset is the model's shape
# tiny: several shards all the same; the others: every decoder layer spans two shards or more
SHARD_BYTES = {"8b": 5 * 10**9, "8b-16": 5 * 10**9, "tiny": 10**7, "1b-cpu": 5 * 10**8, "mm35": 2 * 10**9, "moe": 10**9,
               "dsv3": 5 * 10**9}  # fmt: skip
OUTLIER_CHANNELS = 4
SPEC_FILE = "bench-model.json"  # written last: a folder without it holds no finished model
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def preset_shape(preset: dict) -> dict:
    """The model's shape from a preset: everything but the calibration set."""
    return {key: value for key, value in preset.items() if key not in CALIBRATION_KEYS}


def tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in Hugging Face order."""
    if shape.get("arch") == "deepseek_v3":
        return _meta_tensor_shapes(shape)
    hidden, layer = shape["hidden"], _qwen3_moe_layer if shape.get("arch") == "qwen3_moe" else _llama_layer
    tensors = [("model.embed_tokens.weight", (shape["vocab"], hidden))]
    for i in range(shape["layers"]):
        tensors += [(f"model.layers.{i}.{name}", size) for name, size in layer(shape)]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (shape["vocab"], hidden))]
    return tensors


def _attention(shape: dict, norms: bool) -> list[tuple[str, tuple[int, ...]]]:
    hidden, head_dim = shape["hidden"], shape.get("head_dim", shape["hidden"] // shape["heads"])
    q, kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    tensors = [
        ("self_attn.q_proj.weight", (q, hidden)),
        ("self_attn.k_proj.weight", (kv, hidden)),
        ("self_attn.v_proj.weight", (kv, hidden)),
        ("self_attn.o_proj.weight", (hidden, q)),
    ]
    if norms:  # Qwen3: RMSNorm of each head's queries and keys
        tensors += [("self_attn.q_norm.weight", (head_dim,)), ("self_attn.k_norm.weight", (head_dim,))]
    return tensors


def _llama_layer(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter = shape["hidden"], shape["intermediate"]
    return [
        ("input_layernorm.weight", (hidden,)),
        *_attention(shape, norms=False),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]


def _qwen3_moe_layer(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """As Qwen3-MoE checkpoints hold it: the router (mlp.gate) and one 2D tensor per expert and projection."""
    hidden, inter = shape["hidden"], shape["moe_intermediate"]
    tensors = [
        ("input_layernorm.weight", (hidden,)),
        *_attention(shape, norms=True),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate.weight", (shape["experts"], hidden)),
    ]
    for e in range(shape["experts"]):
        tensors += [
            (f"mlp.experts.{e}.gate_proj.weight", (inter, hidden)),
            (f"mlp.experts.{e}.up_proj.weight", (inter, hidden)),
            (f"mlp.experts.{e}.down_proj.weight", (hidden, inter)),
        ]
    return tensors


def _meta_tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint's tensors as nvfp4-ray's meta model declares them (one 2D tensor per
    expert and projection, as DeepSeek-V3 checkpoints hold them)."""
    from nvfp4_ray.architecture import build_meta_model

    model = build_meta_model(_config(shape).to_dict())
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def model_is_written(folder: str, spec: dict) -> bool:
    try:
        with open(os.path.join(folder, SPEC_FILE)) as handle:
            return json.load(handle)["spec"] == spec
    except (OSError, ValueError, KeyError):
        return False


def write_model(spec: dict, folder: str) -> None:
    """Write the checkpoint for ``spec`` ({"shape", "seed", "shard_bytes"}) into ``folder``."""
    start = time.monotonic()
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, SPEC_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    shape = spec["shape"]
    _write_config(folder, shape)
    _write_tokenizer(folder, shape["vocab"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device)
    shards = _shards(tensor_shapes(shape), spec["shard_bytes"])
    weight_map, index = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(_safetensors_header(shard))
            for tensor_name, tensor_shape in shard:
                generator.manual_seed(spec["seed"] * 1_000_003 + index)
                handle.write(_random_tensor(tensor_name, tensor_shape, generator, device).view(torch.uint8).numpy())
                weight_map[tensor_name] = name
                index += 1
            handle.flush()
            os.fsync(handle.fileno())  # written means on disk: the cold reads after this really read it
        log(f"wrote {name}")
    total = sum(math.prod(s) * 2 for _, s in tensor_shapes(shape))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    seconds = time.monotonic() - start
    with open(marker, "w") as handle:
        json.dump({"spec": spec, "device": device.type, "write_s": round(seconds, 3)}, handle, indent=2)


def _shards(tensors: list, shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _safetensors_header(tensors: list) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file of bf16 tensors, in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _random_tensor(name: str, shape: tuple, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights, as initialised
        return torch.ones(shape, dtype=torch.bfloat16)
    weight = torch.randn(shape, generator=generator, device=device) * 0.02
    if ".layers." in name:
        columns = torch.randint(0, shape[1], (OUTLIER_CHANNELS,), generator=generator, device=device)
        weight[:, columns] *= 10.0
    return weight.to(torch.bfloat16).cpu()


def _write_config(folder: str, shape: dict) -> None:
    _config(shape).save_pretrained(folder)


def _config(shape: dict):
    from transformers import DeepseekV3Config, LlamaConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        bos_token_id=1,  # the tokenizer's <s> and </s>
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    if shape.get("arch") == "deepseek_v3":  # DeepSeek-V3's settings are the config's defaults
        return DeepseekV3Config(architectures=["DeepseekV3ForCausalLM"], first_k_dense_replace=1, **common)
    if shape.get("arch") == "qwen3_moe":  # Qwen3-30B-A3B's settings
        return Qwen3MoeConfig(
            architectures=["Qwen3MoeForCausalLM"],
            head_dim=shape["head_dim"],
            moe_intermediate_size=shape["moe_intermediate"],
            num_experts=shape["experts"],
            num_experts_per_tok=shape["experts_per_tok"],
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            **common,
        )
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        **common,
    )


def _write_tokenizer(folder: str, vocab: int) -> None:
    """A word-level tokenizer with one token per id ("t<id>"): llm-compressor's oneshot needs
    a processor object, and there is none to download on an offline machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [f"t{i}" for i in range(len(SPECIAL_TOKENS), vocab)]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)


def write_calibration(path: str, samples: int, seq_len: int, vocab: int, seed: int) -> None:
    """``samples`` rows of exactly ``seq_len`` random token ids, as a Parquet input_ids column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.random.default_rng(seed).integers(0, vocab, size=samples * seq_len, dtype=np.int64)
    offsets = np.arange(0, samples * seq_len + 1, seq_len, dtype=np.int32)
    pq.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))}), path)


if __name__ == "__main__":
    write_model(json.loads(sys.argv[1]), sys.argv[2])
