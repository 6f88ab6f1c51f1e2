"""`lmforge eval ...`: benchmarks, generation metrics, perplexity, reward-model accuracy.

A table goes to stderr; `--json` puts the full results on stdout (and with --quiet, only there)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ._cli import REQUIRED, command, group, print_json, with_options

app = group("Evaluate models: MMLU / CMMLU / C-Eval, generation metrics, perplexity, reward models.")

MODEL = [
    ("model", Annotated[str, typer.Option("--model", "-m", help="Model directory or Hub id.")], REQUIRED),
    ("adapter", Annotated[Optional[str], typer.Option(help="A PEFT adapter to apply (trained on --model).")], None),
]
JSON = [("json_out", Annotated[bool, typer.Option("--json", help="Full results as JSON on stdout.")], False)]
BENCH = [
    ("data", Annotated[str, typer.Option("--data", "-d", help="The benchmark: a zip or directory of CSVs, with mapping.json beside it.")], REQUIRED),
    ("mapping", Annotated[Optional[str], typer.Option(help="Subject mapping (default: mapping.json beside --data).")], None),
    ("split", Annotated[Literal["test", "val", "dev"], typer.Option(help="Which questions to answer.")], "test"),
    ("shots", Annotated[int, typer.Option(help="Solved examples from the dev split in each prompt.", min=0)], 5),
    ("subjects", Annotated[Optional[str], typer.Option(help="Only these subjects (comma-separated).")], None),
    ("batch_size", Annotated[int, typer.Option(help="Questions per forward pass.", min=1)], 4),
    ("template", Annotated[str, typer.Option(
        help="auto (what the model was trained with, else its chat template, else plain text), a template name, or none.")], "auto"),
    ("cutoff", Annotated[Optional[int], typer.Option(help="Longest prompt (default: the model's context); shots are dropped to fit.")], None),
    ("predictions", Annotated[Optional[Path], typer.Option(help="Save every question's prediction as JSON lines here.")], None),
]


def _report(report: dict, json_out: bool, title: str, columns: list[str], rows: list[list[str]],
            footer: list[str] | None = None) -> None:
    """The results: a table on stderr (left out under --quiet when --json has them on stdout)."""
    from lmforge.shared.core import log

    if not (json_out and log.quiet()):
        _table(title, columns, rows, footer)
    if json_out:
        print_json(report)


def _table(title: str, columns: list[str], rows: list[list[str]], footer: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    if footer:
        table.add_section()
        table.add_row(*footer, style="bold")
    Console(stderr=True).print(table)


def _benchmark(which: str, opts: dict) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    json_out = opts.pop("json_out")
    report = evaluate.benchmark(opts["model"], opts["adapter"], opts["data"], opts["mapping"], opts["split"], opts["shots"],
                                opts["subjects"], opts["batch_size"], opts["template"], opts["cutoff"],
                                opts["predictions"], which)
    rows = [[c, str(v["questions"]), f"{v['accuracy']:.2f}"] for c, v in report["categories"].items()]
    _report(report, json_out, f"{report['benchmark']} {report['split']}, {report['shots']}-shot ({report['template']} template)",
            ["category", "questions", "accuracy"], rows, ["average", str(report["questions"]), f"{report['average']:.2f}"])


@command(app, "mmlu", help="MMLU: accuracy per subject and category (the seed's k-shot letter scoring).")
@with_options(MODEL, BENCH, JSON)
def mmlu(**opts) -> None:
    _benchmark("mmlu", opts)


@command(app, "cmmlu", help="CMMLU (Chinese): accuracy per subject and category.")
@with_options(MODEL, BENCH, JSON)
def cmmlu(**opts) -> None:
    _benchmark("cmmlu", opts)


@command(app, "ceval", help="C-Eval (Chinese): accuracy per subject and category (its test split has no answers: use val).")
@with_options(MODEL, BENCH, JSON)
def ceval(**opts) -> None:
    _benchmark("ceval", opts)


@command(app, "generate", help="Generate answers for aligned data; ROUGE-1/2/L, BLEU-4 and exact match against the references.")
@with_options(MODEL, [
    ("data", Annotated[str, typer.Option("--data", "-d", help="Aligned sft data (prompts with reference answers).")], REQUIRED),
    ("template", Annotated[str, typer.Option(help="auto (what the model was trained with, else its chat template) or a name.")], "auto"),
    ("max_new_tokens", Annotated[int, typer.Option(help="Longest answer.", min=1)], 256),
    ("temperature", Annotated[float, typer.Option(help="Sampling temperature (0: greedy, the default).", min=0)], 0.0),
    ("top_p", Annotated[float, typer.Option(help="Nucleus sampling.")], 1.0),
    ("seed", Annotated[int, typer.Option(help="Sampling seed.")], 42),
    ("batch_size", Annotated[int, typer.Option(help="Prompts generated together.", min=1)], 8),
    ("max_samples", Annotated[Optional[int], typer.Option(help="Only the first N examples.", min=1)], None),
    ("output", Annotated[Optional[Path], typer.Option("--output", "-o", help="Save predictions: .jsonl (JSON lines) or .arrow.")], None),
], JSON)
def generate(**opts) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate
    from lmforge.shared.model.generation import Sampling

    log.quiet_libraries()
    sampling = Sampling(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
                        seed=opts["seed"])
    report = evaluate.generate_eval(opts["model"], opts["adapter"], opts["data"], opts["template"], sampling,
                                    opts["batch_size"], opts["max_samples"], opts["output"])
    keys = ["rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"]
    _report(report, opts["json_out"], f"eval generate: {report['count']} examples", ["metric", "score"],
            [[k, f"{report[k]:.2f}"] for k in keys])


@command(app, "perplexity", help="Perplexity (exp of the mean token loss) on packed pt/sft data.")
@with_options(MODEL, [
    ("data", Annotated[str, typer.Option("--data", "-d", help="Packed pt or sft data.")], REQUIRED),
    ("batch_size", Annotated[int, typer.Option(help="Rows per forward pass.", min=1)], 4),
], JSON)
def perplexity(**opts) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    report = evaluate.perplexity_eval(opts["model"], opts["adapter"], opts["data"], opts["batch_size"])
    _report(report, opts["json_out"], "eval perplexity", ["measure", "value"],
            [["perplexity", f"{report['perplexity']:.4f}"], ["mean loss", f"{report['mean_loss']:.4f}"],
             ["tokens", f"{report['tokens']:,}"]])


@command(app, "rm", help="A reward model's pairwise accuracy and mean margin on packed pairwise data.")
@with_options([
    ("model", Annotated[str, typer.Option("--model", "-m", help="The base model the reward model was trained on.")], REQUIRED),
    ("reward", Annotated[str, typer.Option(help="Reward model directory (`lmforge train rm`).")], REQUIRED),
    ("data", Annotated[str, typer.Option("--data", "-d", help="Pairs packed with `data pack --stage rm`.")], REQUIRED),
    ("batch_size", Annotated[int, typer.Option(help="Pairs per forward pass.", min=1)], 8),
], JSON)
def rm(**opts) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    report = evaluate.reward_eval(opts["model"], opts["reward"], opts["data"], opts["batch_size"])
    _report(report, opts["json_out"], f"eval rm: {report['pairs']} pairs", ["measure", "value"],
            [["accuracy", f"{report['accuracy']:.2f}"], ["mean margin", f"{report['mean_margin']:.4f}"]])
