"""LLaMA-Factory's dataset_info.json: an entry -> the Spec to read it with and where its data is."""

from __future__ import annotations

from lmforge.shared.core.errors import BadInput, close_names
from lmforge.shared.data.formats import COLUMN_ALIASES, DEFAULT_TAGS, TAG_ALIASES, Spec, make_spec


def from_dataset_info(info: dict, name: str, where: str) -> tuple[Spec, dict]:
    """A LLaMA-Factory dataset_info.json entry -> (Spec, where the data is).

    The second value is {"file": name} for local data or {"hub": load_dataset kwargs}."""
    if name not in info:
        raise BadInput(f"{where}: no dataset named '{name}'", close_names(name, list(info)))
    entry = info[name]
    if not isinstance(entry, dict):
        raise BadInput(f"{where}: entry '{name}' is not a mapping")
    for key in ("file_name", "hf_hub_url", "formatting", "split", "subset", "folder"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise BadInput(f"{where}: dataset '{name}': '{key}' must be a string, not {type(entry[key]).__name__}",
                           "fix the entry")
    for key in ("columns", "tags"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, dict)
                                      and all(isinstance(v, str) or v is None for v in value.values())):
            raise BadInput(f"{where}: dataset '{name}': '{key}' must map names to column names (strings)",
                           "fix the entry")
    cols: dict[str, str] = dict(entry.get("columns") or {})
    for media in ("videos", "audios"):
        if media in cols:
            raise BadInput(f"{where}: dataset '{name}' has {media}; video and audio are not supported yet",
                           "align a dataset of text and images")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise BadInput(f"{where}: dataset '{name}' has unknown formatting '{formatting}'",
                       "use alpaca, sharegpt or openai")
    ranking = bool(entry.get("ranking"))
    columns = {COLUMN_ALIASES.get(k, k): v for k, v in cols.items() if v}
    if formatting == "alpaca":
        columns = {"instruction": "instruction", "input": "input", "output": "output", **columns}
        if set(cols) == {"prompt"}:  # LLaMA-Factory's pre-training entries: one text column
            spec = make_spec("text", "pt", {"text": cols["prompt"]})
        else:
            stage = "pairwise" if ranking else ("kto" if "label" in columns else "sft")
            spec = make_spec("alpaca", stage, columns)
    else:
        columns = {"messages": "conversations", **columns}
        tags = {TAG_ALIASES.get(k, k): v for k, v in (entry.get("tags") or {}).items()}
        if formatting == "openai":
            tags = {**DEFAULT_TAGS["openai"], **tags}
        stage = "pairwise" if ranking else ("kto" if "label" in columns else "sft")
        spec = make_spec(formatting, stage, columns, tags)
    if entry.get("file_name"):
        return spec, {"file": entry["file_name"]}
    if entry.get("hf_hub_url"):
        hub = {"path": entry["hf_hub_url"], "split": entry.get("split", "train")}
        if entry.get("subset"):
            hub["name"] = entry["subset"]
        if entry.get("folder"):
            hub["data_dir"] = entry["folder"]
        return spec, {"hub": hub}
    raise BadInput(f"{where}: dataset '{name}' has neither file_name nor hf_hub_url",
                   "only local files and Hugging Face Hub datasets are supported")
