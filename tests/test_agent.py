"""Agentic rollouts: tools run by commands, environments over JSON lines, the mask of the model's
own tokens, failures that never crash or hang a run (no model needed: a scripted "model" and a
word-level tokenizer whose ids are predictable)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from agentkit import Scripted, exact_tokenizer

from lmforge.shared.train.agent.trainer import SEAMS as AGENT_SEAMS

ENVS = Path(__file__).resolve().parent / "agent_envs"
CALC_TOOLS = json.dumps([{"type": "function", "function": {
    "name": "calc", "description": "arithmetic",
    "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}}}])
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|eom_id|>"]
CALC = "import json, sys\nargs = json.loads(sys.stdin.readline())\nprint(eval(args['expr'], {'__builtins__': {}}))\n"


def _script(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return f"{sys.executable} {path}"


def _conversation(tool_result: str = "10063"):
    from lmforge.shared.data.aligned import full

    return [full(m) for m in [
        {"role": "user", "content": "What is 347*29?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "calc", "arguments": '{"expr": "347*29"}'}]},
        {"role": "tool", "content": tool_result},
        {"role": "assistant", "content": "It is 10063."}]]


def _setup(tmp: Path, template: str, texts: list[str]):
    """A tokenizer knowing every piece of `texts` and the renderer of `template` bound to it."""
    from lmforge.shared.data import templates
    from transformers import AutoTokenizer

    class Names:
        bos_token, eos_token = "<s>", "</s>"

    probe = templates.renderer(template, Names())
    rendered = [probe.conversation(_conversation(), "", CALC_TOOLS).text,
                probe.generation_prompt(_conversation()[:1], "", CALC_TOOLS), *texts]
    tok = AutoTokenizer.from_pretrained(str(exact_tokenizer(tmp / f"tok-{template}", rendered + [
        "error: the tool call could not be read not valid JSON Expecting value Write a call as NAME ... "
        "there is no tool named tools did not answer within failed exit wrote more than bytes cut there "
        "the arguments of must be a JSON object not a list needs the argument"], SPECIALS, eos="</s>", bos="<s>")))
    return tok, templates.renderer(template, tok)


def _agent(renderer, tok, tools, **kw):
    from lmforge.shared.data import templates
    from lmforge.shared.train.agent.rollout import Agent

    words = templates.stop_words(renderer.tpl, tok.eos_token)
    return Agent(renderer, tok, [tok.convert_tokens_to_ids(w) for w in words], tools, **kw)


def _calc(tmp: Path, **kw):
    from lmforge.shared.train.agent.tools import toolset

    return toolset(specs=[f"calc={_script(tmp, 'calc.py', CALC)}"], **kw)


# ----------------------------------------------------------------------------- the mask, token by token

@pytest.mark.parametrize("template", ["default", "chatml", "qwen3", "llama3", "mistral"])
def test_episode_ids_and_mask_are_those_of_the_whole_conversation(tmp_path, template):
    """A scripted model calls the calculator (a real command), reads its result and answers: the
    episode's ids are exactly the tokens of the whole conversation rendered by the template, and
    the mask is 1 exactly on the tokens `data pack` trains (the assistant turns), 0 on the tool's."""
    from lmforge.shared.data.pack import _spaces_with_answers

    tok, renderer = _setup(tmp_path, template, [])
    whole = _spaces_with_answers(renderer.conversation(_conversation(), "", CALC_TOOLS))
    prompt = renderer.generation_prompt(_conversation()[:1], "", CALC_TOOLS).rstrip(" ")
    model = Scripted(tok, {0: [whole.text[a:b] for a, b in whole.spans]})
    agent = _agent(renderer, tok, _calc(tmp_path), max_turns=3, max_tokens=400)
    [e] = agent.play(agent.episodes([{"prompt": prompt, "tools": CALC_TOOLS}],
                                    lambda row: tok(prompt, add_special_tokens=False).input_ids), model)
    encoded = tok(whole.text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(e.prompt_ids) + len(e.ids)
    assert e.prompt_ids + e.ids == encoded.input_ids[:n]
    assert n == len(encoded.input_ids) - (1 if whole.text.endswith("\n") else 0)   # all but the glue after the end
    trained = [int(any(a <= s and t <= b for a, b in whole.spans)) for s, t in encoded.offset_mapping[:n]]
    assert e.mask == trained[len(e.prompt_ids):]
    assert sum(e.mask) < len(e.mask) and e.mask[0] == 1 and e.mask[-1] == 1
    # turn 2 was generated on exactly the ids before it: prompt, turn 1, the tool's result
    (_, first), (_, second) = model.seen
    assert first == e.prompt_ids and second == e.prompt_ids + e.ids[:second.__len__() - len(e.prompt_ids)]
    assert second == encoded.input_ids[:len(second)]
    assert (e.turns, e.calls, e.errors, e.malformed, e.done, e.truncated) == (2, 1, 0, 0, True, False)
    assert e.answer == "It is 10063." and e.messages[1] == {"role": "tool", "name": "calc", "content": "10063"}


def test_parallel_calls_run_at_once_and_come_back_in_order(tmp_path):
    from lmforge.shared.train.agent.tools import toolset

    slow = _script(tmp_path, "slow.py", "import json, os, sys, time\na = json.loads(sys.stdin.read())\n"
                                        "open(str(a['n']), 'w').close()\ntime.sleep(1)\n"
                                        "print('slept', a['n'], 'with', *sorted(os.listdir('.')))\n")
    tools = toolset(specs=[f"nap={slow}"])
    turn1 = "".join('<tool_call>\n{"name": "nap", "arguments": {"n": %d}}\n</tool_call>' % k for k in (1, 2, 3))
    tok, renderer = _setup(tmp_path, "chatml", [turn1, "slept with 1 2 3 done"])
    model = Scripted(tok, {0: [turn1 + "<|im_end|>", "done<|im_end|>"]})
    agent = _agent(renderer, tok, tools, max_turns=3, max_tokens=400)
    start = time.monotonic()
    [e] = agent.play(agent.episodes([{"prompt": "x"}], lambda row: tok("<|im_start|>", add_special_tokens=False).input_ids), model)
    assert time.monotonic() - start < 2.5                                  # three 1-second calls, not 3 s
    # in order, and in one working directory for the episode (each call saw the others' files)
    assert [m["content"] for m in e.messages if m["role"] == "tool"] == [f"slept {n} with 1 2 3" for n in (1, 2, 3)]
    told = tok.decode(e.ids, skip_special_tokens=False)
    assert ("<tool_response>\nslept 1 with 1 2 3\n</tool_response>\n<tool_response>\nslept 2 with 1 2 3\n"
            "</tool_response>") in told
    assert e.calls == 3 and e.turns == 2


# ----------------------------------------------------------------------------- commands and tool sets

def test_command_runner_deadline_cap_and_process_group(tmp_path):
    """A command that hangs is killed with everything it started; output over the cap is cut; the
    input arrives on stdin; the exit status is kept."""
    from lmforge.shared.train.agent import commands

    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    ran = commands.run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], b"", cwd=str(tmp_path), timeout=1, cap=100)
    assert ran.timed_out and ran.code is None and time.monotonic() - start < 5
    child = int(pidfile.read_text())
    for _ in range(50):   # the background sleep went with its group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the tool's child outlived the timeout")
    ran = commands.run(["sh", "-c", "yes"], b"", cwd=None, timeout=10, cap=1000)
    assert ran.cut and len(ran.stdout) == 1000 and not ran.timed_out
    ran = commands.run(["sh", "-c", "cat; echo oops >&2; exit 3"], b'{"a": 1}\n', cwd=None, timeout=10, cap=1000)
    assert (ran.stdout, ran.stderr, ran.code) == (b'{"a": 1}\n', b"oops\n", 3)
    ran = commands.run(["sh", "-c", "sleep 5 & echo quick"], b"", cwd=None, timeout=10, cap=1000)
    assert ran.stdout == b"quick\n" and ran.code == 0   # a child left holding the pipes does not make it wait


