"""config.json for the output, written by the same functions llm-compressor uses.

llm-compressor's save path: transformers serializes the config, ``resave_config`` puts
the source's own config.json back (patching dtype and tie_word_embeddings), and
compressed-tensors' ``ModelCompressor.update_config`` adds ``quantization_config``. We run
that path on a meta-device model carrying the recipe's schemes, so the file is
byte-identical to the reference's; only the ignore list is set from our own name map,
which follows the source's tensor naming.
"""

from __future__ import annotations

import os
import tempfile

import torch

from nvfp4_ray.architecture import ModelSpec


def output_config_json(config_bytes: bytes, model: torch.nn.Module, spec: ModelSpec) -> bytes:
    """``model``: the meta-device model with the recipe's schemes attached (describe_model)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor.transformers.compression.compressed_tensors_utils import resave_config

    output, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is embed.weight:
        # llm-compressor re-ties equal input/output embeddings before saving and marks the
        # text config tied (``_retie_embeddings``); the serialized config shows it.
        model.config.get_text_config(decoder=True).tie_word_embeddings = True
    with tempfile.TemporaryDirectory() as source_dir, tempfile.TemporaryDirectory() as out_dir:
        with open(os.path.join(source_dir, "config.json"), "wb") as handle:
            handle.write(config_bytes)
        model.config._name_or_path = source_dir
        model.config.save_pretrained(out_dir)  # what transformers writes on save...
        resave_config(model.config, out_dir)  # ...replaced by the source's own file where possible
        for module in model.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_status = QuantizationStatus.COMPRESSED
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.quantization_config.ignore = list(spec.ignored_linears)
        compressor.update_config(out_dir)
        with open(os.path.join(out_dir, "config.json"), "rb") as handle:
            return handle.read()
