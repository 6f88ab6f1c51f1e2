"""`lmforge data ...`: align, merge, split, pack and inspect datasets (Arrow streams in and out)."""

from __future__ import annotations

from ._cli import command, declared, group, print_json, print_path

app = group("Align, merge, split, pack and inspect datasets (Arrow streams in and out).")


@command(app, "align")
@declared("data align")
def align(o) -> None:
    """Convert source data into the aligned schema (prompt, response, system, tools[, label])."""
    from lmforge.shared.data.align import align_dataset

    align_dataset(o)


@command(app, "merge")
@declared("data merge")
def merge(o) -> None:
    """Merge datasets of the same kind and stage into one."""
    from lmforge.shared.data.mixing import merge_datasets

    merge_datasets(o)


@command(app, "split")
@declared("data split")
def split(o) -> None:
    """Split a dataset into train and validation sets (random rows, order kept). Prints the directory."""
    from lmforge.shared.core import log
    from lmforge.shared.data.mixing import split_dataset

    train, val = split_dataset(o)
    log.info(f"split: {train} train rows, {val} validation rows")
    print_path(o.output)


@command(app, "show")
@declared("data show")
def show(o) -> None:
    """Print rows as JSON lines (for jq), or as decoded text (--decode), or the schema, or statistics."""
    import json
    import sys

    from lmforge.shared.core import arrowio
    from lmforge.shared.data import inspect

    source = arrowio.open_arrow(o.input)
    if o.decode:
        _decoded(source, o)
        return
    if o.schema or o.stats:
        info = inspect.schema_info(source) if o.schema else inspect.stats(source)
        text = inspect.schema_text if o.schema else inspect.stats_text
        print_json(info) if o.json_out else sys.stdout.write(text(info))
        return
    for row in inspect.rows(source, o.rows):
        sys.stdout.write(json.dumps(row, ensure_ascii=False, default=inspect.json_bytes) + "\n")
    sys.stdout.flush()


def _decoded(source, o) -> None:
    """data show --decode: packed rows as text, trained tokens and cuts marked."""
    import sys

    from lmforge.shared.core import arrowio
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.data import show

    if source.meta.get("kind") != "packed":
        raise BadInput(f"{source.name}: --decode shows packed data (token ids); this is "
                       f"{source.meta.get('kind') or 'not lmforge'} data, printed as text without it",
                       "drop --decode, or pack it first (`lmforge data pack`)")
    tokenizer = show.tokenizer_for(source.meta, o.model, source.name)
    source = arrowio.spool_stdin(source)   # read twice: the summary (what was cut) is at the end
    source.check_complete()
    summary = source.summary()
    assert source.path is not None   # a file, or stdin spooled to one
    rows = arrowio.open_arrow(source.path)
    color = sys.stdout.isatty()
    console = None
    if color:
        from rich.console import Console

        console = Console(highlight=False)
    for page in show.pages(rows, o.rows, tokenizer, summary, color):
        if console is not None:   # one blank line between rows
            text = page.rich()
            text.rstrip()
            console.print(text, end="\n\n")
        else:
            sys.stdout.write(page.plain().rstrip("\n") + "\n\n")
    sys.stdout.flush()


@command(app, "pack")
@declared("data pack")
def pack(o) -> None:
    """Tokenize aligned data with a chat template: ids, loss labels, truncation, packing."""
    from lmforge.shared.data.packing import pack_dataset

    pack_dataset(o)


@command(app, "stats")
@declared("data stats")
def stats(o) -> None:
    """Token statistics of packed data: lengths, truncation, packing efficiency, loss share."""
    from lmforge.shared.core import arrowio
    from lmforge.shared.data import packstats

    info = packstats.compute(arrowio.open_arrow(o.input))
    if o.json_out:
        print_json(info)
    else:
        packstats.print_table(info)


@command(app, "templates")
@declared("data templates")
def templates(o) -> None:
    """List the chat templates `data pack --template` knows."""
    from lmforge.shared.data.templates import catalogue

    rows = catalogue()
    if o.json_out:
        print_json(rows)
        return
    for name, info in rows.items():
        tools = "tools" if info["tools"] else "     "
        print(f"{name:<14} {tools}  {info['description']}")
