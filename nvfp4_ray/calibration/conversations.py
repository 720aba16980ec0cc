"""Conversations for calibration: read, check and normalise them; and the shipped corpus.

A conversation is OpenAI-shaped: ``messages`` (``role`` system/user/assistant/tool,
``content``; assistant turns may carry ``tool_calls``, tool turns a ``tool_call_id``) and
optional ``tools`` (function definitions). Input files are JSONL (one conversation per
line) or Parquet (a ``messages`` column and optional ``tools`` column, as nested values
or JSON strings), local or on object storage.

The shipped corpus works offline: question-and-answer conversations derived at run time
from CPython's own documentation (``pydoc_data.topics``, so its text is not copied into
this repository), plus hand-written tool-calling conversations and a small multilingual
supplement under ``nvfp4_ray/data/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from nvfp4_ray.errors import InputError
from nvfp4_ray.io.storage import Store, redact

ROLES = ("system", "user", "assistant", "tool")
BUILTIN = "builtin"  # the name the shipped corpus is recorded under
TOOL_CONVERSATIONS = "tool_conversations.jsonl"
MULTILINGUAL = "multilingual.jsonl"
_TOPIC_CHUNK_CHARS = 1500  # pydoc topics are cut into answers of about this size
_TOPIC_QUESTIONS = (
    "Explain the Python topic '{topic}'.",
    "What does the Python language reference say about '{topic}'? (part {part})",
    "Go on about '{topic}' in Python, part {part}.",
)


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    tools: list[dict]
    origin: str  # where it came from, for error messages: "FILE line 7"


def read_conversations(url: str) -> list[Conversation]:
    """Every conversation in a JSONL or Parquet file; InputError names the line or row."""
    folder, _, name = url.rstrip("/").rpartition("/")
    store = Store(folder or ".")
    if not name or not store.exists(name):
        raise InputError(f"conversations file {redact(url)} does not exist")
    if name.endswith(".parquet"):
        records = _parquet_records(store, name, redact(url))
    elif name.endswith((".jsonl", ".json")):
        records = _jsonl_records(store.read_bytes(name), redact(url))
    else:
        raise InputError(f"conversations file {redact(url)}: unknown format (valid: .jsonl, .parquet)")
    conversations = [normalize(record, origin) for origin, record in records]
    if not conversations:
        raise InputError(f"conversations file {redact(url)} holds no conversations")
    return conversations


def _jsonl_records(data: bytes, display: str) -> list[tuple[str, object]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{display} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{display} line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{display} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return records


def _parquet_records(store: Store, name: str, display: str) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(store.fs.open(store.path(name), "rb"))
    except Exception as exc:
        raise InputError(f"conversations file {display} is not a Parquet file: {exc}") from None
    if "messages" not in table.column_names:
        raise InputError(
            f"conversations file {display} needs a 'messages' column (it has: {', '.join(table.column_names) or 'none'})"
        )
    messages = table.column("messages").to_pylist()
    tools = table.column("tools").to_pylist() if "tools" in table.column_names else [None] * len(messages)
    records = []
    for row, (row_messages, row_tools) in enumerate(zip(messages, tools)):
        try:  # nested columns or JSON strings both work
            record = {
                "messages": json.loads(row_messages) if isinstance(row_messages, str) else row_messages,
                "tools": json.loads(row_tools) if isinstance(row_tools, str) else row_tools,
            }
        except json.JSONDecodeError as exc:
            raise InputError(f"{display} row {row}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        records.append((f"{display} row {row}", record))
    return records


def normalize(record: object, origin: str) -> Conversation:
    """Check one conversation and return it in one shape: Parquet's null struct fields
    dropped, tool-call arguments as objects."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise InputError(f"{origin}: a conversation is an object with a non-empty 'messages' list")
    messages = []
    for turn, message in enumerate(record["messages"]):
        where = f"{origin} message {turn}"
        if not isinstance(message, dict):
            raise InputError(f"{where}: a message is an object with 'role' and 'content'")
        message = {key: value for key, value in message.items() if value is not None}
        if message.get("role") not in ROLES:
            raise InputError(f"{where}: role {message.get('role')!r} is not one of {', '.join(ROLES)}")
        calls = [_tool_call(call, where) for call in message.get("tool_calls") or []]
        content = message.get("content", "")
        if not isinstance(content, str) or (not content and not calls):
            raise InputError(f"{where}: 'content' must be a non-empty string (or an assistant turn with tool_calls)")
        clean = {"role": message["role"], "content": content}
        if calls:
            if message["role"] != "assistant":
                raise InputError(f"{where}: only assistant messages may carry tool_calls")
            clean["tool_calls"] = calls
        if message["role"] == "tool" and isinstance(message.get("tool_call_id"), str):
            clean["tool_call_id"] = message["tool_call_id"]
        messages.append(clean)
    if not any(m["role"] == "user" for m in messages):
        raise InputError(f"{origin}: no user turn; every conversation needs at least one message with role 'user'")
    tools = record.get("tools") or []
    if not isinstance(tools, list) or not all(_tool_name(tool) for tool in tools):
        raise InputError(f"{origin}: 'tools' must be a list of {{'type': 'function', 'function': {{'name': ...}}}}")
    return Conversation(messages, [_drop_nulls(tool) for tool in tools], origin)


def _tool_name(tool: object) -> str | None:
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) and isinstance(function.get("name"), str) else None


def _tool_call(call: object, where: str) -> dict:
    name = _tool_name(call)
    arguments = call["function"].get("arguments", {}) if name else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if name is None or not isinstance(arguments, dict):
        raise InputError(f"{where}: a tool call is {{'function': {{'name': ..., 'arguments': JSON object}}}}")
    normal = {"id": call["id"]} if isinstance(call.get("id"), str) else {}
    return {**normal, "type": "function", "function": {"name": name, "arguments": _drop_nulls(arguments)}}


def _drop_nulls(value):
    """Parquet structs carry every field of the column's type; absent ones come back None."""
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value


def builtin_conversations() -> list[Conversation]:
    """The shipped corpus: Python documentation Q&A, then the tool-calling conversations."""
    return pydoc_conversations() + shipped(TOOL_CONVERSATIONS)


def shipped(name: str) -> list[Conversation]:
    """A JSONL file of nvfp4_ray/data/, checked like user input."""
    data = resources.files("nvfp4_ray").joinpath("data", name).read_bytes()
    return [normalize(record, origin) for origin, record in _jsonl_records(data, name)]


def pydoc_conversations() -> list[Conversation]:
    """Each topic of CPython's documentation cut at paragraph ends into answers of about
    _TOPIC_CHUNK_CHARS characters, each asked for by a question."""
    import pydoc_data.topics

    conversations = []
    for topic in sorted(pydoc_data.topics.topics):
        for part, answer in enumerate(_chunks(pydoc_data.topics.topics[topic]), start=1):
            question = _TOPIC_QUESTIONS[0 if part == 1 else 1 + part % 2].format(topic=topic, part=part)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            conversations.append(Conversation(messages, [], f"pydoc topic {topic!r} part {part}"))
    return conversations


def _chunks(text: str) -> list[str]:
    chunks, current = [], ""
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        if current and len(current) + len(paragraph) > _TOPIC_CHUNK_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current.strip():
        chunks.append(current)
    return chunks
