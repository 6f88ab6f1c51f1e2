"""Datasets between tools: Arrow IPC streams in, Arrow IPC streams out.

Reading accepts a path or stdin (`-`/None): Arrow IPC stream files (our output, and the cache
files of Hugging Face `datasets`), Arrow IPC "file" format, and `datasets.save_to_disk`
directories. Everything is read batch by batch; files are memory-mapped.

Writing produces an Arrow IPC *stream* (so `datasets.Dataset.from_file` memory-maps it) to a
path or to stdout. A path is written atomically: to a hidden temporary sibling, renamed into
place only when complete. Figures known only at the end of a pass (rows dropped, truncated...)
ride in the custom metadata of a final zero-row batch under `lmforge_summary`; readers that do
not know about it (datasets, pandas) see nothing.

That final batch is also the stream's end marker. Every stream lmforge writes says so in its
schema metadata (`lmforge_stream`), and a reader of such a stream refuses it when the marker is
missing, wherever the stream was cut: an Arrow stream cut at a record-batch boundary (a producer
killed in a pipe, a copy interrupted) is otherwise valid Arrow and would pass for a whole one.
Arrow from other tools (no `lmforge_stream` key) is read as it is.
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import pyarrow as pa
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.rundir import clean_stale, lock, output_lock_path, temp_sibling, unlock

if TYPE_CHECKING:
    from typing_extensions import TypeIs

META_KEY = b"lmforge"
SUMMARY_KEY = "lmforge_summary"
STREAM_KEY = b"lmforge_stream"   # schema metadata: "ends with a summary batch" (value: format version)
BATCH_ROWS = 4096
_FILE_MAGIC = b"ARROW1"
_POISON = b"\xff\xff\xff\xff\x08\x00\x00\x00LMFAILED"


def is_stdin(source: str | Path | None) -> TypeIs[Literal["-"] | None]:
    # TypeIs: where this is False, the type checker knows `source` is a real path (not None)
    return source is None or str(source) == "-"


# ----------------------------------------------------------------------------- reading


class ArrowSource:
    """One Arrow dataset opened for reading: its schema, lmforge metadata and batches."""

    def __init__(self, name: str, parts: list, schema: pa.Schema, path: Path | None):
        self.name = name            # for messages: the path, or "stdin"
        self.path = path            # None for stdin
        self._parts = parts         # opened readers (stream or file) in order
        self.schema = schema
        self._summary: dict | None = None

    @property
    def meta(self) -> dict:
        from lmforge.shared.core.meta import read_meta

        return read_meta(self.schema)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Record batches in order (zero-row batches skipped). Reads each part once. An lmforge
        stream that ends without its end marker raises BadInput once its last batch is read."""
        rows = 0
        for part in self._parts:
            if isinstance(part, pa.ipc.RecordBatchFileReader):
                for i in range(part.num_record_batches):
                    batch = part.get_batch(i)
                    if batch.num_rows:
                        rows += batch.num_rows
                        yield batch
                continue
            ended = False
            while True:
                try:
                    batch, custom = part.read_next_batch_with_custom_metadata()
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError) as exc:
                    raise BadInput(f"{self.name}: truncated or corrupt Arrow data after {rows} rows "
                                   f"({exc})", "regenerate it") from None
                if custom and SUMMARY_KEY.encode() in custom:
                    self._summary = json.loads(custom[SUMMARY_KEY.encode()])
                    ended = True
                if batch.num_rows:
                    ended = False   # rows after an end marker: it was not the end
                    rows += batch.num_rows
                    yield batch
            if not ended and _promises_end(part.schema):
                raise BadInput(f"{self.name}: truncated: the stream stops after {rows} rows without its end "
                               "marker (the command that wrote it was stopped or failed)", "regenerate it")

    def check_complete(self) -> int:
        """Read the whole dataset once (memory-mapped: cheap) to prove it is complete; its rows.
        For callers that hand the file to another reader (datasets) afterwards."""
        return sum(batch.num_rows for batch in self.batches())

    def rows(self) -> Iterator[dict]:
        for batch in self.batches():
            yield from batch.to_pylist()

    def summary(self) -> dict | None:
        """The end-of-pass summary; available after `batches()` has been consumed."""
        return self._summary

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self.batches()), schema=self.schema)


