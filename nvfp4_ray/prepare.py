"""``nvfp4-ray prepare-calibration``: a calibration set that looks like real traffic.

As for the Mistral-Medium-3.5 NVFP4 release, the same pool of conversations is rendered
in a mix of formats: about half with the model's own chat template, a quarter as
Anthropic-style ``<role>`` XML and a quarter as OpenAI tool-calling JSON, optionally with
a multilingual share. N conversations are drawn with a seed (each at most once), put in
a seeded random order and given their formats by position (chat template, xml, chat
template, openai_json, ...), so every prefix of the file has the same mix and
``quantize --num-samples`` may use fewer rows. Each row is tokenized with the model's
tokenizer and cut to L tokens. The output is Parquet with an ``input_ids`` column (what
``quantize --calibration`` reads), the ``format`` and rendered ``text`` of each row, and
the mix, seed, inputs and sizes in the schema metadata under ``nvfp4_ray.calibration``.
"""

from __future__ import annotations

import io
import json
import random
import sys
from typing import Literal

from pydantic import Field

from nvfp4_ray import __version__
from nvfp4_ray.calibration.conversations import (
    BUILTIN,
    MULTILINGUAL,
    builtin_conversations,
    read_conversations,
    shipped,
)
from nvfp4_ray.calibration.data import is_tokenizer_file, tokenizer_from_store
from nvfp4_ray.calibration.render import render
from nvfp4_ray.errors import InputError
from nvfp4_ray.io.storage import Store
from nvfp4_ray.options import CommandOptions

METADATA_KEY = b"nvfp4_ray.calibration"
# Formats by row position: 2 of 4 chat template, 1 xml, 1 openai_json.
FORMAT_CYCLE = ("chat_template", "xml", "chat_template", "openai_json")


class PrepareOptions(CommandOptions):
    POSITIONAL = ("model", "output")

    model: str = Field(description="checkpoint or tokenizer directory (or URL): its tokenizer and chat template are used")
    output: str = Field(description="Parquet file to write (path or URL)")
    conversations: str | None = Field(
        None, description="JSONL or Parquet of conversations (messages, optional tools); default: the shipped corpus"
    )
    num_samples: int = Field(256, ge=1, description="rows to write; each conversation is used at most once")
    max_seq_len: int = Field(1024, ge=1, description="tokens kept per row")
    seed: int = Field(0, description="sampling seed: the same inputs and seed give the same file")
    multilingual: float = Field(
        0.0, ge=0, le=1, description="share of rows drawn from the shipped multilingual supplement"
    )
    template_fallback: bool = Field(
        False, description="if the tokenizer has no chat template, render that share as plain 'Role: content' text"
    )
    log_format: Literal["text", "json"] = "text"


def prepare_calibration(options: PrepareOptions, events) -> dict:
    """Write the calibration Parquet; return the summary. Bad input raises InputError first."""
    folder, _, name = options.output.rstrip("/").rpartition("/")
    out = Store(folder or ".")
    if not name:
        raise InputError(f"OUTPUT {options.output!r} must name a file, e.g. calibration.parquet")
    with events.stage("read"):
        tokenizer = _load_tokenizer(options.model)
        chat_format = _chat_format(tokenizer, options)
        pool = read_conversations(options.conversations) if options.conversations else builtin_conversations()
        multilingual_count = round(options.num_samples * options.multilingual)
        supplement = shipped(MULTILINGUAL) if multilingual_count else []
        main_count = options.num_samples - multilingual_count
        _check_enough(len(pool), main_count, options.conversations or BUILTIN, "--num-samples")
        _check_enough(len(supplement), multilingual_count, MULTILINGUAL, "--multilingual")

    rng = random.Random(options.seed)
    picks = rng.sample(pool, main_count) + rng.sample(supplement, multilingual_count)
    rng.shuffle(picks)
    formats = [FORMAT_CYCLE[i % len(FORMAT_CYCLE)] for i in range(len(picks))]
    formats = [chat_format if fmt == "chat_template" else fmt for fmt in formats]
    rows, texts = [], []
    with events.stage("tokenize"):
        events.progress("tokenize", len(picks), unit="row")
        for conversation, fmt in zip(picks, formats):
            text = render(conversation, fmt, tokenizer)
            # A chat template writes its own special tokens; other formats are plain text.
            encoded = tokenizer(
                text, add_special_tokens=fmt != "chat_template", truncation=True, max_length=options.max_seq_len
            )
            rows.append(encoded["input_ids"])
            texts.append(text)
            events.advance("tokenize")

    metadata = {
        "tool": f"nvfp4-ray {__version__}",
        # The shipped corpus follows the running Python's documentation.
        "conversations": Store(options.conversations).display() if options.conversations
        else f"{BUILTIN} (Python {sys.version.split()[0]} documentation, tool calls)",
        "tokenizer": Store(options.model).display(),
        "seed": options.seed,
        "num_samples": options.num_samples,
        "max_seq_len": options.max_seq_len,
        "mix": {fmt: formats.count(fmt) for fmt in dict.fromkeys(formats)},
        "multilingual": multilingual_count,
        "tokens": sum(len(ids) for ids in rows),
    }
    with events.stage("write"):
        out.write_bytes(name, _parquet(rows, formats, texts, metadata))
    return {"status": "succeeded", "output": out.display(name), "rows": len(rows), **metadata}


def _load_tokenizer(url: str):
    store = Store(url)
    if not store.isdir(""):
        raise InputError(f"MODEL {store.display()} does not exist or is not a directory")
    names = [name for name in store.list_files("") if is_tokenizer_file(name) or name == "config.json"]
    if not any(is_tokenizer_file(name) for name in names):
        raise InputError(f"MODEL {store.display()} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return tokenizer_from_store(store, names, f"MODEL {store.display()}")


def _chat_format(tokenizer, options: PrepareOptions) -> str:
    if tokenizer.chat_template:
        return "chat_template"
    if options.template_fallback:
        return "plain"
    raise InputError(
        f"the tokenizer of MODEL {Store(options.model).display()} has no chat template, so half of the mix cannot be "
        "rendered the way the model is served; use a checkpoint that ships one, or pass --template-fallback to "
        "render that half as plain 'Role: content' text"
    )


def _check_enough(available: int, needed: int, source: str, option: str) -> None:
    if needed > available:
        raise InputError(
            f"{source} holds {available} conversations but {option} asks for {needed} (each is used at most once); "
            f"lower {option} or add conversations"
        )


def _parquet(rows: list[list[int]], formats: list[str], texts: list[str], metadata: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"input_ids": pa.array(rows, pa.list_(pa.int64())), "format": formats, "text": texts},
        metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode("utf-8")},
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_metadata(url: str) -> dict:
    """The ``nvfp4_ray.calibration`` record of a file this command wrote."""
    import pyarrow.parquet as pq

    folder, _, name = url.rstrip("/").rpartition("/")
    store = Store(folder or ".")
    schema = pq.read_schema(store.fs.open(store.path(name), "rb"))
    return json.loads((schema.metadata or {})[METADATA_KEY])
