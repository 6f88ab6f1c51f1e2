"""`lmforge data ...`: align, merge, split and show datasets (Arrow streams in and out)."""

from __future__ import annotations



from ._cli import command, declared, group, invocation, print_json, print_path

app = group("Align, merge, split, pack and inspect datasets (Arrow streams in and out).")


@command(app, "align")
@declared("data align")
def align(
    inputs, output, format, columns, tags, dataset_info, name, skip_invalid, max_samples, sample, seed,
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
    from lmforge.shared.data.aligned import VERSION

    metadata = {"kind": "aligned", "stage": stage, "schema_version": VERSION, "provenance": [meta.step(
        cmd, opts, inputs=[{"source": p.source.name, "format": p.spec.describe()} for p in planned])]}
    report = aligning.Report()
    from lmforge.shared.data.aligned import schema

    with arrowio.ArrowOutput(output, schema(stage), metadata) as out:
        for batch in aligning.run(planned, options, report):
            out.write(batch)
        out.set_summary(report.as_dict())


@command(app, "merge")
@declared("data merge")
def merge(inputs, output, mix, probs, seed) -> None:
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
@declared("data split")
def split(input, output, val_size, seed) -> None:
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
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    cmd, opts = invocation()
    base = {k: v for k, v in source.meta.items() if k != "provenance"}
    outputs = {}
    for part in ("train", "val"):
        metadata = {**base, "provenance": source.meta.get("provenance", []) + [meta.step(cmd, opts, part=part)]}
        outputs[part] = arrowio.ArrowOutput(output / f"{part}.arrow", source.schema, metadata)
    import pyarrow as pa

    try:
        with outputs["train"] as train, outputs["val"] as val:
            start = 0
            for batch in arrowio.open_arrow(source.path).batches():
                chosen = pa.array(mask[start:start + batch.num_rows])
                start += batch.num_rows
                val.write(batch.filter(chosen))
                train.write(batch.filter(pa.compute.invert(chosen)))
    except BaseException:
        if created:   # a failed split (full disk, a cut input) leaves no empty directory behind
            import shutil

            shutil.rmtree(output, ignore_errors=True)
        raise
    log.info(f"split: {train.rows} train rows, {val.rows} validation rows")
    print_path(output)


@command(app, "show")
@declared("data show")
def show(input, rows, schema, stats, json_out) -> None:
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
            write(json.dumps(row, ensure_ascii=False, default=_json_bytes) + "\n")
        printed += take.num_rows
        if rows and printed >= rows:
            break
    sys.stdout.flush()


def _json_bytes(value: object) -> object:
    """Images stored in rows (bytes) print as base64, as JSON has no bytes."""
    if isinstance(value, (bytes, bytearray)):
        import base64

        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@command(app, "pack")
@declared("data pack")
def pack(
    model, input, output, template, stage, cutoff, packing, neat_packing, train_on_prompt, mask_history,
    reasoning, thinking, mask_empty_think, num_proc, seed, image_max_pixels, image_min_pixels,
) -> None:
    """Tokenize aligned data with a chat template: ids, loss labels, truncation, packing."""
    from lmforge.shared.core import arrowio, meta
    from lmforge.shared.data import pack as packing_

    arrowio.check_output(output)
    options = packing_.PackOptions(model=model, template=template, stage=stage, cutoff=cutoff,
                                   packing=packing or neat_packing, neat_packing=neat_packing,
                                   train_on_prompt=train_on_prompt, mask_history=mask_history,
                                   reasoning=reasoning, thinking=thinking, mask_empty_think=mask_empty_think,
                                   num_proc=num_proc, seed=seed, image_max_pixels=image_max_pixels,
                                   image_min_pixels=image_min_pixels)
    packing_.validate(options)
    if template != "auto":
        from lmforge.shared.data.templates import get

        get(template)  # an unknown name fails before the tokenizer loads
    source = arrowio.open_arrow(input)
    packing_.check_stage(source.meta, source.name, stage)
    encoder = packing_.Encoder(options)
    if encoder.added:
        from lmforge.shared.core import log

        assert encoder.render is not None  # tokens are added only for a chat template
        log.info(f"pack: template {encoder.render.name} needs {', '.join(encoder.added)}, missing from the "
                 "tokenizer: added as special tokens (train adds them too and resizes the embeddings)")
    cmd, opts = invocation()
    metadata = packing_.metadata(encoder, options, source.meta, meta.step(cmd, opts))
    stats = packing_.Stats()
    with arrowio.ArrowOutput(output, packing_.schema_for(stage, encoder.vision is not None), metadata) as out:
        from lmforge.shared.data import aligned

        batches = aligned.batches(source) if stage != "pt" else source.batches()  # version 1 upgraded
        for batch in packing_.run(encoder, batches, options, stats):
            out.write(batch)
        summary = stats.as_dict(options)
        out.set_summary(summary)
    packing_.log_summary(summary, options)


@command(app, "stats")
@declared("data stats")
def stats(input, json_out) -> None:
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
@declared("data templates")
def templates(json_out) -> None:
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
