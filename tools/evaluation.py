"""`lmforge eval ...`: benchmarks, generation metrics, perplexity, reward-model accuracy.

A table goes to stderr; `--json` puts the full results on stdout (and with --quiet, only there)."""

from __future__ import annotations



from ._cli import command, declared, group, print_json

app = group("Evaluate models: MMLU / CMMLU / C-Eval, generation metrics, perplexity, reward models.")

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


def _benchmark(which: str, o) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    report = evaluate.benchmark(o, which)
    rows = [[c, str(v["questions"]), f"{v['accuracy']:.2f}"] for c, v in report["categories"].items()]
    _report(report, o.json_out,
            f"{report['benchmark']} {report['split']}, {report['shots']}-shot ({report['template']} template)",
            ["category", "questions", "accuracy"], rows, ["average", str(report["questions"]), f"{report['average']:.2f}"])


@command(app, "mmlu", help="MMLU: accuracy per subject and category (the seed's k-shot letter scoring).")
@declared("eval mmlu")
def mmlu(o) -> None:
    _benchmark("mmlu", o)


@command(app, "cmmlu", help="CMMLU (Chinese): accuracy per subject and category.")
@declared("eval cmmlu")
def cmmlu(o) -> None:
    _benchmark("cmmlu", o)


@command(app, "ceval", help="C-Eval (Chinese): accuracy per subject and category (its test split has no answers: use val).")
@declared("eval ceval")
def ceval(o) -> None:
    _benchmark("ceval", o)


@command(app, "generate", help="Generate answers for aligned data; ROUGE-1/2/L, BLEU-4 and exact match against the references.")
@declared("eval generate")
def generate(o) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    report = evaluate.generate_eval(o)
    keys = ["rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"]
    _report(report, o.json_out, f"eval generate: {report['count']} examples", ["metric", "score"],
            [[k, f"{report[k]:.2f}"] for k in keys])


@command(app, "perplexity", help="Perplexity (exp of the mean token loss) on packed pt/sft data.")
@declared("eval perplexity")
def perplexity(o) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    report = evaluate.perplexity_eval(o)
    _report(report, o.json_out, "eval perplexity", ["measure", "value"],
            [["perplexity", f"{report['perplexity']:.4f}"], ["mean loss", f"{report['mean_loss']:.4f}"],
             ["tokens", f"{report['tokens']:,}"]])


@command(app, "rm", help="A reward model's pairwise accuracy and mean margin on packed pairwise data.")
@declared("eval rm")
def rm(o) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.infer import evaluate

    log.quiet_libraries()
    report = evaluate.reward_eval(o)
    _report(report, o.json_out, f"eval rm: {report['pairs']} pairs", ["measure", "value"],
            [["accuracy", f"{report['accuracy']:.2f}"], ["mean margin", f"{report['mean_margin']:.4f}"]])
