"""Tools in chat templates: tool definitions, calls and results as each tool style writes them,
and tool calls parsed back out of generated text.

Tool styles: `qwen` (Hermes-style <tool_call> blocks and <tool_response> results), `llama3` (JSON
objects, ipython results), `mistral` ([AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]) and `default`
(JSON lines). `parse_calls` reads back what `calls_text` writes: serve uses it to answer with tool
calls.
"""

from __future__ import annotations

import json


def tojson(value: object, indent: int | None = None) -> str:
    """JSON as chat templates write it (transformers' `tojson`: no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def calls_of(content: str) -> list[dict]:
    """A function_call turn's content (canonical JSON) as a list of {"name", "arguments"}."""
    value = json.loads(content)
    return value if isinstance(value, list) else [value]


def results_of(content: str) -> list[str]:
    """An observation turn's content: one result, or a JSON list of parallel results."""
    if content.startswith("["):
        try:
            value = json.loads(content)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        except ValueError:
            pass
    return [content]


def tools_block(style: str, tools: list[dict]) -> str:
    if style == "qwen":
        listing = "".join("\n" + tojson(t) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
                f"{listing}\n</tools>\n\nFor each function call, return a json object with function name "
                "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if style == "llama3":
        return ("You have access to the following functions. To call a function, respond with JSON of the "
                'form {"name": function name, "parameters": dictionary of argument name and its value}.\n\n'
                + "\n\n".join(tojson(t, indent=4) for t in tools))
    if style == "mistral":
        return "[AVAILABLE_TOOLS] " + tojson(tools) + "[/AVAILABLE_TOOLS]"
    return ("You have access to the following tools. To use one, answer with JSON of the form "
            '{"name": tool name, "arguments": {...}}.\n' + "\n".join(tojson(t) for t in tools))


def calls_text(style: str | None, calls: list[dict], content_before: str = "") -> str:
    if style == "qwen":
        parts = []
        for i, call in enumerate(calls):
            args = call["arguments"] if isinstance(call["arguments"], str) else tojson(call["arguments"])
            sep = "\n" if (i == 0 and content_before) or i > 0 else ""
            parts.append(f'{sep}<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>')
        return "".join(parts)
    if style == "llama3":
        return "".join(tojson({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    if style == "mistral":
        return "[TOOL_CALLS] " + tojson([{"name": c["name"], "arguments": c["arguments"],
                                          **({"id": c["id"]} if c.get("id") else {})} for c in calls])
    return "\n".join(tojson({"name": c["name"], "arguments": c["arguments"]}) for c in calls)


def results_text(style: str | None, results: list[str]) -> str:
    if style == "qwen":
        return "".join(f"\n<tool_response>\n{r}\n</tool_response>" for r in results)
    if style == "mistral":
        return tojson({"content": results[0] if len(results) == 1 else results})
    return results[0] if len(results) == 1 else tojson(results)


def mistral_result(content: str, call_id: str | None) -> str:
    """A tool result as mistral-common writes it: {"content": JSON value or text, "call_id"}."""
    try:
        value: object = json.loads(content)
    except ValueError:
        value = content
    return tojson({"content": value, **({"call_id": call_id} if call_id else {})})


def parse_calls(style: str | None, text: str) -> tuple[str, list[dict]]:
    """Split generated text into (plain content, tool calls) for a template's tool style.

    The inverse of how calls are written; text that holds no well-formed call is all content."""
    import re

    if not style:
        return text, []
    if style == "qwen":
        found = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        calls = [call for call in map(_as_call, found) if call is not None]
        if found and len(calls) == len(found):
            return text.split("<tool_call>", 1)[0].strip(), calls
        return text, []
    if style == "mistral":
        if "[TOOL_CALLS]" in text:
            head, _, body = text.partition("[TOOL_CALLS]")
            try:
                value = json.loads(body.strip())
            except ValueError:
                return text, []
            items = value if isinstance(value, list) else [value]
            calls = [call for call in map(_as_call, items) if call is not None]
            if calls and len(calls) == len(items):
                return head.strip(), calls
        return text, []
    # llama3 / default: the answer is one or more JSON objects
    decoder, pos, calls, body = json.JSONDecoder(), 0, [], text.strip()
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _as_call(value)
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n\r\t;":
            pos += 1
    return ("", calls) if calls else (text, [])


def _as_call(value: object) -> dict | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": value["name"], "arguments": args}