def _promises_end(schema: pa.Schema) -> bool:
    return bool(schema.metadata) and STREAM_KEY in schema.metadata


def end_batch(schema: pa.Schema, summary: dict | None) -> tuple[pa.RecordBatch, dict[str, str]]:
    """The zero-row batch that ends every lmforge stream, and its custom metadata."""
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    return empty, {SUMMARY_KEY: json.dumps(summary or {}, sort_keys=True)}


def stream_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with the promise of an end marker (what every lmforge writer writes)."""
    return schema.with_metadata({**(schema.metadata or {}), STREAM_KEY: b"1"})


def _open_part(path: Path, name: str):
    try:
        source = pa.memory_map(str(path))
        head = source.read(6)
        source.seek(0)
        if head == _FILE_MAGIC:
            return pa.ipc.open_file(source)
        return pa.ipc.open_stream(source)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException) and exc.errno:
            raise BadInput(f"{name}: cannot be read ({exc.strerror})") from None
        raise BadInput(f"{name}: not an Arrow dataset (an Arrow IPC stream or file, or a "
                       "datasets.save_to_disk directory)",
                       "raw JSON/JSONL/CSV/Parquet goes through `lmforge data align` first") from None


def _dataset_dir_files(path: Path) -> list[Path]:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise BadInput(f"{path}: is a DatasetDict with splits {', '.join(splits) or '(none)'}",
                       f"pass one split's directory, e.g. {path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    if state.exists():
        try:
            files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{state}: not a valid datasets state file ({exc})") from None
        return [path / f for f in files]
    arrows = sorted(p for p in path.iterdir() if p.suffix == ".arrow" and not p.name.startswith("."))
    if not arrows:
        raise BadInput(f"{path}: directory holds no Arrow data (no state.json, no *.arrow files)",
                       "pass an .arrow file or a datasets.save_to_disk directory")
    return arrows


def open_arrow(source: str | Path | None) -> ArrowSource:
    """Open an Arrow dataset from a path, a datasets directory, or stdin (`-` or None)."""
    if is_stdin(source):
        return _open_stdin()
    path = Path(source)
    name = str(source)
    if not path.exists():
        if path.is_symlink():
            raise BadInput(f"{name}: broken symbolic link", "point it at an existing file")
        raise BadInput(f"{name}: no such file or directory", "check the path")
    files = _dataset_dir_files(path) if path.is_dir() else [path]
    parts = [_open_part(f, name) for f in files]
    schemas = {p.schema.remove_metadata() for p in parts}
    if len(schemas) > 1:
        raise BadInput(f"{name}: its Arrow files have different schemas", "rebuild the dataset")
    schema = parts[0].schema
    return ArrowSource(name, parts, schema, path)


def _open_stdin() -> ArrowSource:
    stdin = sys.stdin.buffer
    if sys.stdin.isatty():
        raise BadInput("no input: stdin is a terminal",
                       "pass a dataset path, or pipe an Arrow stream in (e.g. `lmforge data align ... |`)")
    head = stdin.peek(8)[:8] if hasattr(stdin, "peek") else b""
    if not head:
        raise BadInput("stdin: empty input", "the command before the pipe produced no data; check its errors")
    try:
        if head.startswith(_FILE_MAGIC):
            part = pa.ipc.open_file(pa.BufferReader(stdin.read()))
        else:
            part = pa.ipc.open_stream(stdin)
    except (pa.ArrowInvalid, OSError):
        raise BadInput("stdin: not an Arrow stream",
                       "raw JSON/JSONL/CSV goes through `lmforge data align` first") from None
    return ArrowSource("stdin", [part], part.schema, None)


def spool_stdin(source: ArrowSource, directory: str | Path | None = None) -> ArrowSource:
    """Copy a stdin stream to a temporary file so that it can be read more than once."""
    import tempfile

    if source.path is not None:
        return source
    clean_stale(Path(directory or tempfile.gettempdir()), "lmforge-stdin-*.arrow")
    fd, tmp = tempfile.mkstemp(prefix=f"lmforge-stdin-{os.getpid()}-", suffix=".arrow", dir=directory)
    os.close(fd)
    import atexit

    atexit.register(lambda: Path(tmp).unlink(missing_ok=True))
    with pa.OSFile(tmp, "wb") as sink:
        schema = stream_schema(source.schema)
        writer = pa.ipc.new_stream(sink, schema)
        for batch in source.batches():
            writer.write_batch(batch)
        writer.write_batch(*end_batch(schema, source.summary()))
        writer.close()
    spooled = open_arrow(tmp)
    spooled.name = "stdin"
    return spooled


# ----------------------------------------------------------------------------- writing


def make_parent(target: Path) -> None:
    """Every command makes the folders its output goes into, as `train` always has (`-o runs/x`
    creates runs/); a path through a file is refused with one line."""
    for parent in [target.parent, *target.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise BadInput(f"{target}: {parent} is a file, not a directory", "choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)


def check_output(path: str | Path | None) -> None:
    """Fail early, before any work, when the output cannot be written."""
    if is_stdin(path):
        sys.stdout.buffer.write(b"")   # a closed stdout (`>&-`) refuses here, before any work
        if sys.stdout.isatty():
            raise BadInput("refusing to write binary Arrow data to a terminal",
                           "pass -o FILE, or pipe into another command (e.g. `| lmforge data show`)")
        return
    target = Path(path)
    if target.is_dir():
        raise BadInput(f"{target}: is a directory", "give a file path to -o")
    make_parent(target)


@contextmanager
def _named(path: Path | None):
    """Write errors named by the user's output: a file object's write failure (a full disk) carries
    no file name, and pyarrow's none either."""
    import errno

    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None or exc.errno == errno.EPIPE:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno),
                      str(path) if path is not None else "stdout") from exc


