"""Rewards for `train grpo`: what a program can check, from four sources.

A spec names one reward:
- built-ins, needing no code: `exact` (the answer equals the reference answer), `numeric` (the last
  number in the answer equals the reference's), `format` (a `<think>...</think>` block, then an
  answer), `regex:PATTERN` (the whole completion matches), `length:N` (-(tokens beyond N) / N);
- `cmd:COMMAND`: a program in any language; it reads JSON lines {"prompt", "completion",
  "reference"} on stdin and writes one number per line;
- `module:function` or `file.py:function`: a Python function
  f(prompts, completions, references, **kwargs) -> list of numbers;
- a reward model directory from `train rm` (its adapter and value head), scored at the last token.

Each is a callable in TRL's reward-function form: f(prompts=..., completions=..., completion_ids=...,
reference=[...], **kwargs) -> list[float], with a `__name__` that names it in the logs and metrics
(rewards/NAME/mean): the built-in's name (exact, numeric, format, regex, length), `cmd:` and the
command's script or program (`cmd:./score.sh` -> cmd:score.sh), a function's name, rm for a reward
model; made unique with _2, _3 (`unique_names`). "The answer" is what follows the last `</think>`
when there is one, stripped. A reward given a `Samples` keeps the latest batch it scored, for the
run's completions.jsonl.

With tools or an environment, a completion is the whole episode (every turn, tool results and
observations); exact, numeric and regex judge the model's last turn, cmd: rewards get "answer",
"transcript" and "env_reward" on each line too, Python functions answers=, transcripts=,
env_rewards=, and a reward model scores the episode after the prompt it was played from.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

from lmforge.shared.core.errors import BadInput, RunFailure
from lmforge.shared.train.agent.commands import stop as stop_group  # the group, reaped, pipes closed

BUILTINS = ("exact", "numeric", "format", "regex", "length")
FORMAT = re.compile(r"\s*<think>.*?</think>\s*\S.*", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
SPEC_FORMS = ("exact, numeric, format, regex:PATTERN, length:N, cmd:COMMAND, module:function, file.py:function, "
              "or a reward model directory")


def answer_of(completion: str) -> str:
    """The answer part of a completion: after the last </think>, whitespace collapsed."""
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    return " ".join(completion.split())


def number_in(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


_FLOAT32_MAX = 3.4028234663852886e38   # TRL holds rewards as float32: anything larger becomes inf


class Samples:
    """The latest batch of completions with each reward's scores. TRL scores a batch with each reward
    in turn, on the same lists: a reward already in the batch, or other completions, start the next."""

    def __init__(self) -> None:
        self.batch: dict | None = None
        self.serial = 0   # batches seen

    def add(self, name: str, prompts: list, completions: list, references: list, values: list[float]) -> None:
        batch = self.batch
        if batch is None or name in batch["rewards"] or batch["completions"] != completions:
            self.serial += 1
            batch = self.batch = {"prompts": list(prompts), "completions": list(completions),
                                  "references": list(references), "rewards": {}}
        batch["rewards"][name] = list(values)


# What an agent rollout (agent/trainer.py) adds to each completion, and the names rewards read
# them by: the content of the model's last turn, the turns as chat messages, the environment's reward
EPISODE = {"lmforge_answer": "answer", "lmforge_transcript": "transcript", "lmforge_env_reward": "env_reward"}


class Reward:
    """A named reward function in TRL's calling convention.

    With tools or an environment a completion is a whole episode: `episode` then holds, while a
    batch is scored, the lists named in EPISODE (answer, transcript, env_reward) per completion, and
    rewards that judge the answer (`judges_answer`) compare the model's last turn, not the episode's
    text (where a tool's output could hold the right number)."""

    __name__ = "reward"
    samples: Samples | None = None   # where the scored batch is kept for the run's log (grpo.py)
    judges_answer = False
    episode: dict[str, list] | None = None

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None,
                 reference: list | None = None, **kwargs: Any) -> list[float]:
        references = reference if reference is not None else [None] * len(completions)
        episode = {name: list(kwargs[key]) for key, name in EPISODE.items() if kwargs.get(key) is not None}
        texts = episode["answer"] if self.judges_answer and "answer" in episode else completions
        self.episode = episode or None
        try:
            values = self.score(list(prompts), list(texts), list(completion_ids or [[]] * len(completions)),
                                list(references))
        finally:
            self.episode = None
        # TRL sums the terms with nansum: a NaN would silently count as 0, an inf ruin the advantages
        for i, value in enumerate(values):
            if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
                rows = kwargs.get("lmforge_row")
                where = (f"row {int(rows[i]) + 1} of the data (completion {i + 1} of the batch)"
                         if rows is not None and i < len(rows) else f"completion {i + 1} of the batch")
                raise BadInput(f"reward {self.__name__} gave {value!r} for {where}: not a finite number",
                               "make the reward return finite numbers")
        if self.samples is not None:
            self.samples.add(self.__name__, list(prompts), list(completions), references, values)
        return values

    def score(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
              references: list[str | None]) -> list[float]:
        raise NotImplementedError