def test_tool_failures_are_what_the_model_reads(tmp_path):
    from lmforge.shared.train.agent.tools import toolset

    programs = {"hang": "import time; time.sleep(60)",
                "fail": "import sys; print(1); sys.exit('disk on fire')",
                "chatty": "print('x' * 100000)",
                "binary": "import sys; sys.stdout.buffer.write(bytes([104, 105, 255]))",
                "echo": "import sys; print(sys.stdin.read().strip())"}
    specs = [f"{name}={_script(tmp_path, name + '.py', code)}" for name, code in programs.items()]
    tools = toolset(specs=[*specs, "where=pwd"], timeout=1, cap=200)
    r = tools.call("hang", {}, str(tmp_path))
    assert (r.error, r.kind, r.text) == (True, "timeout", "error: hang did not answer within 1s")
    r = tools.call("fail", {}, None)
    assert (r.error, r.text) == (True, "error: fail failed (exit 1): disk on fire")
    r = tools.call("chatty", {}, None)
    assert r.error and r.text == "x" * 200 + "\n[error: chatty wrote more than 200 bytes; cut there]"
    assert tools.call("binary", {}, None).text == "hi\ufffd"
    assert tools.call("echo", {"q": "é \"quoted\""}, None).text == '{"q": "é \\"quoted\\""}'
    assert tools.call("where", {}, str(tmp_path)).text == str(tmp_path)
    r = tools.call("nope", {}, None)
    assert (r.kind, r.text) == ("unknown", "error: there is no tool named 'nope' (tools: hang, fail, chatty, binary, "
                                           "echo, where)")
    assert tools.call("echo", [1, 2], None).text == "error: the arguments of echo must be a JSON object, not a list"


