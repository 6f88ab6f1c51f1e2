"""Which format a source is in: the base format and stage told from its column names (and its
first row), unless --format says."""

from __future__ import annotations

from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.formats import Spec, make_spec


def detect(fmt: str, names: list[str], first: dict | None, columns: dict[str, str],
           tags: dict[str, str], source: str, meta_stage: str | None = None) -> Spec:
    """Choose base format and stage from the source's column names (and its first row).

    `columns` maps our names to the source's (from --columns); `fmt` is the --format choice."""
    present = set(names)
    columns = dict(columns)
    if "messages" not in columns:  # the chat list under either usual name
        for name in ("conversations", "messages"):
            if name in present:
                columns["messages"] = name
                break
    if "label" not in columns and "kto_tag" in present:
        columns["label"] = "kto_tag"
    if {"chosen_messages", "rejected_messages"} <= present:   # LLaMA-Factory v1: two whole conversations
        columns.setdefault("chosen", "chosen_messages")
        columns.setdefault("rejected", "rejected_messages")
        whole = first.get("chosen_messages") if isinstance(first, dict) else None
        sample = whole[0] if isinstance(whole, list) and whole and isinstance(whole[0], dict) else {}
        return make_spec("openai" if "role" in sample else "sharegpt", "pairwise", columns, tags)
    reverse = {src: ours for ours, src in columns.items()}
    keys = {reverse.get(n, n) for n in names}

    def first_value(ours: str) -> object:
        return first.get(columns.get(ours, ours)) if isinstance(first, dict) else None

    if fmt == "text":
        return make_spec("text", "pt", columns)
    stage = {"pairwise": "pairwise", "kto": "kto"}.get(fmt)
    if fmt in ("alpaca", "sharegpt", "openai"):
        base = fmt
    elif {"prompt", "response"} <= keys and isinstance(first_value("prompt"), list):
        base = "aligned"
    elif "messages" in keys:
        msgs = first_value("messages")
        sample = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
        role_tag = tags.get("role")
        if role_tag:
            base = "openai" if role_tag == "role" else "sharegpt"
        else:
            base = "openai" if "role" in sample else "sharegpt"
    elif "instruction" in keys or ("output" in keys and "prompt" not in keys):
        base = "alpaca"
    elif "prompt" in keys and ({"chosen", "rejected"} <= keys or "completion" in keys):
        base = "preference"
    elif "text" in keys:
        return make_spec("text", "pt", columns)
    else:
        raise BadInput(f"{source}: cannot tell the format from its columns ({', '.join(sorted(names)) or 'none'})",
                       "pass --format and, if the names differ, --columns (e.g. --columns instruction=question)")

    if base == "aligned":
        return make_spec(base, stage or meta_stage or _aligned_stage(first), columns)
    if stage is None:
        if {"chosen", "rejected"} <= keys or (base == "alpaca" and isinstance(first_value("output"), list)):
            stage = "pairwise"
        elif "label" in keys:
            stage = "kto"
        else:
            stage = "sft"
    return make_spec(base, stage, columns, tags)


def _aligned_stage(first: dict | None) -> str:
    if not first:
        return "sft"
    if "label" in first and first["label"] is not None:
        return "kto"
    if len(first.get("response") or []) == 2:
        return "pairwise"
    if not first.get("prompt"):
        return "pt"
    return "sft"
