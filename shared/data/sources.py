"""Raw example files as streams of (row dict, position) for `data align`.

Supported: .json (an array of objects, parsed incrementally so memory stays bounded; a .json file
holding JSON lines also works), .jsonl/.ndjson, .csv, .parquet, .arrow (and datasets directories),
.txt (one example per non-blank line), directories of these, stdin (`-`), and, when a name is
not a local path but looks like `owner/name`, a dataset on the Hugging Face Hub.

Every row comes with a position so that errors can say where: a line number for line-based
files, a row number (1-based) otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from lmforge.shared.core.errors import BadInput

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
              ".parquet": "parquet", ".arrow": "arrow", ".txt": "txt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20


@dataclass
class RawSource:
    """One input file (or stream). `rows()` yields (row, position) pairs."""

    name: str
    kind: str                      # json | jsonl | csv | parquet | arrow | txt | hub
    path: Path | None = None
    stream: IO[bytes] | None = None
    hub_options: dict | None = None
    meta: dict = field(default_factory=dict)   # lmforge metadata of Arrow inputs, once opened

    def where(self, pos: int) -> str:
        if self.kind in ("jsonl", "csv", "txt"):
            return f"{self.name} line {pos}"
        return f"{self.name} row {pos}"

    def columns(self) -> list[str] | None:
        """Column names when the format declares them up front (else None: look at rows)."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).schema_arrow.names
        if self.kind == "arrow":
            from lmforge.shared.core.arrowio import open_arrow

            return open_arrow(self.path).schema.names
        return None

    def rows(self) -> Iterator[tuple[dict, int]]:
        reader = {"json": _json_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "txt": _txt_rows,
                  "parquet": _parquet_rows, "arrow": _arrow_rows, "hub": _hub_rows}[self.kind]
        yield from reader(self)

    def _binary(self) -> IO[bytes]:
        if self.stream is not None:
            return self.stream
        assert self.path is not None  # a source is a path or a stream
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise BadInput(f"{self.name}: cannot be read ({exc.strerror})") from None


def discover(inputs: list[str]) -> list[RawSource]:
    """Expand the command line's inputs into sources (directories into their files, sorted)."""
    sources: list[RawSource] = []
    for item in inputs or ["-"]:
        if item == "-":
            sources.append(_stdin_source())
            continue
        path = Path(item)
        if path.is_dir():
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                sources.append(RawSource(item, "arrow", path))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise BadInput(f"{item}: directory holds no data files "
                               f"({', '.join(sorted(EXTENSIONS))})", "check the path")
            sources += [RawSource(str(f), EXTENSIONS[f.suffix.lower()], f) for f in files]
        elif path.exists():
            if not path.is_file():
                raise BadInput(f"{item}: not a regular file", "pass a data file or a directory")
            kind = EXTENSIONS.get(path.suffix.lower())
            if kind is None:
                raise BadInput(f"{item}: unknown file type '{path.suffix or '(none)'}'",
                               f"use one of {', '.join(sorted(EXTENSIONS))}")
            sources.append(RawSource(item, kind, path))
        elif path.is_symlink():
            raise BadInput(f"{item}: broken symbolic link", "point it at an existing file")
        elif _HUB_ID.match(item) and not path.suffix:
            sources.append(RawSource(item, "hub", hub_options={"path": item}))
        else:
            raise BadInput(f"{item}: no such file or directory", "check the path")
    return sources


def _stdin_source() -> RawSource:
    if sys.stdin.isatty():
        raise BadInput("no input: stdin is a terminal", "pass a file path, or pipe data in")
    stream = sys.stdin.buffer
    head = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise BadInput("stdin: empty input", "the command before the pipe produced no data")
    if head.startswith(b"\xff\xff\xff\xff") or head.startswith(b"ARROW1"):
        return RawSource("stdin", "arrow", stream=stream)
    if stripped.startswith(b"["):
        return RawSource("stdin", "json", stream=stream)
    if stripped.startswith(b"{"):
        return RawSource("stdin", "jsonl", stream=stream)
    return RawSource("stdin", "txt", stream=stream)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{where}: not valid UTF-8 (byte {exc.start})", "re-encode the file as UTF-8") from None


_DECODER = json.JSONDecoder()
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")   # \uD800-\uDFFF: half of a UTF-16 pair


def _refuse_lone_surrogates(value: Any, text: str, where: str) -> None:
    """JSON may escape half of a UTF-16 surrogate pair alone ("\\ud800"): Python reads it, but no
    UTF-8 text (nor Arrow) can hold it. Checked only where such an escape appears."""
    if not _SURROGATE_ESCAPE.search(text):
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(f"{where}: the escape \\u{ord(exc.object[exc.start]):x} is a lone UTF-16 surrogate, "
                       "not a character", "fix or remove it (\\ud800-\\udfff escapes come in pairs)") from None


def _loads_line(raw: bytes, source: RawSource, line: int) -> Any:  # a JSON value; non-objects are refused later
    try:
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
        _refuse_lone_surrogates(value, text, source.where(line))
        return value
    except UnicodeDecodeError as exc:
        raise BadInput(f"{source.where(line)}: not valid UTF-8 (byte {exc.start})",
                       "re-encode the file as UTF-8") from None
    except ValueError as exc:
        raise BadInput(f"{source.where(line)}: invalid JSON ({exc.msg if hasattr(exc, 'msg') else exc})",
                       "fix the line, or check that the file is JSON lines") from None


