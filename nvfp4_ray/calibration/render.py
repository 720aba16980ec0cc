"""One conversation as text, in each format of the calibration mix.

  chat_template  the model's own chat template (what its users send through vLLM)
  xml            Anthropic-style ``<role>...</role>`` turns, tool uses and results as tags
  openai_json    an OpenAI chat-completions request body: ``messages`` + ``tools``
  plain          ``Role: content`` lines; stands in for chat_template only when asked
                 (``--template-fallback``) for a tokenizer without a chat template
"""

from __future__ import annotations

import json

from nvfp4_ray.calibration.conversations import Conversation
from nvfp4_ray.errors import InputError

FORMATS = ("chat_template", "xml", "openai_json", "plain")


def render(conversation: Conversation, fmt: str, tokenizer) -> str:
    if fmt == "chat_template":
        return _chat_template(conversation, tokenizer)
    if fmt == "xml":
        return _xml(conversation)
    if fmt == "openai_json":
        return _openai_json(conversation)
    return _plain(conversation)


def _chat_template(conversation: Conversation, tokenizer) -> str:
    # Templates written without tool support (SmolLM2's, for one) would drop tool calls and
    # tool definitions, or fail on an assistant turn without content; for those, the calls
    # go into the content and the definitions into the system prompt, as text.
    template = str(tokenizer.chat_template)
    messages = conversation.messages
    if "tool_calls" not in template:
        messages = [{"role": m["role"], "content": _with_calls_as_text(m)} for m in messages]
    if conversation.tools and "tools" not in template:
        listing = "You can call these functions:\n" + "\n".join(_json(tool) for tool in conversation.tools)
        if messages[0]["role"] == "system":
            messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{listing}"}] + messages[1:]
        else:
            messages = [{"role": "system", "content": listing}] + messages
    try:
        return tokenizer.apply_chat_template(messages, tools=conversation.tools or None, tokenize=False)
    except Exception as exc:  # templates raise on conversations they do not accept
        raise InputError(
            f"{conversation.origin}: the model's chat template cannot render this conversation: {exc}"
        ) from None


def _with_calls_as_text(message: dict) -> str:
    calls = [
        f"<tool_call>\n{_json({'name': c['function']['name'], 'arguments': c['function']['arguments']})}\n</tool_call>"
        for c in message.get("tool_calls", [])
    ]
    return "\n".join(part for part in [message["content"], *calls] if part)


def _xml(conversation: Conversation) -> str:
    parts = []
    if conversation.tools:
        parts.append("<tools>\n" + "\n".join(_json(tool["function"]) for tool in conversation.tools) + "\n</tools>")
    for message in conversation.messages:
        role = message["role"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            attribute = f' id="{call_id}"' if call_id else ""
            parts.append(f"<tool_result{attribute}>{message['content']}</tool_result>")
            continue
        uses = [
            f'<tool_use name="{c["function"]["name"]}">{_json(c["function"]["arguments"])}</tool_use>'
            for c in message.get("tool_calls", [])
        ]
        body = "\n".join(part for part in [message["content"], *uses] if part)
        parts.append(f"<{role}>{body}</{role}>")
    return "\n".join(parts)


def _openai_json(conversation: Conversation) -> str:
    messages = []
    for message in conversation.messages:
        wire = dict(message)
        if "tool_calls" in message:  # the wire format carries arguments as a JSON string
            wire["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _json(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
            wire["content"] = message["content"] or None
        messages.append(wire)
    body = {"messages": messages, **({"tools": conversation.tools} if conversation.tools else {})}
    return _json(body)


def _plain(conversation: Conversation) -> str:
    parts = []
    if conversation.tools:
        parts.append("Functions:\n" + "\n".join(_json(tool) for tool in conversation.tools))
    for message in conversation.messages:
        parts.append(f"{message['role'].capitalize()}: {_with_calls_as_text(message)}")
    return "\n\n".join(parts)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)
