"""Calibration sets: conversations rendered and tokenized into a Parquet file.

The built-in corpus turns CPython's own documentation (``pydoc_data.topics``) into
question-and-answer conversations, so the demo and the tests calibrate on real text
without any download.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq


def builtin_conversations() -> list[dict]:
    import pydoc_data.topics

    conversations = []
    for topic in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[topic].strip()
        conversations.append(
            {
                "messages": [
                    {"role": "user", "content": f"Explain the Python topic '{topic}'."},
                    {"role": "assistant", "content": text[:4000]},
                ]
            }
        )
    return conversations


def demo_calibration(source: str, num_samples: int, max_seq_len: int) -> str:
    """A Parquet of ``num_samples`` chat-rendered rows for the checkpoint at ``source``."""
    from nvfp4_ray.demo import cache_dir
    from transformers import AutoTokenizer

    path = os.path.join(cache_dir(), f"demo-calibration-{num_samples}x{max_seq_len}.parquet")
    if os.path.exists(path):
        return path
    tokenizer = AutoTokenizer.from_pretrained(source)
    rows = []
    for conversation in builtin_conversations()[:num_samples]:
        text = tokenizer.apply_chat_template(conversation["messages"], tokenize=False)
        rows.append(tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_seq_len)["input_ids"])
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.table({"input_ids": rows}), tmp)
    os.replace(tmp, path)
    return path
