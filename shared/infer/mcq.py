"""Multiple-choice benchmarks (MMLU, CMMLU, C-Eval) scored the seed paper's way.

Data: a zip or directory of CSV files in the published layouts, with mapping.json (subject ->
display name and category) beside it:
    MMLU    data/{dev,val,test}/{subject}_{split}.csv, no header: question,A,B,C,D,answer
    CMMLU   {dev,test}/{subject}.csv, header ",Question,A,B,C,D,Answer"
    C-Eval  {dev,val,test}/{subject}_{split}.csv, header id,question,A,B,C,D,answer[,explanation]
            (its test split has no answers)

Prompt: "The following are multiple choice questions (with answers) about {subject}." then k
solved examples from the dev split, then the question, each as
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:
With a chat template the examples are turns of a conversation (question from the user, the
letter from the assistant); without one, plain text. The prediction is the letter among
A/B/C/D whose token has the highest next-token logit. Shots are dropped, from the last, until
the prompt fits the cutoff; the question itself is never truncated.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.shared.core.errors import BadInput, close_names

LETTERS = ("A", "B", "C", "D")
HEADERS = {"en": "The following are multiple choice questions (with answers) about {subject}.",
           "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。"}


@dataclass
class Question:
    text: str
    choices: list[str]
    answer: str | None


@dataclass
class Benchmark:
    name: str
    subjects: dict[str, dict]                     # subject -> {"name", "category"}
    splits: dict[str, dict[str, list[Question]]] = field(default_factory=dict)   # split -> subject -> rows

    @property
    def language(self) -> str:
        return "zh" if self.name in ("cmmlu", "ceval") else "en"


def _rows(text: str, where: str) -> list[Question]:
    reader = list(csv.reader(io.StringIO(text)))
    if not reader:
        return []
    head = [c.strip().lower() for c in reader[0]]
    if "question" in head:
        q, a = head.index("question"), head.index("a")
        ans = head.index("answer") if "answer" in head else None
        body = reader[1:]
    else:
        q, a, ans = 0, 1, 5
        body = reader
    out = []
    for i, row in enumerate(body, 2 if "question" in head else 1):
        if len(row) < a + 4:
            raise BadInput(f"{where} line {i}: expected a question, four choices and an answer")
        answer = row[ans].strip() if ans is not None and ans < len(row) else None
        if answer is not None and answer not in LETTERS:
            raise BadInput(f"{where} line {i}: answer {answer!r} is not one of A, B, C, D")
        out.append(Question(row[q].strip(), [c.strip() for c in row[a:a + 4]], answer))
    return out


def load(path: str | Path, mapping: str | Path | None = None) -> Benchmark:
    """Read a benchmark zip or directory; the split and subject come from each file's path."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory", "give a benchmark zip or directory (e.g. mmlu.zip)")
    files: dict[str, str] = {}
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as z:
                files = {n: z.read(n).decode("utf-8-sig") for n in z.namelist() if n.lower().endswith(".csv")}
        except zipfile.BadZipFile:
            raise BadInput(f"{path}: not a zip file", "give the benchmark's zip or its extracted directory") from None
        except UnicodeDecodeError:
            raise BadInput(f"{path}: a CSV file is not UTF-8") from None
        folder = path.parent
    else:
        files = {str(p.relative_to(path)): p.read_text(encoding="utf-8-sig") for p in path.rglob("*.csv")}
        folder = path
    mapping_path = Path(mapping) if mapping else folder / "mapping.json"
    if not mapping_path.exists():
        raise BadInput(f"{mapping_path}: not found", "the subject mapping (mapping.json) must be beside the data, or pass --mapping")
    subjects = json.loads(mapping_path.read_text())
    name = (path.stem if path.is_file() else path.name).lower()
    bench = Benchmark(name, subjects)
    for file, text in files.items():
        parts = Path(file).parts
        split = next((p for p in reversed(parts[:-1]) if p in ("dev", "val", "test")), None)
        stem = Path(file).stem
        subject = stem[: -len(split) - 1] if split and stem.endswith("_" + split) else stem
        if split is None or subject not in subjects:
            raise BadInput(f"{path}: unknown benchmark layout at {file}",
                           "expected {dev,val,test}/<subject>[_<split>].csv with subjects from mapping.json")
        bench.splits.setdefault(split, {})[subject] = _rows(text, f"{path}:{file}")
    if not bench.splits:
        raise BadInput(f"{path}: holds no CSV files", "give a benchmark zip or directory")
    return bench


