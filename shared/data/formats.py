"""Source formats: how to read one source into the aligned schema (see aligned.py).

A `Spec` says how to read one source: its base format, the stage the rows are for, the column
names and (for chat formats) the role tags. `format_detection.detect()` builds one from the columns
a source has, `dataset_info.from_dataset_info()` from a LLaMA-Factory dataset_info.json entry.
`converters.converter(spec)` returns a function row -> (prompt, response, system, tools, label)
that raises RowError for bad rows.

Base formats
- alpaca: instruction, input, output, system, history ([[q, r], ...]); pairwise with chosen and
  rejected columns or output = [chosen, rejected]; kto with a label column.
- sharegpt: a conversation list of {from, value} (tags configurable), optional system turn,
  function_call and observation turns, tools; pairwise chosen/rejected messages; kto label.
- openai: messages of {role, content}; assistant tool_calls become function_call turns, tool
  messages observation turns.
- preference: TRL's prompt/chosen/rejected (pairwise), prompt/completion/label (kto) and
  prompt/completion (sft), strings or message lists.
- text: one text column, for pre-training.
- aligned: already aligned rows (re-validated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.shared.core.errors import BadInput, close_names

# Imported from here by the agent code (shared/train/agent/):
from lmforge.shared.data.row_values import normalize_tools  # noqa: F401

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "pairwise", "kto", "text")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
               "history": "history", "chosen": "chosen", "rejected": "rejected", "label": "label",
               "images": "images"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools",
                 "chosen": "chosen", "rejected": "rejected", "label": "label", "images": "images"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools",
               "chosen": "chosen", "rejected": "rejected", "label": "label", "images": "images"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                   "completion": "completion", "system": "system", "label": "label"},
    "text": {"text": "text"},
    "aligned": {"prompt": "prompt", "response": "response", "system": "system", "tools": "tools",
                "label": "label"},
}
# LLaMA-Factory's column names for the same things.
COLUMN_ALIASES = {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "label",
                  "conversations": "messages"}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {"role": "from", "content": "value", "user": "human", "assistant": "gpt",
                 "observation": "observation", "function": "function_call", "system": "system"},
    "openai": {"role": "role", "content": "content", "user": "user", "assistant": "assistant",
               "observation": "tool", "function": "function_call", "system": "system"},
}
TAG_ALIASES = {f"{k}_tag": k for k in ("role", "content", "user", "assistant", "observation",
                                       "function", "system")}


@dataclass
class Spec:
    base: str
    stage: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    media_dir: str | None = None    # where relative image paths are looked up (the data's folder)

    def describe(self) -> str:
        stage = {"sft": "", "pairwise": " (pairwise)", "kto": " (kto)", "pt": " (text)"}[self.stage]
        return f"{self.base}{stage}"

    def required(self) -> list[str]:
        """Canonical columns a source must have."""
        c = self.columns
        if self.base == "alpaca":
            need = [c["instruction"]]
            if self.stage == "pairwise":
                return need  # chosen/rejected or a list-valued output: checked per row
            need.append(c["output"])
            return need + ([c["label"]] if self.stage == "kto" else [])
        if self.base in ("sharegpt", "openai"):
            need = [c["messages"]]
            if self.stage == "pairwise":
                need += [c["chosen"], c["rejected"]]
            return need + ([c["label"]] if self.stage == "kto" else [])
        if self.base == "preference":
            if self.stage == "pairwise":
                return [c["prompt"], c["chosen"], c["rejected"]]
            return [c["prompt"], c["completion"]] + ([c["label"]] if self.stage == "kto" else [])
        if self.base == "text":
            return [c["text"]]
        return ["prompt", "response"]


def parse_pairs(text: str | None, what: str, aliases: dict[str, str], known: set[str]) -> dict[str, str]:
    """`a=b,c=d` -> {"a": "b", "c": "d"} with keys checked against the known names."""
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise BadInput(f"--{what} {text!r}: '{item}' is not NAME=VALUE",
                           f"write e.g. --{what} instruction=question,output=answer")
        key, value = (part.strip() for part in item.split("=", 1))
        key = aliases.get(key, key)
        if key not in known:
            raise BadInput(f"--{what}: unknown name '{key}'", close_names(key, sorted(known)))
        pairs[key] = value
    return pairs


def _known_columns() -> set[str]:
    return {k for cols in DEFAULT_COLUMNS.values() for k in cols}


def user_columns(text: str | None) -> dict[str, str]:
    return parse_pairs(text, "columns", COLUMN_ALIASES, _known_columns())


def user_tags(text: str | None) -> dict[str, str]:
    return parse_pairs(text, "tags", TAG_ALIASES, set(DEFAULT_TAGS["sharegpt"]))


def make_spec(base: str, stage: str, columns: dict[str, str] | None = None,
              tags: dict[str, str] | None = None) -> Spec:
    cols = dict(DEFAULT_COLUMNS[base])
    cols.update({k: v for k, v in (columns or {}).items() if k in cols})
    return Spec(base, stage, cols, {**DEFAULT_TAGS.get(base, {}), **(tags or {})})

