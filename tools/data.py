"""`lmforge data ...`: align, merge, split and show datasets (Arrow streams in and out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ._cli import command, group, invocation, print_json, print_path

app = group("Align, merge, split, pack and inspect datasets (Arrow streams in and out).")

Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write here (atomically). Default: stdout, when it is not a terminal.")]
Seed = Annotated[int, typer.Option(help="Random seed; same inputs and seed give identical output.")]


@command(app, "align")
def align(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="JSON, JSONL, CSV, Parquet, Arrow or TXT files, directories of them, datasets "
             "directories, or '-' for stdin (the default).", show_default=False)] = None,
    output: Output = None,
    format: Annotated[Literal["auto", "alpaca", "sharegpt", "openai", "pairwise", "kto", "text"], typer.Option(
        "--format", "-f", help="Source format; auto detects it from the columns and says so on stderr.")] = "auto",
    columns: Annotated[Optional[str], typer.Option(
        help="Column names when yours differ: OURS=YOURS,... (instruction, input, output, system, "
             "history, messages, tools, chosen, rejected, label, prompt, completion, text).")] = None,
    tags: Annotated[Optional[str], typer.Option(
        help="Chat role tags: role=from,content=value,user=human,assistant=gpt,observation=...,"
             "function=...,system=...")] = None,
    dataset_info: Annotated[Optional[Path], typer.Option(
        help="A LLaMA-Factory dataset_info.json (or its directory): align entries named by --name.")] = None,
    name: Annotated[Optional[list[str]], typer.Option(
        help="Entry of --dataset-info to align (repeat for several).")] = None,
    skip_invalid: Annotated[bool, typer.Option(
        help="Drop invalid rows (counted by reason on stderr) instead of failing on the first.")] = False,
    max_samples: Annotated[Optional[int], typer.Option(
        min=1, help="Keep at most N examples from each input.")] = None,
    sample: Annotated[Literal["first", "random"], typer.Option(
        help="With --max-samples: the first N rows, or a uniform random sample (by --seed).")] = "first",
    seed: Seed = 42,
) -> None:
    """Convert source data into the aligned schema (prompt, response, system, tools[, label])."""
    from lmforge.shared.core import arrowio, log, meta
    from lmforge.shared.data import align as aligning

    arrowio.check_output(output)
    options = aligning.AlignOptions(inputs=inputs or [], format=format, columns=columns, tags=tags,
                                    dataset_info=dataset_info, names=name or [],
                                    skip_invalid=skip_invalid, max_samples=max_samples,
                                    sample=sample, seed=seed)
    if not options.inputs and dataset_info is None:
        options.inputs = ["-"]
    planned = aligning.plan(options)
    stage = aligning.stage_of(planned)
    for item in planned:
        how = "detected" if format == "auto" and dataset_info is None else "reading"
        log.info(f"align: {item.source.name}: {how} {item.spec.describe()}")
    cmd, opts = invocation()
    metadata = {"kind": "aligned", "stage": stage, "provenance": [meta.step(
        cmd, opts, inputs=[{"source": p.source.name, "format": p.spec.describe()} for p in planned])]}
    report = aligning.Report()
    from lmforge.shared.data.aligned import schema

    with arrowio.ArrowOutput(output, schema(stage), metadata) as out:
        for batch in aligning.run(planned, options, report):
            out.write(batch)
        out.set_summary(report.as_dict())


@command(app, "merge")
def merge(
    inputs: Annotated[list[str], typer.Argument(help="Datasets to merge (one of them may be '-' for stdin).")],
    output: Output = None,
    mix: Annotated[Literal["concat", "interleave-under", "interleave-over"], typer.Option(
        help="concat; interleave-under: stop when an input runs out; interleave-over: restart "
             "inputs that run out until all have been used up.")] = "concat",
    probs: Annotated[Optional[str], typer.Option(
        help="With interleave: draw each row's input with these probabilities, e.g. 0.7,0.3 "
             "(default: round robin).")] = None,
    seed: Seed = 42,
) -> None:
    """Merge datasets of the same kind and stage into one."""
    from lmforge.shared.core import arrowio, meta
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.data import mixing

    arrowio.check_output(output)
    if sum(1 for i in inputs if i == "-") > 1:
        raise BadInput("stdin ('-') can be given only once")
    if probs and mix == "concat":
        raise BadInput("--probs applies to interleaving", "add --mix interleave-under or interleave-over")
    sources = [arrowio.open_arrow(i) for i in inputs]
    shared_meta = mixing.check_compatible(sources)
    weights = mixing.parse_probs(probs, len(sources))
    cmd, opts = invocation()
    metadata = {**shared_meta, "provenance": [meta.step(
        cmd, opts, inputs=[{"source": s.name, "provenance": s.meta.get("provenance", [])} for s in sources])]}
    with arrowio.ArrowOutput(output, sources[0].schema, metadata) as out:
        for batch in mixing.merge(sources, mix, weights, seed):
            out.write(batch)


@command(app, "split")
def split(
    input: Annotated[str, typer.Argument(help="Dataset to split, or '-' for stdin.")] = "-",
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory to write train.arrow and val.arrow into.")] = Path("split"),
    val_size: Annotated[float, typer.Option(
        help="Validation share: a fraction below 1 (0.1) or a row count (500).")] = 0.1,
    seed: Seed = 42,
) -> None:
    """Split a dataset into train and validation sets (random rows, order kept). Prints the directory."""
    from lmforge.shared.core import arrowio, log, meta
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.data import mixing

    if output.exists() and not output.is_dir():
        raise BadInput(f"{output}: exists and is not a directory", "give a directory to -o")
    source = arrowio.spool_stdin(arrowio.open_arrow(input))
    if not source.meta.get("kind"):
        raise BadInput(f"{source.name}: has no lmforge metadata", "make it with `lmforge data align` first")
    n = mixing.count_rows(source)
    mask = mixing.split_masks(n, val_size, seed)
    output.mkdir(parents=True, exist_ok=True)
    cmd, opts = invocation()
    base = {k: v for k, v in source.meta.items() if k != "provenance"}
    outputs = {}
    for part in ("train", "val"):
        metadata = {**base, "provenance": source.meta.get("provenance", []) + [meta.step(cmd, opts, part=part)]}
        outputs[part] = arrowio.ArrowOutput(output / f"{part}.arrow", source.schema, metadata)
    import pyarrow as pa

    with outputs["train"] as train, outputs["val"] as val:
        start = 0
        for batch in arrowio.open_arrow(source.path).batches():
            chosen = pa.array(mask[start:start + batch.num_rows])
            start += batch.num_rows
            val.write(batch.filter(chosen))
            train.write(batch.filter(pa.compute.invert(chosen)))
    log.info(f"split: {train.rows} train rows, {val.rows} validation rows")
    print_path(output)


@command(app, "show")
def show(
    input: Annotated[str, typer.Argument(help="Dataset to show, or '-' for stdin.")] = "-",
    rows: Annotated[int, typer.Option("--rows", "-n", min=0, help="How many rows to print (0: all).")] = 5,
    schema: Annotated[bool, typer.Option("--schema", help="Print the columns and the lmforge metadata.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print row count, kind, stage and provenance.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --stats/--schema: one JSON object.")] = False,
) -> None:
    """Print rows as JSON lines (for jq), or the schema, or statistics."""
    import json
    import sys

    from lmforge.shared.core import arrowio
    from lmforge.shared.data import inspect

    source = arrowio.open_arrow(input)
    if schema:
        info = inspect.schema_info(source)
        print_json(info) if json_out else sys.stdout.write(inspect.schema_text(info))
        return
    if stats:
        info = inspect.stats(source)
        print_json(info) if json_out else sys.stdout.write(inspect.stats_text(info))
        return
    write = sys.stdout.write
    printed = 0
    for batch in source.batches():
        take = batch if rows == 0 else batch.slice(0, rows - printed)
        for row in take.to_pylist():
            write(json.dumps(row, ensure_ascii=False) + "\n")
        printed += take.num_rows
        if rows and printed >= rows:
            break
    sys.stdout.flush()


@command(app, "pack")
def pack(
    model: Annotated[str, typer.Option("--model", "-m", help="Model directory or Hub id whose tokenizer to use.")],
    input: Annotated[str, typer.Argument(help="Aligned dataset, or '-' for stdin.")] = "-",
    output: Output = None,
    template: Annotated[str, typer.Option(
        "--template", "-t", help="Chat template name, or auto for the tokenizer's own (`lmforge data templates`).")] = "auto",
    stage: Annotated[Literal["pt", "sft", "rm", "dpo", "kto", "ppo"], typer.Option(
        "--stage", "-s", help="Training stage the data is for.")] = "sft",
    cutoff: Annotated[int, typer.Option(help="Maximum tokens per example (and per packed row).")] = 1024,
    packing: Annotated[bool, typer.Option(help="Pack several examples per row (best-fit decreasing).")] = False,
    neat_packing: Annotated[bool, typer.Option(
        help="Pack, keeping each example's own positions so attention never crosses examples.")] = False,
    train_on_prompt: Annotated[bool, typer.Option(help="Compute the loss on prompt tokens too.")] = False,
    mask_history: Annotated[bool, typer.Option(help="Loss on the last assistant turn only.")] = False,
    num_proc: Annotated[int, typer.Option(help="Worker processes for tokenization.")] = 1,
    seed: Seed = 42,
) -> None:
    """Tokenize aligned data with a chat template: ids, loss labels, truncation, packing."""
    from lmforge.shared.core import arrowio, meta
    from lmforge.shared.data import pack as packing_

    arrowio.check_output(output)
    options = packing_.PackOptions(model=model, template=template, stage=stage, cutoff=cutoff,
                                   packing=packing or neat_packing, neat_packing=neat_packing,
                                   train_on_prompt=train_on_prompt, mask_history=mask_history,
                                   num_proc=num_proc, seed=seed)
    packing_.validate(options)
    if template != "auto":
        from lmforge.shared.data.templates import get

        get(template)  # an unknown name fails before the tokenizer loads
    source = arrowio.open_arrow(input)
    packing_.check_stage(source.meta, source.name, stage)
    encoder = packing_.Encoder(options)
    if encoder.added:
        from lmforge.shared.core import log

        log.info(f"pack: template {encoder.render.name} needs {', '.join(encoder.added)}, missing from the "
                 "tokenizer: added as special tokens (train adds them too and resizes the embeddings)")
    cmd, opts = invocation()
    metadata = packing_.metadata(encoder, options, source.meta, meta.step(cmd, opts))
    stats = packing_.Stats()
    with arrowio.ArrowOutput(output, packing_.SCHEMAS[stage], metadata) as out:
        for batch in packing_.run(encoder, source.batches(), options, stats):
            out.write(batch)
        summary = stats.as_dict(options)
        out.set_summary(summary)
    packing_.log_summary(summary, options)


@command(app, "stats")
def stats(
    input: Annotated[str, typer.Argument(help="Packed dataset, or '-' for stdin.")] = "-",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """Token statistics of packed data: lengths, truncation, packing efficiency, loss share."""
    from lmforge.shared.core import arrowio
    from lmforge.shared.data import packstats

    source = arrowio.open_arrow(input)
    info = packstats.compute(source)
    if json_out:
        print_json(info)
    else:
        packstats.print_table(info)


@command(app, "templates")
def templates(json_out: Annotated[bool, typer.Option("--json", help="As JSON.")] = False) -> None:
    """List the chat templates `data pack --template` knows."""
    from lmforge.shared.data.templates import TEMPLATES

    rows = {name: {"description": t.description, "tools": t.supports_tools,
                   "stop_words": list(t.stop_words)} for name, t in TEMPLATES.items()}
    if json_out:
        print_json(rows)
        return
    for name, info in rows.items():
        tools = "tools" if info["tools"] else "     "
        print(f"{name:<14} {tools}  {info['description']}")