class Exact(Reward):
    __name__ = "exact"
    judges_answer = True

    def score(self, prompts, completions, completion_ids, references):
        return [float(ref is not None and answer_of(c) == answer_of(ref)) for c, ref in zip(completions, references)]


class Numeric(Reward):
    __name__ = "numeric"
    judges_answer = True

    def score(self, prompts, completions, completion_ids, references):
        out = []
        for c, ref in zip(completions, references):
            want, got = number_in(ref or ""), number_in(answer_of(c))
            out.append(float(want is not None and got is not None and math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9)))
        return out


class Pattern(Reward):
    def __init__(self, pattern: re.Pattern, name: str, judges_answer: bool = False):
        self.pattern, self.__name__ = pattern, name
        # format looks for the think block that opens the first turn; a regex judges the answer
        self.judges_answer = judges_answer

    def score(self, prompts, completions, completion_ids, references):
        return [float(self.pattern.fullmatch(c) is not None) for c in completions]


class Length(Reward):
    def __init__(self, limit: int):
        self.limit, self.__name__ = limit, "length"

    def score(self, prompts, completions, completion_ids, references):
        return [-max(0, len(ids) - self.limit) / self.limit for ids in completion_ids]


class Command(Reward):
    """A program: JSON lines {"prompt", "completion", "reference"} on stdin, one number per line out."""

    def __init__(self, command: str, timeout: float = 60.0):
        self.command, self.timeout = command, timeout
        self.__name__ = command_name(command)

    def score(self, prompts, completions, completion_ids, references):
        episode = self.episode or {}
        lines = "".join(json.dumps({"prompt": p, "completion": c, "reference": r,
                                    **{name: values[i] for name, values in episode.items()}},
                                   ensure_ascii=False) + "\n"
                        for i, (p, c, r) in enumerate(zip(prompts, completions, references)))
        where = f"reward command `{self.command}`"
        # its own process group (session), so that stopping it stops whatever it started too
        proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(lines, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise RunFailure(f"{where}: no answer within {self.timeout:g}s (--reward-timeout); stopped it",
                             "make it faster, or raise --reward-timeout") from None
        except BaseException:   # Ctrl-C, SIGTERM: the command goes with the run
            stop_group(proc)
            raise
        stop_group(proc)   # what it left running in the background goes too: a reward runs per batch
        if proc.returncode != 0:
            said = (stderr.strip().splitlines() or ["(nothing on stderr)"])[-1][:200]
            raise RunFailure(f"{where} failed (exit {proc.returncode}): {said}", "run it by hand on a few JSON lines")
        got = stdout.split("\n")
        if got and got[-1] == "":
            got.pop()
        if len(got) != len(completions):
            raise BadInput(f"{where} wrote {len(got)} lines for {len(completions)} completions",
                           "write exactly one number per input line")
        out = []
        for n, line in enumerate(got, 1):
            try:
                out.append(float(line))
            except ValueError:
                raise BadInput(f"{where}, output line {n}: {line[:60]!r} is not a number",
                               "write one number per line") from None
        return out


def command_name(command: str) -> str:
    """A reward command's name in logs: cmd: and the first word that names a file (the script, as in
    `python3 score.py` or `awk -f short.awk`), else the program, without its directory."""
    import os
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:   # unbalanced quotes: the shell will say so when it runs
        words = command.split()
    words = [w for w in words if "=" not in w.split("/")[0]][:8] or ["cmd"]   # VAR=value prefixes
    named = next((w for w in words if not w.startswith("-") and os.path.isfile(w)), words[0])
    base = os.path.basename(named.rstrip("/")) or named
    return "cmd:" + (re.sub(r"[^\w.+-]", "_", base)[:40] or "command")


class Function(Reward):
    """A Python function f(prompts, completions, references, **kwargs) -> list of numbers."""

    def __init__(self, spec: str, function: Callable):
        self.spec, self.function = spec, function
        name = getattr(function, "__name__", "")
        # a lambda or a callable object: the name it was given by in the spec
        self.__name__ = name if name.isidentifier() else spec.rpartition(":")[2]

    def score(self, prompts, completions, completion_ids, references):
        try:
            episode = {name + "s": values for name, values in (self.episode or {}).items()}   # answers=, ...
            values = list(self.function(prompts=prompts, completions=completions, references=references,
                                        completion_ids=completion_ids, **episode))
        except (BadInput, RunFailure):
            raise
        except SystemExit as exc:   # would end the whole run, with its exit code (0: "success", no model)
            raise BadInput(f"reward function {self.spec} called sys.exit({exc.code!r})",
                           "return one number per completion; raise an exception to stop") from None
        except Exception as exc:  # the user's code: say where it failed, on one line
            raise RunFailure(f"reward function {self.spec} raised {type(exc).__name__}: {str(exc)[:200]}") from None
        if len(values) != len(completions):
            raise BadInput(f"reward function {self.spec} returned {len(values)} values for {len(completions)} completions",
                           "return one number per completion")
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            raise BadInput(f"reward function {self.spec} returned something that is not a number",
                           "return a list of numbers") from None


def load_function(spec: str) -> Callable:
    """`module:function` or `file.py:function`."""
    import importlib
    import importlib.util
    import sys

    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise BadInput(f"--reward {spec}: not one of {SPEC_FORMS}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise BadInput(f"--reward {spec}: no file {where}")
        module_spec = importlib.util.spec_from_file_location(f"lmforge_reward_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise BadInput(f"--reward {spec}: cannot load {where}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as exc:
            raise BadInput(f"--reward {spec}: {where} called sys.exit({exc.code!r}) on import") from None
        except Exception as exc:
            raise BadInput(f"--reward {spec}: {where} failed to import ({type(exc).__name__}: {str(exc)[:160]})") from None
    else:
        if "." not in sys.path and "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(where)
        except SystemExit as exc:
            raise BadInput(f"--reward {spec}: {where} called sys.exit({exc.code!r}) on import") from None
        except ImportError as exc:
            raise BadInput(f"--reward {spec}: cannot import {where} ({exc})",
                           "give module:function importable from here, or file.py:function") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise BadInput(f"--reward {spec}: {where} has no function {name}")
    return function


def parse(spec: str, timeout: float = 60.0) -> Reward | Path:
    """One --reward spec -> a reward callable, or the Path of a reward model directory (loaded later,
    when the policy model is known). `timeout`: seconds a cmd: reward may take per batch."""
    head, _, rest = spec.partition(":")
    if spec == "exact":
        return Exact()
    if spec == "numeric":
        return Numeric()
    if spec == "format":
        return Pattern(FORMAT, "format")
    if head == "regex":
        try:
            return Pattern(re.compile(rest, re.DOTALL), "regex", judges_answer=True)
        except re.error as exc:
            raise BadInput(f"--reward {spec}: not a regular expression ({exc})") from None
    if head == "length":
        try:
            limit = int(rest)
        except ValueError:
            limit = 0
        if limit < 1:
            raise BadInput(f"--reward {spec}: give length:N with N >= 1 tokens", "e.g. length:32")
        return Length(limit)
    if head == "cmd":
        if not rest.strip():
            raise BadInput(f"--reward {spec}: no command after cmd:")
        return Command(rest, timeout)
    if Path(spec).is_dir():
        return Path(spec)
    if head in BUILTINS:
        raise BadInput(f"--reward {spec}: {head} takes no argument" if rest else f"--reward {spec}: malformed")
    if ":" in spec:
        return Function(spec, load_function(spec))
    raise BadInput(f"--reward {spec}: not one of {SPEC_FORMS}")


def weights(text: str | None, count: int, environment: bool = False) -> list[float]:
    """The weights of `count` --reward terms, plus the environment's term (last, default 1) when
    there is one: --reward-weights gives one per --reward, and may give the environment's too."""
    extra = [1.0] if environment else []
    if not text:
        return [1.0] * count + extra
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        raise BadInput(f"--reward-weights {text}: give comma-separated numbers") from None
    if environment and len(values) == count:
        values += extra
    elif len(values) != count + len(extra):
        if environment:
            raise BadInput(f"--reward-weights {text}: {len(values)} weights for {count} --reward terms and the "
                           "environment's", f"give {count} (the environment's is then 1) or {count + 1} (its own last)")
        raise BadInput(f"--reward-weights {text}: {len(values)} weights for {count} --reward terms",
                       "give one weight per --reward, in order")
    for n, value in enumerate(values, 1):
        if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            raise BadInput(f"--reward-weights {text}: weight {n} ({value:g}) is not a finite number",
                           "give finite numbers, e.g. 1,0.5")
    return values


def unique_names(rewards: list) -> None:
    """Each reward's log name once: exact, cmd:score.sh, cmd:score.sh_2, ... (a suffix that would
    meet another reward's own name moves on to the next number)."""
    taken: set[str] = set()
    names = [r.__name__ for r in rewards]
    for i, r in enumerate(rewards):
        name, n = names[i], 1
        while name in taken or (n > 1 and name in names):
            n += 1
            name = f"{names[i]}_{n}"
        taken.add(name)
        r.__name__ = name


class RewardModel(Reward):
    """A `train rm` directory: its adapter (on the same base) and value head, scored at the last token.

    With a LoRA policy the adapter loads beside the policy's ("reward", frozen) and is switched in for
    scoring, as `train ppo` does: one copy of the base weights. Otherwise (full tuning, or a full reward
    model) the reward model is loaded as its own copy."""

    def __init__(self, directory: Path, policy, model_path: str, tokenizer, device):
        import torch
        from lmforge.shared.core import rundir
        from lmforge.shared.modeldir.weights import HEAD_FILE, load_value_head
        from peft import PeftModel

        rundir.require_finished(directory)
        if not (directory / HEAD_FILE).exists():
            raise BadInput(f"--reward {directory}: not a reward model (no {HEAD_FILE})", "train one with `lmforge train rm`")
        self.__name__ = "rm"
        self.tokenizer = tokenizer
        is_adapter = (directory / "adapter_config.json").exists()
        self.shared = is_adapter and isinstance(policy, PeftModel)
        if self.shared:
            from lmforge.shared.model.value import attach_reward_adapter

            attach_reward_adapter(policy, directory, f"--reward {directory}",
                                  "train the reward model on the same model as --model")
            self.model = policy
        else:
            from lmforge.shared.model.models import load_model

            if is_adapter:
                self.model = PeftModel.from_pretrained(load_model(model_path, device, tokenizer=tokenizer), str(directory))
            else:
                self.model = load_model(str(directory), device, tokenizer=tokenizer)
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        hidden = self.model.config.get_text_config().hidden_size
        self.head = load_value_head(directory, hidden).to(next(self.model.parameters()).device)
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.prompt_ids: dict[str, list[int]] = {}
        self.images: Any = None     # multimodal.PromptImages when the prompts hold images
        self._rows: list[int] | None = None
        self._heads: list[list[int]] | None = None
        self._torch = torch

    def __call__(self, prompts, completions, completion_ids=None, reference=None, **kwargs):
        self._rows = kwargs.get("lmforge_row")   # image prompts: their row numbers (grpo's dataset column)
        # episodes: the ids each was played from (an environment may have written the prompt)
        self._heads = kwargs.get("lmforge_prompt_ids")
        try:
            return super().__call__(prompts, completions, completion_ids, reference, **kwargs)
        finally:
            self._rows = self._heads = None

    def score(self, prompts, completions, completion_ids, references):
        torch = self._torch
        from contextlib import nullcontext

        from lmforge.shared.train.ppo import adapter, last_hidden

        if self.images is not None and self._rows is not None:   # the exact ids of each row, and its images
            heads = self.images.prompt_ids(list(self._rows))
        elif self._heads is not None:
            heads = [list(h) for h in self._heads]
        else:
            heads = [self.prompt_ids[p] for p in prompts]
        rows = [h + list(c) for h, c in zip(heads, completion_ids)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        device = next(self.model.parameters()).device
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        model = self.model
        was_training = model.training
        model.eval()
        images = self.images.inputs(list(self._rows), ids) if self.images is not None and self._rows is not None else {}
        try:
            with torch.no_grad(), (adapter(model, "reward") if self.shared else nullcontext()):
                hidden = last_hidden(model, ids, mask, images)
        finally:
            model.train(was_training)
        picked = hidden[torch.arange(len(rows), device=device), last]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float().tolist()
