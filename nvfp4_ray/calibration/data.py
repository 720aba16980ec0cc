"""Calibration rows: read, check and tokenize them before any work starts.

The file is Parquet with an ``input_ids`` column (lists of token ids) or a ``text``
column (tokenized here with the model's tokenizer). The first ``num_samples`` rows are
used, each cut to ``max_seq_len`` tokens. Every row is checked: present, non-empty, ids
inside the vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.storage import Store, redact

ID_COLUMN = "input_ids"
TEXT_COLUMN = "text"


def read_samples(url: str, num_samples: int, max_seq_len: int, vocab_size: int, tokenizer_source=None) -> list[list[int]]:
    """The token ids of the first ``num_samples`` rows, each truncated to ``max_seq_len``."""
    import pyarrow.parquet as pq

    folder, _, name = url.rstrip("/").rpartition("/")
    store = Store(folder or ".")
    if not name or not store.exists(name):
        raise InputError(f"calibration file {redact(url)} does not exist")
    try:
        parquet = pq.ParquetFile(store.fs.open(store.path(name), "rb"))
    except Exception as exc:
        raise InputError(f"calibration file {redact(url)} is not a Parquet file: {exc}") from None
    columns = parquet.schema_arrow.names
    column = ID_COLUMN if ID_COLUMN in columns else TEXT_COLUMN if TEXT_COLUMN in columns else None
    if column is None:
        raise InputError(
            f"calibration file {redact(url)} needs an {ID_COLUMN!r} or {TEXT_COLUMN!r} column (it has: {', '.join(columns) or 'none'})"
        )
    rows = parquet.metadata.num_rows
    if rows == 0:
        raise InputError(f"calibration file {redact(url)} is empty")
    if rows < num_samples:
        raise InputError(
            f"calibration file {redact(url)} has {rows} rows but --num-samples asks for {num_samples}; "
            "lower --num-samples or add rows"
        )
    values: list = []
    for batch in parquet.iter_batches(batch_size=min(num_samples, 4096), columns=[column]):
        values.extend(batch.column(0).to_pylist())
        if len(values) >= num_samples:
            break
    values = values[:num_samples]
    if column == TEXT_COLUMN:
        values = _tokenize(values, tokenizer_source, max_seq_len)
    samples = []
    for row, ids in enumerate(values):
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise InputError(f"calibration row {row}: {column} must be a list of integers")
        if not ids:
            raise InputError(f"calibration row {row} has no tokens")
        ids = ids[:max_seq_len]
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise InputError(f"calibration row {row}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
        samples.append(ids)
    return samples


def samples_hash(samples: list[list[int]]) -> str:
    """sha256 over the exact token ids used (what the output depends on)."""
    digest = hashlib.sha256()
    for ids in samples:
        array = np.asarray(ids, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(array.tobytes())
    return digest.hexdigest()


def _tokenize(texts: list, tokenizer_source, max_seq_len: int) -> list[list[int]]:
    if tokenizer_source is None:
        raise InputError("the calibration file has a text column but no tokenizer is available")
    tokenizer = load_tokenizer(tokenizer_source)
    out = []
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise InputError(f"calibration row {row}: text is empty or not a string")
        out.append(tokenizer(text, truncation=True, max_length=max_seq_len)["input_ids"])
    return out


def load_tokenizer(source):
    """The tokenizer of a SourceCheckpoint, copied to a local folder when SOURCE is remote."""
    names = [n for n in source.copied_files if is_tokenizer_file(n)]
    if not names:
        raise InputError("SOURCE has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return tokenizer_from_store(source.store, names + ["config.json"], "SOURCE")


def is_tokenizer_file(name: str) -> bool:
    return "token" in name or "chat_template" in name or name.endswith((".model", ".tiktoken", ".jinja"))


def tokenizer_from_store(store: Store, names: list[str], what: str):
    """AutoTokenizer over the named files of ``store`` (read in place when it is local)."""
    from transformers import AutoTokenizer

    folder = store.root
    if not store.local:
        folder = tempfile.mkdtemp(prefix="nvfp4-ray-tokenizer-")
        for name in names:
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(store.read_bytes(name))
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise InputError(f"the tokenizer in {what} cannot be loaded: {exc}") from None
