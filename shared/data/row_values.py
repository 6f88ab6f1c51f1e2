"""Values read out of a source row, each checked, with a RowError that names what is wrong:
strings, KTO labels, tool schemas and tool calls (in any of the usual shapes, made canonical)."""

from __future__ import annotations

import json

from lmforge.shared.data.aligned import RowError, call


def kind_of(value: object) -> str:
    return "null" if value is None else {"str": "a string", "list": "a list", "dict": "an object",
                                         "int": "a number", "float": "a number",
                                         "bool": "a boolean"}.get(type(value).__name__, type(value).__name__)


def text_of(row: dict, col: str, required: bool = True) -> str:
    value = row.get(col)
    if value is None:
        if required:
            raise RowError(f"missing '{col}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"'{col}' must be a string, found {kind_of(value)}")
    return value


def label_of(row: dict, col: str) -> bool:
    value = row.get(col)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None:
        raise RowError(f"missing '{col}' (the KTO label)")
    raise RowError(f"'{col}' must be a boolean, found {kind_of(value)}")


def normalize_tools(value: object) -> str:
    """Tool schemas (JSON text or objects) -> a JSON list of {"type": "function", "function": ...}."""
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("'tools' is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"'tools' must be a JSON list of tool schemas, found {kind_of(value)}")
    tools = []
    for tool in value:
        if not isinstance(tool, dict):
            raise RowError("'tools' entries must be JSON objects")
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            fn = tool["function"]
        elif "name" in tool:
            fn = tool
        else:
            raise RowError("a tool schema has no 'name'")
        tools.append({"type": "function", "function": fn})
    return json.dumps(tools, ensure_ascii=False) if tools else ""


def _call(obj: object) -> dict:
    """One tool call in any usual shape -> {id, name, arguments (canonical JSON text)}."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI: {id, type, function}
        fn = obj["function"]
        ident = obj.get("id")
    else:
        fn, ident = obj, obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RowError("a function call must be a JSON object with a 'name'")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RowError("function call arguments are not valid JSON") from None
    if ident is not None and not isinstance(ident, str):
        ident = str(ident)
    return call(fn["name"], args, ident)


def normalize_call(content: object) -> str:
    """Version-1 function-call content -> canonical JSON: {"name", "arguments"} or a list of them."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    if isinstance(content, list):
        if not content:
            raise RowError("empty function call list")
        return json.dumps([_v1(_call(c)) for c in content], ensure_ascii=False)
    return json.dumps(_v1(_call(content)), ensure_ascii=False)


def _v1(c: dict) -> dict:
    return {"name": c["name"], "arguments": json.loads(c["arguments"])}


def calls_of(value: object) -> list[dict]:
    """Tool calls: one call or a list of them (objects or JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RowError("empty function call list")
    return [_call(c) for c in items]
