"""Multi-turn episodes: the policy writes, tools and environments answer, until the episode ends.

One completion per episode, laid out as the model will be trained on it:

    prompt | turn 1 (model) | results / observation | turn 2 (model) | ... | last turn (model)

with a mask that is 1 on the model's own tokens and 0 on everything tools and environments
wrote, so the loss, the KL term and the token counts cover only what the model chose. Nothing is
padded or re-tokenized between turns: every turn is generated on exactly the ids that precede it,
so positions and attention in the training passes are those of the rollout.

An episode ends when the model answers without a tool call (no environment), when the environment
says done, after --max-turns model turns, or when the next turn would not fit in the completion
budget (--max-new-tokens counts the whole episode); the last two mark it truncated. Generation runs
for all open episodes of a batch at once; the tool calls of a turn run in parallel.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.aligned import ASSISTANT, TOOL, USER
from lmforge.shared.data.templates import prompt_opens_think
from lmforge.shared.train.agent.environment import Environment, row_for_environment
from lmforge.shared.train.agent.tools import Result, ToolSet, names_of
from lmforge.shared.train.agent.turns import Reply, Writer, malformed_message, read_reply


class Generate(Protocol):
    """Sample one continuation per sequence, at most max_new_tokens, stopping after a stop token.
    Returns the new ids and (when the backend gives them) their log-probabilities."""

    def __call__(self, sequences: list[list[int]], max_new_tokens: int,
                 episodes: list[int]) -> tuple[list[list[int]], list[list[float]] | None]: ...


@dataclass
class Episode:
    index: int
    id: str
    row: dict
    prompt_ids: list[int]
    tools_json: str = ""               # the schemas shown to the model (for templates that need them)
    offered: set[str] | None = None    # the tools its row offers (None: the row names none, so all run)
    env_tools: set[str] = field(default_factory=set)
    ids: list[int] = field(default_factory=list)       # the completion: all turns
    mask: list[int] = field(default_factory=list)      # 1 = written by the model
    logprobs: list[float] | None = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # the transcript after the prompt
    turns: int = 0
    calls: int = 0
    errors: int = 0
    malformed: int = 0
    reward: float = 0.0                # the environment's, summed over the episode
    done: bool = False
    truncated: bool = False
    opened: bool = False               # the context ends inside a think block
    spaces: str = ""                   # the spaces ending the last header, left for the model to write
    workdir: str | None = None
    answer: str = ""                   # the content of the model's last turn

    def add(self, ids: list[int], trained: bool, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.mask += [int(trained)] * len(ids)
        if self.logprobs is not None:
            if trained and logprobs is None:
                self.logprobs = None
            else:
                self.logprobs += list(logprobs) if trained and logprobs is not None else [0.0] * len(ids)


@dataclass
class Agent:
    """What a rollout needs besides the model: the template (renderer) and tokenizer, the stop
    ids, the tools, the environment, and the limits."""
    renderer: object
    tokenizer: object
    stop_ids: list[int]
    tools: ToolSet = field(default_factory=ToolSet)
    environment: Environment | None = None
    max_turns: int = 4
    max_tokens: int = 256             # the whole completion: the model's turns and what it was told
    workers: int = 8                  # tool calls run at once
    workdir_root: str | None = None   # where episodes' working directories go (the system's temp)
    _count: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise BadInput(f"--max-turns {self.max_turns}: must be at least 1")
        if not self.stop_ids:
            raise BadInput("the template has no stop token in this tokenizer: turns cannot end")
        self.writer = Writer(self.renderer, self.tokenizer)
        if self.tools:
            self._need_tool_style()

    def _need_tool_style(self) -> None:
        if self.writer.style is None:
            raise BadInput(f"template '{getattr(self.renderer, 'name', 'auto')}' cannot express tool calls",
                           "pack the prompts with a template that has tools (qwen, chatml, llama3, mistral, default)")

    # -- episodes
    def episodes(self, rows: list[dict], prompt_ids: Callable[[dict], list[int]]) -> list[Episode]:
        self._count += 1
        out = []
        for i, row in enumerate(rows):
            shown = row.get("tools") or ""
            # a row that offers tools (packed with its prompt) may call those alone
            out.append(Episode(i, f"{self._count}-{i}", row, list(prompt_ids(row)), shown,
                               set(names_of(shown)) or None))
        return out

    def play(self, episodes: list[Episode], generate: Generate) -> list[Episode]:
        """Run the episodes to their end; their fields hold the outcome."""
        env = self.environment
        reset: list[Episode] = []
        ok = False
        try:
            for e in episodes:
                if env is not None:
                    reset.append(e)
                    self._reset(e, env.reset(e.id, row_for_environment(e.row)))
                if not e.prompt_ids:
                    raise BadInput(f"episode {e.id} (row {e.row.get('lmforge_row', e.index)}) has an empty prompt",
                                   "pack prompts with `data pack --stage ppo`, or let the environment's reset "
                                   "give an observation")
                e.opened = prompt_opens_think(self._text(e.prompt_ids[-8:]))
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                while True:
                    active = [e for e in episodes if not e.done]
                    if not active:
                        break
                    self._turn(active, generate, pool)
            for e in reset:
                e.reward += env.end(e.id) if env is not None else 0.0
            ok = True
        finally:
            for e in episodes:
                if e.workdir:
                    shutil.rmtree(e.workdir, ignore_errors=True)
                    e.workdir = None
            if not ok and env is not None:
                env.close()   # a broken exchange leaves it in an unknown state: the run stops
        return episodes

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)  # type: ignore[attr-defined]

    def _reset(self, e: Episode, reply: dict) -> None:
        tools: list[dict] = []
        if reply.get("tools"):
            from lmforge.shared.data.aligned import RowError
            from lmforge.shared.data.formats import normalize_tools

            try:
                tools = json.loads(normalize_tools(reply["tools"]) or "[]")
            except RowError as exc:
                raise BadInput(f"--environment, episode {e.id}: the tools of its reset answer: {exc}",
                               'give "tools" as a list of OpenAI tool schemas') from None
        e.env_tools = {name for t in tools if isinstance(name := (t.get("function") or t).get("name"), str)}
        if e.env_tools:
            self._need_tool_style()
        if reply.get("observation") is not None:   # the environment writes the prompt
            mine = json.loads(e.tools_json) if e.offered is not None else self.tools.schemas()
            listed = [*mine, *(t for t in tools if (t.get("function") or t).get("name") not in (e.offered or ()))]
            shown = json.dumps(listed, ensure_ascii=False) if listed else ""
            e.prompt_ids, text = self.writer.prompt_ids(reply["observation"], reply.get("system") or "", shown)
            e.spaces = text[len(text.rstrip(" ")):]
            e.tools_json = shown
        elif tools:
            e.tools_json = json.dumps(tools)

    # -- one turn of every open episode
    def _turn(self, active: list[Episode], generate: Generate, pool: ThreadPoolExecutor) -> None:
        budgets = [self.max_tokens - len(e.ids) for e in active]
        new, logprobs = generate([e.prompt_ids + e.ids for e in active], max(budgets), [e.index for e in active])
        if len(new) != len(active):
            raise RuntimeError(f"generation returned {len(new)} continuations for {len(active)} episodes")
        follow: list[tuple[Episode, Reply, str]] = []   # (episode, its reply, "malformed" | "tools" | "observation")
        jobs: list[tuple[Episode, int, object]] = []
        for k, (e, ids, budget) in enumerate(zip(active, new, budgets)):
            ids = list(ids)
            cut = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
            ids = ids[:min(cut, budget)]
            lp = logprobs[k][:len(ids)] if logprobs is not None else None
            e.add(ids, True, lp)
            e.turns += 1
            ended = bool(ids) and ids[-1] in self.stop_ids
            text = self._text(ids[:-1] if ended else ids)
            if e.spaces and text.startswith(e.spaces):   # the header's, written by the model
                text = text[len(e.spaces):]
            reply = read_reply(self.renderer, text, opened=e.opened, tools=bool(self.tools) or bool(e.env_tools))
            e.answer = reply.content
            e.messages.append({"role": ASSISTANT, "content": reply.content, "reasoning": reply.reasoning,
                               "tool_calls": reply.calls or None})
            if not ended:                      # out of budget mid-turn
                e.done = e.truncated = True
                continue
            if reply.malformed:
                e.malformed += 1
                follow.append((e, reply, "malformed"))
            elif reply.calls:
                e.calls += len(reply.calls)
                follow.append((e, reply, "tools"))
                if e.turns < self.max_turns:   # results that would never be read are not fetched
                    for j, c in enumerate(reply.calls):
                        if c["name"] not in e.env_tools:
                            runs = c["name"] in self.tools.tools and (e.offered is None or c["name"] in e.offered)
                            if e.workdir is None and runs:   # before the threads
                                e.workdir = tempfile.mkdtemp(prefix="lmforge-episode-", dir=self.workdir_root)
                            jobs.append((e, j, pool.submit(self.tools.call, c["name"], c["arguments"], e.workdir,
                                                           e.id, e.offered)))
            elif self.environment is not None:
                follow.append((e, reply, "observation"))
            else:
                e.done = True                  # a final answer
        results: dict[tuple[int, int], Result] = {(e.index, j): f.result() for e, j, f in jobs}  # type: ignore
        for e, reply, kind in follow:
            self._follow(e, reply, kind, results)

    def _follow(self, e: Episode, reply: Reply, kind: str, results: dict) -> None:
        """What the episode is told after its turn (or its end)."""
        env = self.environment
        text: str | None = None
        before = len(e.messages)   # the transcript keeps only what the model reads
        if kind == "malformed":
            error = malformed_message(self.writer.style, reply.malformed or "")
            if e.turns < self.max_turns:
                text = self.writer.error_text(reply, error, e.tools_json)
                e.messages.append({"role": USER, "content": error})
        elif kind == "tools":
            env_calls = [c for c in reply.calls if c["name"] in e.env_tools]
            told: list[str | None] = [None] * len(reply.calls)
            if env_calls and env is not None:
                answer = env.step(e.id, reply.text, reply.content, env_calls)
                e.reward += float(answer.get("reward", 0))
                if answer.get("done"):
                    e.done = True
                    return
                env_results = iter(answer["results"])
                for j, c in enumerate(reply.calls):
                    if c["name"] in e.env_tools:
                        value = next(env_results)
                        told[j] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if e.turns >= self.max_turns:
                e.done = e.truncated = True
                return
            for j, c in enumerate(reply.calls):
                if told[j] is None:
                    r = results[(e.index, j)]
                    e.errors += int(r.error)
                    told[j] = r.text
            pairs = [(c["name"], t or "") for c, t in zip(reply.calls, told)]
            e.messages += [{"role": TOOL, "name": n, "content": t} for n, t in pairs]
            text = self.writer.results_text(reply, pairs, e.tools_json)
        else:   # an environment's observation
            assert env is not None
            answer = env.step(e.id, reply.text, reply.content, [])
            e.reward += float(answer.get("reward", 0))
            if answer.get("done"):
                e.done = True
                return
            if e.turns < self.max_turns:
                text = self.writer.observation_text(reply, answer["observation"], e.tools_json)
                e.messages.append({"role": USER, "content": answer["observation"]})
        if text is None:                       # --max-turns reached with the episode still going
            e.done = e.truncated = True
            return
        body = text.rstrip(" ")
        ids = self.writer.ids_after(body, self._text(e.ids[-1:]))
        if len(e.ids) + len(ids) >= self.max_tokens:   # no room left for the model to answer
            e.done = e.truncated = True
            del e.messages[before:]
            return
        e.add(ids, False)
        e.opened, e.spaces = prompt_opens_think(body), text[len(body):]


def metrics(episodes: list[Episode], environment: bool = False) -> dict[str, float]:
    """Per-batch means: turns, tool calls, tool errors and malformed calls per episode, the share
    of call attempts that were well formed, truncated episodes, and the environment's reward."""
    n = max(1, len(episodes))
    calls = sum(e.calls for e in episodes)
    attempts = calls + sum(e.malformed for e in episodes)
    out = {"agent/turns": sum(e.turns for e in episodes) / n,
           "agent/tool_calls": calls / n,
           "agent/tool_errors": sum(e.errors for e in episodes) / n,
           "agent/malformed_calls": sum(e.malformed for e in episodes) / n,
           "agent/well_formed_calls": calls / attempts if attempts else 0.0,
           "agent/truncated": sum(e.truncated for e in episodes) / n}
    if environment:
        out["agent/env_reward"] = sum(e.reward for e in episodes) / n
    return out