class AtomicFile:
    """A binary file written under a temporary sibling name and renamed into place on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temp_sibling(self.path)
        self.handle: io.BufferedWriter | None = None

    def __enter__(self) -> io.BufferedWriter:
        lock(output_lock_path(self.path), str(self.path))   # one writer per output
        try:
            self.handle = open(self.tmp, "wb")
        except BaseException:
            unlock(output_lock_path(self.path))
            raise
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.handle is not None
        try:
            with _named(self.path):
                self.handle.close()
        finally:
            try:
                if exc_type is None:
                    os.replace(self.tmp, self.path)
                else:
                    self.tmp.unlink(missing_ok=True)
            finally:
                unlock(output_lock_path(self.path))


class ArrowOutput:
    """Writes record batches as one Arrow IPC stream to a path (atomically) or to stdout."""

    def __init__(self, path: str | Path | None, schema: pa.Schema, meta: dict):
        from lmforge.shared.core.meta import with_meta

        check_output(path)
        self.path = None if is_stdin(path) else Path(path)
        self.schema = stream_schema(with_meta(schema, meta))
        self.rows = 0
        self._atomic: AtomicFile | None = None
        self._writer: Any = None  # a pa.ipc.RecordBatchStreamWriter once entered
        self._summary: dict | None = None

    def __enter__(self) -> "ArrowOutput":
        if self.path is None:
            sink = sys.stdout.buffer
        else:
            self._atomic = AtomicFile(self.path)
            sink = self._atomic.__enter__()
        self._writer = pa.ipc.new_stream(sink, self.schema)
        return self

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        if isinstance(data, pa.Table):
            for batch in data.to_batches(max_chunksize=BATCH_ROWS):
                self.write(batch)
            return
        if data.num_rows == 0:
            return
        if data.schema.remove_metadata() != self.schema.remove_metadata():
            data = pa.record_batch(data.columns, schema=self.schema)
        with _named(self.path):
            self._writer.write_batch(data)
        self.rows += data.num_rows

    def set_summary(self, summary: dict) -> None:
        self._summary = summary

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            with _named(self.path):
                if exc_type is None:   # the end marker, with the summary of the pass
                    self._writer.write_batch(*end_batch(self.schema, self._summary))
                if exc_type is None or self.path is not None:
                    self._writer.close()
                else:
                    # A failed stream on stdout ends with a message no reader accepts, so the next
                    # tool in the pipe fails instead of taking half the data for all of it.
                    sys.stdout.buffer.write(_POISON)
                    sys.stdout.buffer.flush()
        except BrokenPipeError:
            if exc_type is None:
                raise
        finally:
            if self._atomic is not None:
                self._atomic.__exit__(exc_type, exc, tb)