def test_tool_sets_from_a_file_and_options(tmp_path, monkeypatch):
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train.agent.tools import check_rows, toolset

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "calc.py").write_text(CALC)
    spec = json.loads(CALC_TOOLS)
    spec[0]["command"] = ["python3", "bin/calc.py"]
    (tmp_path / "tools.json").write_text(json.dumps(spec + [{"name": "now", "command": "date +%s"}]))
    monkeypatch.chdir(tmp_path / "bin")
    tools = toolset(str(tmp_path / "tools.json"), ["now=date"], timeout=3)
    assert tools.names == ["calc", "now"] and tools.tools["now"].argv == ["date"]
    assert tools.tools["calc"].argv == ["python3", str(tmp_path / "bin" / "calc.py")]   # runs from any folder
    assert tools.schemas() == json.loads(CALC_TOOLS) and tools.tools["calc"].required == ["expr"]
    assert tools.call("calc", {"expr": "6*7"}, str(tmp_path)).text == "42"
    assert tools.call("calc", {}, None).text == "error: calc needs the argument expr"
    assert tools.missing(CALC_TOOLS) == [] and toolset(specs=["now=date"]).missing(CALC_TOOLS) == ["calc"]
    with pytest.raises(BadInput, match="row 2 offers the tool 'calc', which no command runs"):
        check_rows(toolset(specs=["now=date"]), ["", CALC_TOOLS])
    for bad, says in [("[{\"name\": \"x\"}]", "no \"command\""), ("{", "not valid JSON"),
                      ("[{\"name\": \"x\", \"command\": \"no-such-program-x\"}]", "no program `no-such-program-x`"),
                      ("[{\"name\": \"a b\", \"command\": \"date\"}]", "must be letters"),
                      ("[{\"name\": \"x\", \"command\": \"date\"}, {\"name\": \"x\", \"command\": \"date\"}]",
                       "defined twice"),
                      ("[{\"name\": \"x\", \"command\": \"./missing.sh\"}]", "is not an executable file")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(BadInput, match=says):
            toolset(str(tmp_path / "bad.json"))
    for spec_text, says in [("calc", "give NAME=COMMAND"), ("calc=", "empty command"), ("c=echo 'x", "quotes"),
                            ("=date", "give NAME=COMMAND")]:
        with pytest.raises(BadInput, match=says):
            toolset(specs=[spec_text])
    with pytest.raises(BadInput, match="--tool-timeout 0: must be above 0"):
        toolset(specs=["now=date"], timeout=0)


@pytest.mark.parametrize("style, text, calls, problem", [
    ("qwen", 'Sure.\n<tool_call>\n{"name": "calc", "arguments": {"expr": "1+1"}}\n</tool_call>',
     [{"name": "calc", "arguments": {"expr": "1+1"}}], None),
    ("qwen", '<tool_call>\n{"name": "calc", "arguments": {"expr": 1+1}}\n</tool_call>', [], "not valid JSON"),
    ("qwen", '<tool_call>\n{"name": "calc", "arguments": {}}', [], "not closed"),
    ("qwen", '<tool_call>\n{"arguments": {}}\n</tool_call>', [], 'with a "name"'),
    ("qwen", "The answer is 2.", [], None),
    ("default", '{"name": "calc", "arguments": {"expr": "1"}}\n{"name": "now", "arguments": {}}',
     [{"name": "calc", "arguments": {"expr": "1"}}, {"name": "now", "arguments": {}}], None),
    ("default", '{"name": "calc", "arguments": {"expr": "1"}', [], "not valid JSON"),
    ("default", "It is {probably} 2.", [], None),
    ("llama3", '{"name": "calc", "parameters": {"expr": "1"}}', [{"name": "calc", "arguments": {"expr": "1"}}], None),
    ("mistral", '[TOOL_CALLS] [{"name": "calc", "arguments": {"expr": "1"}}]',
     [{"name": "calc", "arguments": {"expr": "1"}}], None),
    ("mistral", "[TOOL_CALLS] [{name: calc}]", [], "not valid JSON"),
])
def test_turns_are_read_with_the_templates_parser(style, text, calls, problem):
    from lmforge.shared.data.templates import Template, Renderer
    from lmforge.shared.train.agent.turns import read_reply

    renderer = Renderer(Template("t", "", observation="{content}", tool_style=style))
    reply = read_reply(renderer, text)
    assert reply.calls == calls
    assert (reply.malformed is None) if problem is None else (problem in reply.malformed)
    assert read_reply(renderer, text, tools=False).calls == []      # no tools in the episode: all text


# ----------------------------------------------------------------------------- episodes that go wrong

def _call(name: str, args: str) -> str:
    return '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call><|im_end|>' % (name, args)


def test_failures_become_observations_and_are_counted(tmp_path):
    """A tool that hangs, a malformed call, an unknown tool: the model reads an error and goes on;
    each episode's tools run in a fresh working directory, removed afterwards."""
    from lmforge.shared.train.agent.rollout import metrics
    from lmforge.shared.train.agent.tools import toolset

    tools = toolset(specs=[f"hang={_script(tmp_path, 'hang.py', 'import time; time.sleep(60)')}",
                           "mine=sh -c 'touch mine; pwd; ls'"], timeout=1)
    turns = [_call("hang", "{}"), '<tool_call>\n{"name": "mine", "arguments": {"n": 1+1}}\n</tool_call><|im_end|>',
             _call("nope", "{}"), _call("mine", "{}"), _call("mine", "{}")]
    tok, renderer = _setup(tmp_path, "chatml", [t + " ok" for t in turns])
    model = Scripted(tok, {k: [t, "ok<|im_end|>"] for k, t in enumerate(turns)})
    agent = _agent(renderer, tok, tools, max_turns=3, max_tokens=300)
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    episodes = agent.play(agent.episodes([{"prompt": "p"}] * 5, lambda row: prompt), model)
    told = [e.messages[1]["content"] for e in episodes]
    assert told[0] == "error: hang did not answer within 1s"
    assert told[1].startswith("error: the tool call could not be read: not valid JSON")
    assert told[2] == "error: there is no tool named 'nope' (tools: hang, mine)"
    dirs = [t.splitlines()[0] for t in told[3:]]
    assert dirs[0] != dirs[1] and all(t.splitlines()[1:] == ["mine"] for t in told[3:])   # fresh, own folder
    assert not any(Path(d).exists() for d in dirs)                                         # removed at the end
    assert all(e.done and not e.truncated and e.turns == 2 and e.answer == "ok" for e in episodes)
    assert [e.mask[-1] for e in episodes] == [1] * 5
    m = metrics(episodes)
    assert m == {"agent/turns": 2.0, "agent/tool_calls": 0.8, "agent/tool_errors": 0.4, "agent/malformed_calls": 0.2,
                 "agent/well_formed_calls": 0.8, "agent/truncated": 0.0}


def test_a_row_offering_tools_may_call_those_alone(tmp_path):
    """A prompt row that offers tools (its packed `tools` column): a call to one of them runs its
    command; a call to another tool, even one a --tool command runs, is an unknown tool. A row
    offering none may call every tool, as before."""
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train.agent.tools import check_rows, names_of, toolset

    tools = toolset(specs=[f"calc={_script(tmp_path, 'calc.py', CALC)}", "mine=sh -c 'touch mine; ls'"])
    turns = [_call("calc", '{"expr": "6*7"}'), _call("mine", "{}"), _call("mine", "{}")]
    tok, renderer = _setup(tmp_path, "chatml", [t + " ok 42" for t in turns])
    model = Scripted(tok, {k: [t, "ok<|im_end|>"] for k, t in enumerate(turns)})
    agent = _agent(renderer, tok, tools, max_turns=3, max_tokens=300)
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    rows = [{"prompt": "p", "tools": CALC_TOOLS}, {"prompt": "p", "tools": CALC_TOOLS}, {"prompt": "p", "tools": ""}]
    episodes = agent.play(agent.episodes(rows, lambda row: prompt), model)
    assert [e.offered for e in episodes] == [{"calc"}, {"calc"}, None]
    told = [e.messages[1]["content"] for e in episodes]
    assert told == ["42", "error: there is no tool named 'mine' (tools: calc)", "mine"]
    assert [e.errors for e in episodes] == [0, 1, 0] and all(e.done and e.answer == "ok" for e in episodes)
    assert names_of(CALC_TOOLS) == ["calc"] and names_of("") == names_of("{") == names_of('{"a": 1}') == []
    check_rows(tools, [CALC_TOOLS, "", None])
    with pytest.raises(BadInput, match="^--data x: row 2 offers the tool 'calc', which no command runs"):
        check_rows(toolset(specs=["mine=cat"]), ["", CALC_TOOLS], where="--data x: ")
    check_rows(toolset(specs=["mine=cat"]), ["", CALC_TOOLS], env_handles=True)   # the environment may run it


def test_max_turns_and_the_token_budget_end_episodes(tmp_path):
    tok, renderer = _setup(tmp_path, "chatml", [_call("calc", '{"expr": "1+1"}') + " 2"])
    again = _call("calc", '{"expr": "1+1"}')
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    agent = _agent(renderer, tok, _calc(tmp_path), max_turns=2, max_tokens=300)
    [e] = agent.play(agent.episodes([{"prompt": "p"}], lambda row: prompt), Scripted(tok, {0: [again] * 5}))
    assert (e.turns, e.calls, e.truncated, e.done) == (2, 2, True, True)
    assert [m["role"] for m in e.messages] == ["assistant", "tool", "assistant"]   # the last call is not run
    assert e.mask[-1] == 1 and tok.decode(e.ids[-1:]) == "<|im_end|>"
    n = len(tok(again, add_special_tokens=False).input_ids)
    agent = _agent(renderer, tok, _calc(tmp_path), max_turns=5, max_tokens=n + 3)   # no room for the result
    [e] = agent.play(agent.episodes([{"prompt": "p"}], lambda row: prompt), Scripted(tok, {0: [again] * 5}))
    assert (e.turns, e.truncated, len(e.ids), sum(e.mask)) == (1, True, n, n)
    assert [m["role"] for m in e.messages] == ["assistant"]          # the transcript is what the model read
    agent = _agent(renderer, tok, _calc(tmp_path), max_turns=5, max_tokens=n - 4)   # cut inside the turn
    [e] = agent.play(agent.episodes([{"prompt": "p"}], lambda row: prompt), Scripted(tok, {0: [again] * 5}))
    assert (e.turns, e.truncated, len(e.ids)) == (1, True, n - 4) and e.ids[-1] not in agent.stop_ids


# ----------------------------------------------------------------------------- environments

def _guess_agent(tmp_path, command, **kw):
    from lmforge.shared.train.agent.environment import Environment
    from lmforge.shared.train.agent.tools import ToolSet

    tok, renderer = _setup(tmp_path, "chatml", [
        "I am thinking of a number from 1 to 100. Guess it. Say a number. Higher. Lower. hello"])
    return tok, renderer, _agent(renderer, tok, ToolSet(), environment=Environment(command, **kw), max_turns=2,
                                 max_tokens=200)


def test_environment_plays_episodes_in_one_process(tmp_path):
    """The README's guessing game: the reset's observation becomes the prompt, each turn goes to
    the environment, its rewards add up, one process serves every episode."""
    import random

    from lmforge.shared.train.agent.rollout import metrics

    tok, renderer, agent = _guess_agent(tmp_path, f"{sys.executable} {ENVS / 'guess.py'}")
    secret = random.Random(7).randint(1, 100)
    wrong = 1 if secret > 1 else 2
    script = {0: [f"{wrong}<|im_end|>", f"{secret}<|im_end|>"], 1: ["hello<|im_end|>", "hello<|im_end|>"]}
    rows = [{"prompt": "p", "lmforge_row": 7}, {"prompt": "p", "lmforge_row": 8}]
    try:
        won, lost = agent.play(agent.episodes(rows, lambda row: [0]), Scripted(tok, script))
        pid = agent.environment.proc.pid
        again = agent.play(agent.episodes(rows, lambda row: [0]), Scripted(tok, script))
        assert agent.environment.proc.pid == pid and again[0].reward == 1
    finally:
        agent.environment.close()
    first = renderer.generation_prompt([{"role": "user", "content": "I am thinking of a number from 1 to 100. Guess it."}])
    assert won.prompt_ids == tok(first, add_special_tokens=False).input_ids
    assert (won.reward, won.turns, won.done, won.truncated) == (1.0, 2, True, False)
    assert (lost.reward, lost.turns, lost.truncated) == (pytest.approx(-0.2), 2, True)
    told = "Higher." if wrong < secret else "Lower."
    middle = tok.decode(won.ids, skip_special_tokens=False)
    assert middle == f"{wrong}<|im_end|>\n<|im_start|>user\n{told}<|im_end|>\n<|im_start|>assistant\n{secret}<|im_end|>"
    n1, n2 = (len(tok(f"{x}<|im_end|>", add_special_tokens=False).input_ids) for x in (wrong, secret))
    assert won.mask == [1] * n1 + [0] * (len(won.ids) - n1 - n2) + [1] * n2
    assert [m["role"] for m in won.messages] == ["assistant", "user", "assistant"]
    assert metrics([won, lost], environment=True)["agent/env_reward"] == pytest.approx(0.4)


def test_an_environment_written_prompt_shows_the_rows_tools(tmp_path):
    """When the environment writes the prompt, it shows the tools the row offers (and the
    environment's), not every tool a command runs; a row offering none shows them all."""
    from lmforge.shared.train.agent.environment import Environment
    from lmforge.shared.train.agent.tools import toolset

    spec = json.loads(CALC_TOOLS)
    spec[0]["command"] = ["cat"]
    (tmp_path / "tools.json").write_text(json.dumps(spec + [{"name": "mine", "description": "x", "command": "cat"}]))
    tools = toolset(str(tmp_path / "tools.json"))
    env = _script(tmp_path, "env.py", "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n"
                  "    a = {'episode': m['episode']}\n    if m['type'] == 'reset':\n        a['observation'] = 'hello'\n"
                  "    elif m['type'] == 'step':\n        a['done'] = True\n    print(json.dumps(a), flush=True)\n")
    tok, renderer = _setup(tmp_path, "chatml", [json.dumps(tools.schemas()) + " hello ok"])
    agent = _agent(renderer, tok, tools, environment=Environment(env), max_turns=2, max_tokens=200)
    rows = [{"prompt": "p", "tools": CALC_TOOLS}, {"prompt": "p", "tools": ""}]
    try:
        episodes = agent.play(agent.episodes(rows, lambda row: [0]), Scripted(tok, {0: ["ok<|im_end|>"],
                                                                                 1: ["ok<|im_end|>"]}))
    finally:
        agent.environment.close()
    shown = [tok.decode(e.prompt_ids, skip_special_tokens=False) for e in episodes]
    assert all('"calc"' in text and "hello" in text for text in shown), shown
    assert '"mine"' not in shown[0] and '"mine"' in shown[1], shown


def test_an_environment_left_open_goes_with_its_object(tmp_path):
    import gc

    from lmforge.shared.train.agent.environment import Environment

    env = Environment(f"{sys.executable} {ENVS / 'guess.py'}")
    env.start()
    proc = env.proc
    del env
    gc.collect()
    assert proc.wait(timeout=10) is not None   # killed, not orphaned


@pytest.mark.parametrize("program, error, says", [
    ("import sys, json\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['type'] == 'step':\n"
     "        print('boom', file=sys.stderr); sys.stderr.flush(); sys.exit(3)\n"
     "    print(json.dumps({'episode': m['episode'], 'observation': 'go'}), flush=True)\n",
     "RunFailure", r"episode 1-0: it exited \(exit 3\) instead of answering the step message \(its last words on "
                   r"stderr: boom\)"),
    ("import sys\nfor line in sys.stdin:\n    print('ready!', flush=True)\n", "BadInput",
     r"episode 1-0: its answer to the reset message is not JSON: 'ready!'"),
    ("import sys, json\nfor line in sys.stdin:\n    print(json.dumps({'episode': 'zzz'}), flush=True)\n", "BadInput",
     "names episode 'zzz', not '1-0'"),
    ("import time\ntime.sleep(60)\n", "RunFailure", r"episode 1-0: no answer to the reset message within 1s"),
    ("import sys, json\nfor line in sys.stdin:\n    m = json.loads(line)\n"
     "    print(json.dumps({'episode': m['episode'], 'observation': 'go', 'reward': float('nan')}), flush=True)\n",
     "BadInput", "has a reward that is not a finite number"),
    ("import sys, json\nfor line in sys.stdin:\n    m = json.loads(line)\n"
     "    print(json.dumps({'episode': m['episode'], **({'observation': 'go'} if m['type'] == 'reset' else {})}),"
     " flush=True)\n", "BadInput", "its answer to a step is neither done nor an observation"),
])
def test_a_broken_environment_stops_the_run_with_one_line(tmp_path, program, error, says):
    from lmforge.shared.core import errors

    tok, renderer, agent = _guess_agent(tmp_path, _script(tmp_path, "env.py", program), timeout=1)
    agent.environment.start()
    proc = agent.environment.proc
    with pytest.raises(getattr(errors, error), match=says) as caught:
        agent.play(agent.episodes([{"prompt": "p", "lmforge_row": 1}], lambda row: [0]),
                   Scripted(tok, {0: ["hello<|im_end|>"] * 2}))
    assert "\n" not in caught.value.one_line()
    assert agent.environment.proc is None and proc.poll() is not None   # stopped, not left running


# ----------------------------------------------------------------------------- in TRL's GRPOTrainer

def _tiny_model(tok, directory: Path):
    """A random two-layer Llama for the tokenizer, saved (TRL loads its reference model by path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return LlamaForCausalLM.from_pretrained(str(directory))


def _trainer(tmp_path, tok, model, rollout, rewards, **config):
    import datasets
    from lmforge.shared.train.agent.trainer import AgentTrainerMixin
    from trl import GRPOConfig, GRPOTrainer

    class Trainer(AgentTrainerMixin, GRPOTrainer):
        pass

    rows = config.pop("rows")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, logging_steps=1,
                      save_strategy="no", disable_dropout=True, **config)
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    return Trainer(model=model, reward_funcs=rewards, args=args, train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=tok, rollout_func=rollout)


def test_trl_trains_only_on_the_models_tokens(tmp_path):
    """Through GRPOTrainer: the rollout's mask reaches TRL as its tool mask, the token counts hold
    only the model's tokens, and the loss (policy and KL terms) has no gradient at the tool's
    tokens; rewards get the environment's reward, the final answer and the whole transcript."""
    import torch
    from lmforge.shared.train.agent.trainer import AgentRollout, EnvironmentReward

    tok, renderer = _setup(tmp_path, "chatml", [])
    agent = _agent(renderer, tok, _calc(tmp_path), max_turns=3, max_tokens=120)
    call = _call("calc", '{"expr": "347*29"}')
    prompt = renderer.generation_prompt(_conversation()[:1], "", CALC_TOOLS)
    script = {0: [call, "It is 10063.<|im_end|>"], 1: ["It is 10063.<|im_end|>"]}
    rollout = AgentRollout(agent, generate=Scripted(tok, script))
    seen = {}

    def reward(prompts, completions, lmforge_answer, lmforge_transcript, **kw):
        seen.update(completions=completions, answers=lmforge_answer, transcripts=lmforge_transcript,
                    env=EnvironmentReward()(prompts, completions, lmforge_env_reward=[0.5, 0.0]))
        return [float(a.endswith("10063.")) + len(t) for a, t in zip(lmforge_answer, lmforge_transcript)]

    model = _tiny_model(tok, tmp_path / "model")
    trainer = _trainer(tmp_path, tok, model, rollout, [reward], num_generations=2, per_device_train_batch_size=2,
                       max_completion_length=120, beta=0.1, rows=[{"prompt": prompt, "tools": CALC_TOOLS}])
    inputs = [{"prompt": prompt, "tools": CALC_TOOLS}, {"prompt": prompt, "tools": CALC_TOOLS}]
    model.train()   # as in a training step (its metrics are the train ones)
    out = trainer._generate_and_score_completions(inputs)
    assert "10063" in seen["completions"][0] and seen["answers"] == ["It is 10063.", "It is 10063."]
    assert [m["role"] for m in seen["transcripts"][0]] == ["assistant", "tool", "assistant"]
    assert seen["env"] == [0.5, 0.0]
    loss_mask = out["completion_mask"] * out["tool_mask"]
    n_call, n_answer = (len(tok(t, add_special_tokens=False).input_ids) for t in (call, "It is 10063.<|im_end|>"))
    assert loss_mask[0].sum() == n_call + n_answer and loss_mask[1].sum() == n_answer
    assert out["tool_mask"][0, n_call] == 0 and out["completion_mask"][0, n_call] == 1   # seen, not trained
    assert out["num_items_in_batch"] == n_call + 2 * n_answer
    assert out["advantages"][0] > 0 > out["advantages"][1]
    assert trainer._metrics["train"]["agent/tool_calls"] == [0.5]

    width = out["completion_ids"].size(1)
    logps = torch.zeros(2, width, requires_grad=True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros(2, width), None)
    out["ref_per_token_logps"] = torch.full((2, width), -0.5)
    trainer.current_gradient_accumulation_steps = 1   # (set by the training loop)
    trainer._compute_loss(model, out).backward()
    assert torch.equal(logps.grad != 0, loss_mask.bool())


def test_trl_training_step_with_its_own_generation_and_an_environment(tmp_path):
    """A real step: GRPOTrainer generates each turn itself (its transformers path), the bash
    environment of the README answers, the environment's reward is a reward term; the environment
    is stopped when training ends."""
    from lmforge.shared.train.agent.environment import Environment
    from lmforge.shared.train.agent.tools import ToolSet
    from lmforge.shared.train.agent.trainer import AgentRollout, EnvironmentReward, close_callback

    tok, renderer = _setup(tmp_path, "chatml", ["You are at 0. The goal is to the right left. Say left or right. -"])
    agent = _agent(renderer, tok, ToolSet(), environment=Environment(f"bash {ENVS / 'walk.sh'}"), max_turns=2,
                   max_tokens=60)
    rollout = AgentRollout(agent, prompt_ids=lambda row: [])
    model = _tiny_model(tok, tmp_path / "model")
    model.generation_config.eos_token_id = agent.stop_ids
    trainer = _trainer(tmp_path, tok, model, rollout, [EnvironmentReward()], num_generations=2,
                       per_device_train_batch_size=4, max_completion_length=60, max_steps=1, learning_rate=1e-3,
                       rows=[{"prompt": "walk", "lmforge_row": i} for i in range(4)],
                       # a random model: turns end soon when the end-of-turn token is favoured
                       generation_kwargs={"sequence_bias": [[[t], 4.0] for t in agent.stop_ids]})
    trainer.add_callback(close_callback(rollout))
    try:
        trainer.train()
        assert agent.environment.proc is None
    finally:
        agent.environment.close()
    [logged] = [h for h in trainer.state.log_history if "reward" in h]
    assert logged["agent/turns"] > 1 and "rewards/env/mean" in logged and "agent/env_reward" in logged
    assert logged["completions/mean_length"] <= 60


def test_an_environment_closed_starts_afresh_on_next_use(tmp_path):
    from lmforge.shared.train.agent.environment import Environment

    env = Environment(f"{sys.executable} {ENVS / 'guess.py'}")
    try:
        first = env.reset("1-0", {"lmforge_row": 1})
        env.close()
        assert env.reset("2-0", {"lmforge_row": 1}) == {**first, "episode": "2-0"}
    finally:
        env.close()


@pytest.mark.parametrize("seam", AGENT_SEAMS, ids=[s[0] for s in AGENT_SEAMS])
def test_the_trl_seams_the_rollout_uses_are_where_it_expects(seam):
    import test_upstream_seams as upstream

    upstream.test_each_seam_is_where_lmforge_expects_it(seam)
