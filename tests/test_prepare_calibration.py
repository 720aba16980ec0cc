"""``nvfp4-ray prepare-calibration``: the mixed-format corpus, its determinism and its
metadata, user inputs in JSONL and Parquet, and bad input (exit 2, one clear line)."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from nvfp4_ray.calibration.conversations import MULTILINGUAL, TOOL_CONVERSATIONS, builtin_conversations, shipped
from nvfp4_ray.prepare import read_metadata

TOOL_CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature\": 24}"},
        {"role": "assistant", "content": "It is 24 degrees in Rome."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
}  # fmt: skip


def prepare(model, output, *extra):
    code, stdout, stderr = run_cli("prepare-calibration", model, output, *extra)
    return code, json.loads(stdout.strip().splitlines()[-1]), stderr


def conversations_file(path, records, lines=None):
    with open(path, "w") as handle:
        handle.write("\n".join(lines or [json.dumps(r) for r in records]) + "\n")
    return str(path)


def qa(index: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {index}?"},
                         {"role": "assistant", "content": f"Answer {index}."}]}  # fmt: skip


def test_builtin_corpus_mix_metadata_and_quantize_input(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from nvfp4_ray.calibration.data import read_samples

    out = str(tmp_path / "calibration.parquet")
    code, summary, stderr = prepare(smollm2, out, "--num-samples", "40", "--max-seq-len", "96", "--multilingual", "0.1")
    assert code == 0, stderr
    table = pq.read_table(out)
    formats, texts, rows = (table.column(c).to_pylist() for c in ("format", "text", "input_ids"))
    # ~50% chat template, 25% xml, 25% openai json, and every prefix keeps the mix
    assert {f: formats.count(f) for f in set(formats)} == {"chat_template": 20, "xml": 10, "openai_json": 10}
    assert formats[:4] == ["chat_template", "xml", "chat_template", "openai_json"]
    metadata = read_metadata(out)
    assert metadata["mix"] == {"chat_template": 20, "xml": 10, "openai_json": 10} and metadata["multilingual"] == 4
    assert (metadata["seed"], metadata["num_samples"], metadata["max_seq_len"]) == (0, 40, 96)
    assert metadata["tokenizer"] == smollm2 and metadata["conversations"].startswith("builtin")
    assert summary["status"] == "succeeded" and summary["mix"] == metadata["mix"]
    multilingual = {c.messages[0]["content"] for c in shipped(MULTILINGUAL)}
    assert sum(any(question in text for question in multilingual) for text in texts) == 4

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for fmt, text, ids in zip(formats, texts, rows):
        assert 0 < len(ids) <= 96
        assert ids == tokenizer(text, add_special_tokens=fmt != "chat_template")["input_ids"][:96]
        assert text.startswith({"chat_template": "<|im_start|>", "xml": "<", "openai_json": '{"messages": '}[fmt])
    assert read_samples(out, 40, 96, 49152) == rows  # what `quantize --calibration` reads


def test_same_seed_same_file_other_seed_other_sample(smollm2, tmp_path):
    paths = [str(tmp_path / f"{name}.parquet") for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("7", "7", "8")):
        assert prepare(smollm2, path, "--num-samples", "16", "--max-seq-len", "32", "--seed", seed)[0] == 0
    a, b, c = (pq.read_table(p) for p in paths)
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    assert a.column("text").to_pylist() != c.column("text").to_pylist()


def test_user_conversations_from_jsonl_and_parquet_give_the_same_rows(smollm2, tmp_path):
    records = [TOOL_CONVERSATION] + [qa(i) for i in range(7)]
    jsonl = conversations_file(tmp_path / "conversations.jsonl", records)
    parquet = str(tmp_path / "conversations.parquet")
    pq.write_table(pa.table({"messages": [json.dumps(r["messages"]) for r in records],
                             "tools": [json.dumps(r.get("tools", [])) for r in records]}), parquet)  # fmt: skip
    outputs = []
    for source in (jsonl, parquet):
        out = str(tmp_path / f"{os.path.basename(source)}.out.parquet")
        code, summary, stderr = prepare(smollm2, out, "--conversations", source, "--num-samples", "8")
        assert code == 0, stderr
        assert read_metadata(out)["conversations"] == source
        outputs.append(pq.read_table(out))
    assert outputs[0].column("input_ids").equals(outputs[1].column("input_ids"))
    tool_rows = [t for t in outputs[0].column("text").to_pylist() if "get_weather" in t]
    assert len(tool_rows) == 1 and "temperature" in tool_rows[0]  # the call and its result are both rendered


def test_shipped_corpus_is_valid_and_has_tool_calls_with_results():
    tools = shipped(TOOL_CONVERSATIONS)
    assert len(tools) >= 30 and len(shipped(MULTILINGUAL)) >= 20
    assert len({t["function"]["name"] for c in tools for t in c.tools}) >= 25
    multi_turn = [c for c in tools if sum(m["role"] == "user" for m in c.messages) > 1]
    with_results = [c for c in tools if any(m["role"] == "tool" for m in c.messages)]
    assert len(multi_turn) >= 5 and len(with_results) >= 25
    assert len(builtin_conversations()) >= 256  # enough for quantize's default --num-samples


def assert_input_error(result, *fragments):
    code, summary, stderr = result
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("nvfp4-ray: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert summary["status"] == "failed" and all(f in summary["error"] for f in fragments), summary


def test_malformed_json_line_names_the_line(smollm2, tmp_path):
    lines = [json.dumps(qa(0)), json.dumps(qa(1)), '{"messages": [{"role": "user", "content": "hi"}', json.dumps(qa(3))]
    source = conversations_file(tmp_path / "bad.jsonl", None, lines)
    out = str(tmp_path / "out.parquet")
    assert_input_error(prepare(smollm2, out, "--conversations", source), "bad.jsonl line 3", "not valid JSON")
    assert not os.path.exists(out)


def test_conversation_without_a_user_turn(smollm2, tmp_path):
    no_user = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}]}
    source = conversations_file(tmp_path / "c.jsonl", [qa(0), no_user, qa(2)])
    result = prepare(smollm2, str(tmp_path / "o.parquet"), "--conversations", source)
    assert_input_error(result, "c.jsonl line 2", "no user turn")


@pytest.mark.parametrize(
    "message, fragment",
    [({"role": "robot", "content": "x"}, "role 'robot'"), ({"role": "user", "content": ""}, "non-empty string")],
)
def test_malformed_message(smollm2, tmp_path, message, fragment):
    source = conversations_file(tmp_path / "c.jsonl", [qa(0), {"messages": [message]}])
    result = prepare(smollm2, str(tmp_path / "o.parquet"), "--conversations", source)
    assert_input_error(result, "line 2 message 0", fragment)


def test_too_few_conversations_for_num_samples(smollm2, tmp_path):
    source = conversations_file(tmp_path / "c.jsonl", [qa(i) for i in range(3)])
    result = prepare(smollm2, str(tmp_path / "o.parquet"), "--conversations", source, "--num-samples", "5")
    assert_input_error(result, "holds 3 conversations", "--num-samples asks for 5")


def test_tokenizer_without_chat_template_needs_the_fallback(smollm2, tmp_path):
    model = tmp_path / "no-template"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(os.path.join(smollm2, name), model)
    out = str(tmp_path / "o.parquet")
    assert_input_error(prepare(str(model), out, "--num-samples", "8"), "has no chat template", "--template-fallback")
    assert not os.path.exists(out)

    code, summary, stderr = prepare(str(model), out, "--num-samples", "8", "--template-fallback")
    assert code == 0, stderr
    assert read_metadata(out)["mix"] == {"plain": 4, "xml": 2, "openai_json": 2}
    plain = [t for t, f in zip(*(pq.read_table(out).column(c).to_pylist() for c in ("text", "format"))) if f == "plain"]
    assert all(text.startswith(("User: ", "System: ", "Functions:")) for text in plain)