def _jsonl_rows(source: RawSource, handle: IO[bytes] | None = None) -> Iterator[tuple[dict, int]]:
    handle = handle or source._binary()
    for line_no, raw in enumerate(handle, 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        row = _loads_line(raw, source, line_no)
        yield row, line_no


def _json_rows(source: RawSource) -> Iterator[tuple[dict, int]]:
    """A top-level JSON array parsed element by element (bounded memory), or JSON lines."""
    handle = source._binary()
    head = handle.peek(4096)[:4096].lstrip(b"\xef\xbb\xbf \t\r\n") if hasattr(handle, "peek") else b"["
    if head.startswith(b"{"):  # a .json file holding JSON lines
        source.kind = "jsonl"
        yield from _jsonl_rows(source, handle=handle)
        return
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="strict", newline="")
    decoder = json.JSONDecoder()
    buf, pos, eof, line_base = "", 0, False, 1

    def more() -> bool:
        nonlocal buf, eof
        try:
            chunk = text.read(_CHUNK)
        except UnicodeDecodeError as exc:
            raise BadInput(f"{source.name}: not valid UTF-8 near line "
                           f"{line_base + buf.count(chr(10))} (byte {exc.start} of a chunk)",
                           "re-encode the file as UTF-8") from None
        if not chunk:
            eof = True
            return False
        buf += chunk
        return True

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof or not more():
                return

    skip_ws()
    if pos >= len(buf):
        raise BadInput(f"{source.name}: empty file", "the file holds no examples")
    if buf[pos] != "[":
        raise BadInput(f"{source.name}: expected a JSON array of objects or JSON lines, "
                       f"found {buf[pos]!r} at the start", "wrap the rows in [...] or write one object per line")
    pos += 1
    index = 0
    while True:
        skip_ws()
        if pos >= len(buf):
            raise BadInput(f"{source.name}: truncated JSON: the array is never closed (after row {index})",
                           "the file was cut short; re-export it")
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):
                line = line_base + buf.count("\n", 0, pos)
                raise BadInput(f"{source.name} line {line}: extra data after the JSON array",
                               "a .json file holds one array")
            return
        if index > 0:
            if buf[pos] != ",":
                line = line_base + buf.count("\n", 0, pos)
                raise BadInput(f"{source.name} line {line}: invalid JSON (expected ',' or ']' after row {index})",
                               "fix the JSON syntax")
            pos += 1
            skip_ws()
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end >= len(buf) and not eof and more():
                    continue  # a scalar may go on in the next chunk
                break
            except json.JSONDecodeError as exc:
                if not eof and more():
                    continue
                line = line_base + buf.count("\n", 0, exc.pos)
                cut = exc.msg.startswith("Unterminated") or exc.pos >= len(buf.rstrip())
                reason = "truncated JSON (the file ends inside" if cut else f"invalid JSON ({exc.msg}"
                raise BadInput(f"{source.name} line {line}: {reason} row {index + 1})",
                               "fix the JSON syntax") from None
        index += 1
        _refuse_lone_surrogates(value, buf[pos:end], f"{source.name} line {line_base + buf.count(chr(10), 0, pos)}")
        yield value, index
        pos = end
        if pos > _CHUNK:  # drop what has been parsed, keeping line numbers right
            line_base += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0


def _csv_rows(source: RawSource) -> Iterator[tuple[dict, int]]:
    handle = source._binary()
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="strict", newline="")
    reader = csv.DictReader(text)
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise BadInput(f"{source.where(reader.line_num)}: the row has "
                               f"{'more' if None in row else 'fewer'} fields than the header",
                               "fix the CSV row (quote fields that contain commas)")
            yield row, reader.line_num
    except UnicodeDecodeError as exc:
        raise BadInput(f"{source.name}: not valid UTF-8 near line {reader.line_num + 1} (byte {exc.start})",
                       "re-encode the file as UTF-8") from None
    except csv.Error as exc:
        raise BadInput(f"{source.where(reader.line_num)}: invalid CSV ({exc})", "fix the CSV syntax") from None
    if reader.fieldnames is None:
        raise BadInput(f"{source.name}: empty file", "the file holds no examples")


def _txt_rows(source: RawSource) -> Iterator[tuple[dict, int]]:
    handle = source._binary()
    for line_no, raw in enumerate(handle, 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        line = _decode(raw, source.where(line_no)).rstrip("\r\n")
        if line.strip():
            yield {"text": line}, line_no


def _parquet_rows(source: RawSource) -> Iterator[tuple[dict, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(f"{source.name}: not a readable Parquet file ({exc})") from None
    index = 0
    for batch in pfile.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            index += 1
            yield row, index


def _arrow_rows(source: RawSource) -> Iterator[tuple[dict, int]]:
    from lmforge.shared.core.arrowio import open_arrow

    opened = open_arrow("-" if source.stream is not None else source.path)
    source.meta = opened.meta
    index = 0
    for row in opened.rows():
        index += 1
        yield row, index


def _hub_rows(source: RawSource) -> Iterator[tuple[dict, int]]:
    """A dataset on the Hugging Face Hub (needs a network), streamed."""
    import datasets

    options = dict(source.hub_options or {})
    options.setdefault("split", "train")
    try:
        stream = datasets.load_dataset(**options, streaming=True)
    except Exception as exc:  # offline, unknown id, gated...
        raise BadInput(f"{source.name}: not a local path, and not loadable from the Hugging Face Hub "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                       "check the path, or the dataset id and your network") from None
    for index, row in enumerate(stream, 1):
        yield row, index
