"""`data align | merge | split | show | pack | stats | templates`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lmforge.shared.core.commands.common import (DATA_SEED, INPUT, JSON_OUT, MAX_SAMPLES, MODEL, OUTPUT,
                                                  STREAM_OUTPUT, TEMPLATE)
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import REQUIRED, Opt, Options, declaration

STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo")
FORMATS = ("auto", "alpaca", "sharegpt", "openai", "pairwise", "kto", "text")
MIXES = ("concat", "interleave-under", "interleave-over")


@declaration
class DataAlign(Options):
    summary: ClassVar[str] = "Convert source data into the aligned schema (prompt, response, system, tools[, label])."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data align alpaca.json -o sft.arrow",
        "lmforge data align chats/ --format sharegpt --tags role=speaker,content=text,user=me,assistant=bot -o "
        "chats.arrow",
        "lmforge data align --dataset-info data/dataset_info.json --name glaive_toolcall_en_demo -o tools.arrow",
    )

    inputs: list[str] | None = Opt(
        default=None, argument=True, show_default=False,
        help="JSON, JSONL, CSV, Parquet, Arrow or TXT files, directories of them, datasets directories, "
             "or '-' for stdin (the default).")
    output: Path | None = STREAM_OUTPUT
    format: str = Opt(choices=FORMATS, default="auto", flags=("--format", "-f"),
                      help="Source format; auto detects it from the columns and says so on stderr.")
    columns: str | None = Opt(
        default=None,
        help="Column names when yours differ: OURS=YOURS,... (instruction, input, output, system, history, messages, "
             "tools, chosen, rejected, label, prompt, completion, text).")
    tags: str | None = Opt(
        default=None,
        help="Chat role tags, comma-separated: role=from, content=value, user=human, assistant=gpt, "
             "observation=..., function=..., system=...")
    dataset_info: Path | None = Opt(
        default=None, help="A LLaMA-Factory dataset_info.json (or its directory): align entries named by --name.")
    name: list[str] | None = Opt(default=None, help="Entry of --dataset-info to align (repeat for several).")
    skip_invalid: bool = Opt(default=False,
                             help="Drop invalid rows (counted by reason on stderr) instead of failing on the first.")
    max_samples: int | None = MAX_SAMPLES.but(help="Keep at most N examples from each input.")
    sample: str = Opt(choices=("first", "random"), default="first",
                      help="With --max-samples: the first N rows, or a uniform random sample (by --seed).")
    seed: int = DATA_SEED


@declaration
class DataMerge(Options):
    summary: ClassVar[str] = "Merge datasets of the same kind and stage into one."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data merge a.arrow b.arrow -o ab.arrow",
        "lmforge data merge a.arrow b.arrow --mix interleave-under --probs 0.7,0.3 --seed 1 -o mix.arrow",
    )

    inputs: list[str] = Opt(default=REQUIRED, argument=True, help="Datasets to merge (one of them may be '-' for stdin).")
    output: Path | None = STREAM_OUTPUT
    mix: str = Opt(choices=MIXES, default="concat",
                   help="concat; interleave-under: stop when an input runs out; interleave-over: restart inputs that "
                        "run out until all have been used up.")
    probs: str | None = Opt(
        default=None,
        help="With interleave: draw each row's input with these probabilities, e.g. 0.7,0.3 (default: round robin).")
    seed: int = DATA_SEED

    def check_own(self) -> None:
        if sum(1 for i in self.inputs if i == "-") > 1:
            raise BadInput("stdin ('-') can be given only once")
        if self.probs and self.mix == "concat":
            raise BadInput("--probs applies to interleaving", "add --mix interleave-under or interleave-over")


@declaration
class DataSplit(Options):
    summary: ClassVar[str] = ("Split a dataset into train and validation sets (random rows, order kept). Prints the "
                              "directory.")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data split mix.arrow --val-size 0.1 -o splits",
        "lmforge data split mix.arrow --val-size 500 -o splits",
    )

    input: str = INPUT.but(help="Dataset to split, or '-' for stdin.")
    output: Path = OUTPUT.but(default=Path("split"), help="Directory to write train.arrow and val.arrow into.")
    val_size: float = Opt(default=0.1, min=0, min_open=True,
                          help="Validation share: a fraction below 1 (0.1) or a row count (500).")
    seed: int = DATA_SEED


@declaration
class DataShow(Options):
    summary: ClassVar[str] = "Print rows as JSON lines (for jq), or the schema, or statistics."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data show mix.arrow -n 3",
        "lmforge data show mix.arrow --stats",
        "lmforge data show mix.arrow --schema --json",
    )

    input: str = INPUT.but(help="Dataset to show, or '-' for stdin.")
    rows: int = Opt(default=5, flags=("--rows", "-n"), min=0, help="How many rows to print (0: all).")
    schema: bool = Opt(default=False, flags=("--schema",), help="Print the columns and the lmforge metadata.")
    stats: bool = Opt(default=False, flags=("--stats",), help="Print row count, kind, stage and provenance.")
    json_out: bool = JSON_OUT.but(help="With --stats/--schema: one JSON object.")
    decode: bool = Opt(default=False, flags=("--decode",),
                       help="Packed data as text: trained tokens marked ([[ ]] in a pipe, green on a terminal), each "
                            "example of a packed row apart, and where --cutoff cut tokens.")
    model: str | None = Opt(default=None, flags=("--model", "-m"),
                            help="With --decode: the model (or tokenizer directory) the data was packed for "
                                 "(default: the tokenizer the packed data names, when it is a local directory).")

    def check_own(self) -> None:
        if self.decode and (self.schema or self.stats):
            raise BadInput("--decode prints rows; --schema and --stats print facts about the data", "choose one")
        if self.model is not None and not self.decode:
            raise BadInput("--model is the tokenizer of --decode", "add --decode, or drop --model")


@declaration
class DataPack(Options):
    summary: ClassVar[str] = "Tokenize aligned data with a chat template: ids, loss labels, truncation, packing."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data pack sft.arrow -m Qwen/Qwen3-0.6B -t qwen3 --cutoff 2048 --packing -o sft.packed",
        "lmforge data pack pairs.arrow -m ./base -t llama3 --stage dpo -o dpo.packed",
        "lmforge data pack chats.arrow -m ./qwen3 --thinking off -o nothink.packed",
    )

    model: str = MODEL.but(help="Model directory or Hub id whose tokenizer to use.")
    input: str = INPUT.but(help="Aligned dataset, or '-' for stdin.")
    output: Path | None = STREAM_OUTPUT
    template: str = TEMPLATE.but(flags=("--template", "-t"),
                                 help="Chat template name, or auto for the tokenizer's own (`lmforge data templates`).")
    stage: str = Opt(choices=STAGES, default="sft", flags=("--stage", "-s"), help="Training stage the data is for.")
    cutoff: int = Opt(default=1024, help="Maximum tokens per example (and per packed row).")
    truncation: str = Opt(choices=("auto", "left", "right", "drop"), default="auto",
                          help="An example longer than --cutoff: auto (LLaMA-Factory's split: a short answer stays "
                               "whole, else a short prompt, else both shrink in proportion; a cut prompt keeps its "
                               "start and the answer's header), left (the prompt loses its beginning, the answer "
                               "stays whole; dropped if the answer with its header does not fit), right (the answer loses its "
                               "end; dropped if the prompt alone fills --cutoff), or drop. What was cut is reported "
                               "by row; `data show --decode` marks it.")
    packing: bool = Opt(default=False, help="Pack several examples per row (best-fit decreasing).")
    neat_packing: bool = Opt(default=False,
                             help="Pack, keeping each example's own positions so attention never crosses examples.")
    train_on_prompt: bool = Opt(default=False, help="Compute the loss on prompt tokens too.")
    mask_history: bool = Opt(default=False, help="Loss on the last assistant turn only.")
    reasoning: str = Opt(choices=("auto", "keep", "drop"), default="auto",
                         help="Reasoning of assistant turns: auto (the template's own rule for earlier turns), "
                              "keep (every turn, named templates), drop (none).")
    thinking: str = Opt(choices=("auto", "on", "off"), default="auto",
                        help="The enable_thinking switch of hybrid thinking models (off: no reasoning, empty think "
                             "blocks).")
    mask_empty_think: bool = Opt(default=False, help="No loss on empty think blocks.")
    num_proc: int = Opt(default=1, help="Worker processes for tokenization.")
    seed: int = DATA_SEED
    # vision-language data: images are resized before their image tokens are counted
    image_max_pixels: int = Opt(default=768 * 768, min=1,
                                help="Images larger than this many pixels are scaled down (aspect kept) before packing.")
    image_min_pixels: int = Opt(default=32 * 32, min=1,
                                help="Images smaller than this many pixels are scaled up (aspect kept) before packing.")

    @property
    def packing_mode(self) -> str:
        """concat or neat (pt), none, packing or neat (the other stages)."""
        if self.stage == "pt":
            return "neat" if self.neat_packing else "concat"
        return "neat" if self.neat_packing else ("packing" if self.packing else "none")

    def check_own(self) -> None:
        if self.cutoff < 8:
            raise BadInput(f"--cutoff {self.cutoff} is too small", "use at least 8 tokens")
        if (self.packing or self.neat_packing) and self.stage not in ("sft", "pt"):
            raise BadInput(f"--packing applies to sft and pt data, not {self.stage}",
                           "drop --packing/--neat-packing for this stage")
        if self.num_proc < 1:
            raise BadInput("--num-proc must be at least 1")
        if self.train_on_prompt and self.mask_history:
            raise BadInput("--train-on-prompt and --mask-history contradict each other (loss on every prompt "
                           "token, or on the last answer only)", "choose one")


@declaration
class DataStats(Options):
    summary: ClassVar[str] = "Token statistics of packed data: lengths, truncation, packing efficiency, loss share."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data stats sft.packed",
        "lmforge data stats sft.packed --json",
    )

    input: str = INPUT.but(help="Packed dataset, or '-' for stdin.")
    json_out: bool = JSON_OUT.but(help="One JSON object instead of a table.")


@declaration
class DataTemplates(Options):
    summary: ClassVar[str] = "List the chat templates `data pack --template` knows."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge data templates",
        "lmforge data templates --json",
    )

    json_out: bool = JSON_OUT.but(help="As JSON.")