def choose(bench: Benchmark, split: str, subjects: str | None, shots: int) -> list[str]:
    if split not in bench.splits:
        raise BadInput(f"{bench.name}: no {split} split", f"splits here: {', '.join(sorted(bench.splits))}")
    available = sorted(bench.splits[split])
    if subjects:
        wanted = [s.strip() for s in subjects.split(",") if s.strip()]
        for s in wanted:
            if s not in available:
                raise BadInput(f"{bench.name}: unknown subject '{s}'", close_names(s, available))
    else:
        wanted = available
    if shots > 0:
        if "dev" not in bench.splits:
            raise BadInput(f"{bench.name}: no dev split for {shots}-shot prompts", "pass --shots 0")
        missing = [s for s in wanted if not bench.splits["dev"].get(s)]
        if missing:
            raise BadInput(f"{bench.name}: no dev examples for {', '.join(missing[:3])}", "pass --shots 0")
    unanswered = [s for s in wanted if any(q.answer is None for q in bench.splits[split][s])]
    if unanswered:
        raise BadInput(f"{bench.name} {split}: has no answers (e.g. {unanswered[0]})",
                       "use a split with answers (C-Eval: --split val)")
    if not any(bench.splits[split][s] for s in wanted):
        raise BadInput(f"{bench.name} {split}: no questions in the chosen subjects")
    return wanted


def format_question(q: Question) -> str:
    return q.text + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + "\nAnswer:"


class PromptBuilder:
    """Builds prompt token ids for a question, fitting the cutoff by dropping shots."""

    def __init__(self, tokenizer, renderer, language: str, cutoff: int):
        self.tokenizer, self.renderer, self.cutoff = tokenizer, renderer, cutoff
        self.header = HEADERS[language]
        self.letter_ids = self._letter_ids()

    def text(self, subject_name: str, shots: list[Question], question: Question) -> str:
        header = self.header.format(subject=subject_name)
        if self.renderer is None:  # plain text, base models
            parts = [header + "\n\n"]
            parts += [format_question(s) + f" {s.answer}\n\n" for s in shots]
            return "".join(parts) + format_question(question)
        turns = []
        for i, s in enumerate(shots):
            turns += [("user", (header + "\n\n" if i == 0 else "") + format_question(s)), ("assistant", s.answer)]
        turns.append(("user", (header + "\n\n" if not shots else "") + format_question(question)))
        return self.renderer.generation_prompt(turns)

    def ids(self, subject_name: str, shots: list[Question], question: Question) -> tuple[list[int], int]:
        """(prompt ids, shots kept): shots dropped from the last until the prompt fits."""
        for k in range(len(shots), -1, -1):
            ids = self.tokenizer(self.text(subject_name, shots[:k], question),
                                 add_special_tokens=self.renderer is None).input_ids
            if len(ids) + self.longest_letter <= self.cutoff or k == 0:
                return ids, k
        raise AssertionError("unreachable")

    def _letter_ids(self) -> list[list[int]]:
        """The tokens of each letter as the model would write it right after the prompt.

        Usually one token each, and the answer is the letter with the highest next-token logit.
        Some small vocabularies write " A" as two pieces but " B" as one; then each letter is
        scored by the log-probability of its whole continuation (see `evaluate.benchmark`)."""
        probe = Question("?", ["a", "b", "c", "d"], "A")
        base = self.text("x", [], probe)
        tok = self.tokenizer
        base_ids = tok(base, add_special_tokens=False).input_ids
        tails = []
        for letter in LETTERS:
            continued = tok(base + (" " if self.renderer is None else "") + letter, add_special_tokens=False).input_ids
            k = 0
            while k < len(base_ids) and k < len(continued) and base_ids[k] == continued[k]:
                k += 1
            tails.append(continued[k:] or continued[-1:])
        if len({tuple(t) for t in tails}) != 4:
            raise BadInput("the tokenizer does not write A, B, C and D differently after the prompt",
                           "use another --template")
        self.longest_letter = max(len(t) for t in tails)
        return tails
