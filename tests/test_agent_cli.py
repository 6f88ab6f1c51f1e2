"""`train grpo` with tools and environments, from the command line: the Agent options, their
refusals, rewards scoring whole episodes, the agent/* metrics in trainer_log.jsonl, and an
environment that breaks the protocol stopping the run with one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import bad, ok, shared_path

STORIES = "models/stories260K"
ENVS = Path(__file__).resolve().parent / "agent_envs"
WALK = f"bash {ENVS / 'walk.sh'}"
FAST = ["--max-new-tokens", "24", "--batch-size", "2", "--num-generations", "3", "--logging-steps", "1",
        "--max-turns", "3"]


# ----------------------------------------------------------------------------- rewards on episodes, no model

EPISODE = {"lmforge_answer": ["12", "seal"], "lmforge_env_reward": [0.5, -1.0],
           "lmforge_transcript": [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "seal"}]]}


def test_builtins_judge_the_last_turn_of_an_episode():
    """A number in a tool's output (in the episode's text) is not the model's answer."""
    from lmforge.shared.train import rewards

    completions = ['{"name": "calc"} 12 I think it is 7', "seal"]
    numeric, exact = rewards.parse("numeric"), rewards.parse("exact")
    assert numeric(prompts=["p", "q"], completions=completions, reference=["7", "1"]) == [1.0, 0.0]
    assert numeric(prompts=["p", "q"], completions=completions, reference=["7", "1"], **EPISODE) == [0.0, 0.0]
    assert numeric(prompts=["p", "q"], completions=completions, reference=["12", "1"], **EPISODE) == [1.0, 0.0]
    assert exact(prompts=["p", "q"], completions=completions, reference=["12", "seal"], **EPISODE) == [1.0, 1.0]
    assert rewards.parse("regex:\\d+")(prompts=["p", "q"], completions=completions, **EPISODE) == [1.0, 0.0]
    # length counts the episode's tokens; format looks at the whole text
    assert rewards.parse("length:2")(prompts=["p", "q"], completions=completions, completion_ids=[[1] * 4, [1]],
                                     **EPISODE) == [-1.0, 0.0]


def test_commands_and_functions_get_the_answer_transcript_and_env_reward(tmp_path):
    from lmforge.shared.train import rewards

    seen = tmp_path / "seen.jsonl"
    command = rewards.parse(f"cmd:cat > {seen}; echo 1; echo 0")
    assert command(prompts=["p", "q"], completions=["c", "d"], reference=["r", None], **EPISODE) == [1.0, 0.0]
    lines = [json.loads(x) for x in seen.read_text().splitlines()]
    assert lines[0] == {"prompt": "p", "completion": "c", "reference": "r", "answer": "12", "env_reward": 0.5,
                        "transcript": [{"role": "assistant", "content": "12"}]}
    assert lines[1]["answer"] == "seal" and lines[1]["env_reward"] == -1.0
    rewards.parse(f"cmd:cat > {seen}; echo 1")(prompts=["p"], completions=["c"])   # no episode: lines as before
    assert json.loads(seen.read_text()) == {"prompt": "p", "completion": "c", "reference": None}

    (tmp_path / "episodic.py").write_text(
        "def scored(prompts, completions, references, answers, transcripts, env_rewards, **kw):\n"
        "    return [len(a) + e + len(t) for a, t, e in zip(answers, transcripts, env_rewards)]\n")
    function = rewards.parse(f"{tmp_path}/episodic.py:scored")
    assert function(prompts=["p", "q"], completions=["c", "d"], **EPISODE) == [3.5, 4.0]


def test_reward_weights_with_an_environment():
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train import rewards

    assert rewards.weights(None, 2, environment=True) == [1.0, 1.0, 1.0]
    assert rewards.weights("2,3", 2, environment=True) == [2.0, 3.0, 1.0]
    assert rewards.weights("2,3,0.5", 2, environment=True) == [2.0, 3.0, 0.5]
    assert rewards.weights("0.5", 0, environment=True) == [0.5]
    with pytest.raises(BadInput, match="give 2 .* or 3"):
        rewards.weights("1,2,3,4", 2, environment=True)
    with pytest.raises(BadInput, match="3 weights for 2"):
        rewards.weights("1,2,3", 2)


def test_the_environment_reward_joins_the_sample_log():
    from lmforge.shared.train import rewards
    from lmforge.shared.train.agent.trainer import EnvironmentReward

    samples = rewards.Samples()
    exact, env = rewards.parse("exact"), EnvironmentReward()
    exact.samples = env.samples = samples
    exact(prompts=["p", "q"], completions=["12", "x"], reference=["12", "1"], **EPISODE)
    assert env(prompts=["p", "q"], completions=["12", "x"], reference=["12", "1"], **EPISODE) == [0.5, -1.0]
    assert samples.serial == 1 and samples.batch is not None
    assert samples.batch["rewards"] == {"exact": [1.0, 0.0], "env": [0.5, -1.0]}


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """The demo's tasks, packed as prompts for stories260K with the default template."""
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("agent")
    demo.write(work / "raw", rows=40)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "-o", work / "tasks.arrow"])
    ok(["data", "pack", work / "tasks.arrow", "-m", base, "-t", "default", "-s", "ppo", "--cutoff", "64",
        "-o", work / "ppo.arrow"])
    return {"base": base, "ppo": work / "ppo.arrow"}


@pytest.fixture(scope="module")
def tool_prompts(tmp_path_factory):
    """Prompts of which every other row offers the calc tool (its `tools` column), packed for
    stories260K with the default template (which writes the tools into the prompt)."""
    work = tmp_path_factory.mktemp("agent-tools")
    calc = json.dumps([{"name": "calc", "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}])
    with open(work / "rows.jsonl", "w") as f:
        for i in range(8):
            row: dict = {"conversations": [{"from": "human", "value": f"{i} plus {i}?"},
                                           {"from": "gpt", "value": str(2 * i)}]}
            if i % 2 == 0:
                row["tools"] = calc
            f.write(json.dumps(row) + "\n")
    ok(["data", "align", work / "rows.jsonl", "-o", work / "rows.arrow"])
    ok(["data", "pack", work / "rows.arrow", "-m", shared_path(STORIES), "-t", "default", "-s", "ppo",
        "--cutoff", "192", "-o", work / "ppo.arrow"])
    return {"base": shared_path(STORIES), "ppo": work / "ppo.arrow"}


def test_grpo_runs_the_tools_the_rows_offer(tool_prompts, tmp_path):
    """Rows offering calc, and calc run by a --tool command: the run trains (each row's episodes
    may call its own tools: tests/test_agent.py checks the calls)."""
    (tmp_path / "calc.py").write_text(guide_calc())
    out = tmp_path / "run"
    result = ok(["train", "grpo", "-m", tool_prompts["base"], "-d", tool_prompts["ppo"], "-o", out,
                 "--max-steps", "1", "--reward", "exact", "--tool", f"calc={sys.executable} {tmp_path / 'calc.py'}",
                 "--max-new-tokens", "16", "--batch-size", "2", "--num-generations", "2", "--logging-steps", "1",
                 "--max-turns", "2"])
    assert result.stdout.decode().strip() == str(out)
    assert [e["step"] for e in _entries(out)] == [1]


def test_the_prompts_trl_reads_carry_each_rows_tools(tool_prompts):
    """The rows TRL hands to the rollout carry `tools`; packs made before that column (or whose
    rows offer none) give no such column, and every tool stays callable."""
    from types import SimpleNamespace

    import datasets
    from lmforge.shared.data.packed import open_packed
    from lmforge.shared.train.grpo import prompts_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tool_prompts["base"]))
    data = open_packed(str(tool_prompts["ppo"]), ("ppo",))
    dataset, _, _ = prompts_dataset(data, tokenizer, ["</s>"])
    assert [json.loads(t)[0]["function"]["name"] if t else "" for t in dataset["tools"]] == ["calc", ""] * 4
    old = SimpleNamespace(dataset=datasets.Dataset.from_dict({"prompt_ids": [[1, 2]], "response_ids": [[3]]}))
    assert "tools" not in prompts_dataset(old, tokenizer, ["</s>"])[0].column_names
    none = SimpleNamespace(dataset=old.dataset.add_column("tools", [""]))
    assert "tools" not in prompts_dataset(none, tokenizer, ["</s>"])[0].column_names


def test_a_row_offering_a_tool_no_command_runs_is_refused_in_one_line(tool_prompts, tmp_path):
    err = bad(["train", "grpo", "-m", tool_prompts["base"], "-d", tool_prompts["ppo"], "-o", tmp_path / "x",
               "--reward", "exact", "--tool", "other=cat"])
    assert f"--data {tool_prompts['ppo']}: row 1 offers the tool 'calc', which no command runs" in err, err
    assert "--tool calc=COMMAND" in err, err
    assert not (tmp_path / "x").exists()
    piped = bad(["train", "grpo", "-m", tool_prompts["base"], "-d", "-", "-o", tmp_path / "y", "--reward", "exact",
                 "--tool", "other=cat"], input=tool_prompts["ppo"].read_bytes())   # checked once read
    assert piped.startswith("error: --data -: row 1 offers the tool 'calc'"), piped
    assert not (tmp_path / "y" / "lmforge.json").exists()


def _entries(out: Path) -> list[dict]:
    return [e for e in (json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()) if "reward" in e]


AGENT_KEYS = ("agent/turns", "agent/tool_calls", "agent/tool_errors", "agent/malformed_calls",
              "agent/well_formed_calls", "agent/truncated")


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "agents.md"


def guide_calc() -> str:
    """The guide's calculator tool (calc.py)."""
    text = GUIDE.read_text()
    return text[text.index("```python\n# calc.py\n") + 10:].split("```\n", 1)[0]


def test_the_guides_calculator_is_a_tool(tmp_path):
    from lmforge.shared.train.agent.tools import toolset

    (tmp_path / "calc.py").write_text(guide_calc())
    tools = toolset(specs=[f"calc={sys.executable} {tmp_path / 'calc.py'}"])
    assert tools.call("calc", {"expr": "12 * 3 - 4 / 2"}, str(tmp_path)).text == "34.0"
    failed = tools.call("calc", {"expr": "__import__('os')"}, str(tmp_path))
    assert failed.error and failed.text.startswith("error: calc failed (exit 1): ValueError: only numbers")


@pytest.mark.slow   # real runs: ~10 s each on an idle 2-core machine
def test_grpo_with_a_tool_command_from_the_command_line(prompts, tmp_path):
    (tmp_path / "calc.py").write_text(guide_calc())
    seen = tmp_path / "seen.jsonl"
    out = tmp_path / "run"
    result = ok(["train", "grpo", "-m", prompts["base"], "-d", prompts["ppo"], "-o", out, "--max-steps", "2",
                 "--reward", "exact", "--reward", f"cmd:tee -a {seen} | sed 's/.*/0/'", "--tool",
                 f"calc={sys.executable} {tmp_path / 'calc.py'}", "--tool-timeout", "5", *FAST],
                env={"LMFORGE_LOG_INTERVAL": "0"})   # a progress line per step
    assert result.stdout.decode().strip() == str(out)
    assert "turns" in result.stderr.decode()   # turns per episode on the progress line
    steps = _entries(out)
    assert [e["step"] for e in steps] == [1, 2]
    for e in steps:
        assert all(key in e for key in AGENT_KEYS), e
        assert 1 <= e["agent/turns"] <= 3 and "agent/env_reward" not in e
        assert e["completions/mean_length"] <= 24   # the whole episode within --max-new-tokens
    lines = [json.loads(x) for x in seen.read_text().splitlines()]
    assert len(lines) == 2 * 2 * 3 and all({"answer", "transcript", "env_reward"} <= set(x) for x in lines)
    assert all(x["transcript"][0]["role"] == "assistant" for x in lines)
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["tool"] == [f"calc={sys.executable} {tmp_path / 'calc.py'}"]
    assert record["hyperparameters"]["max_turns"] == 3


@pytest.mark.slow
def test_grpo_with_an_environment_alone_from_the_command_line(prompts, tmp_path):
    """The guide's bash environment, its reward the only term, weighed by --reward-weights."""
    out = tmp_path / "run"
    result = ok(["train", "grpo", "-m", prompts["base"], "-d", prompts["ppo"], "-o", out, "--max-steps", "2",
                 "--environment", WALK, "--reward-weights", "0.5", *FAST])
    steps = _entries(out)
    assert [e["step"] for e in steps] == [1, 2]
    for e in steps:
        assert all(key in e for key in (*AGENT_KEYS, "agent/env_reward", "rewards/env/mean")), e
        assert e["agent/env_reward"] == pytest.approx(e["rewards/env/mean"], abs=1e-6)
        assert e["reward"] == pytest.approx(0.5 * e["rewards/env/mean"], abs=1e-6)
    samples = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert set(samples[0]["completions"][0]["rewards"]) == {"env"}
    assert "0.5 x env" in result.stderr.decode()


@pytest.mark.slow
def test_a_broken_environment_stops_the_run_with_one_line(prompts, tmp_path):
    """It answers its first line with something that is not JSON: one line naming the episode,
    no finished run, and its process (and what it started) is gone."""
    pids = tmp_path / "pids"
    script = tmp_path / "broken.sh"
    script.write_text(f"sleep 600 & echo $! > {pids}\necho $$ >> {pids}\nread line\necho 'not json'\nsleep 600\n")
    out = tmp_path / "run"
    err = bad(["train", "grpo", "-m", prompts["base"], "-d", prompts["ppo"], "-o", out, "--max-steps", "2",
               "--environment", f"bash {script}", *FAST])
    assert "--environment" in err and "episode" in err and "JSON" in err, err
    assert not (out / "lmforge.json").exists() and not (out / "checkpoints").exists()
    for pid in map(int, pids.read_text().split()):
        assert _gone(pid), pid


def _gone(pid: int, wait: float = 10.0) -> bool:
    """The process has ended (a zombie waiting for init to reap it counts as ended)."""
    import time

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("args, says", [
    (["--reward", "exact", "--tools", "missing.json"], "--tools missing.json: no such file"),
    (["--reward", "exact", "--tools", "{bad}"], "--tools"),
    (["--reward", "exact", "--tool", "calc=no_such_program_x"], "--tool calc: no program `no_such_program_x`"),
    (["--reward", "exact", "--tool", "calc"], "NAME=COMMAND"),
    (["--environment", "no_such_program_y"], "--environment: no program `no_such_program_y`"),
    (["--reward", "exact", "--environment", WALK, "--reward-weights", "1,2,3"], "3 weights for 1 --reward terms"),
    (["--reward", "exact", "--reward-weights", "1,2"], "2 weights for 1"),
    (["--max-turns", "2"], "give at least one --reward"),
    (["--reward", "exact", "--tool", "calc=cat", "--max-turns", "0"], "--max-turns"),
    (["--reward", "exact", "--tool", "calc=cat", "--tool-timeout", "0"], "--tool-timeout"),
])
def test_agent_options_refuse_bad_settings_in_one_line(prompts, tmp_path, args, says):
    if "{bad}" in args:
        (tmp_path / "bad.json").write_text('[{"type": "function"}]')
        args = [str(tmp_path / "bad.json") if a == "{bad}" else a for a in args]
    err = bad(["train", "grpo", "-m", prompts["base"], "-d", prompts["ppo"], "-o", tmp_path / "x", *args])
    assert says in err, err
    assert not (tmp_path / "x").exists()


def test_the_guide_shows_both_example_environments_verbatim():
    """docs/guides/agents.md holds the two environments the tests play, as they are."""
    guide = GUIDE.read_text()
    for fence, name in (("python", "guess.py"), ("bash", "walk.sh")):
        assert f"```{fence}\n{(ENVS / name).read_text()}```\n" in guide, name


def test_agent_options_with_image_prompts_are_refused_in_one_line(tmp_path):
    pytest.importorskip("PIL")
    from vlmkit import colour_rows, qwen2_vl

    model = qwen2_vl(tmp_path / "qwen2vl")
    ok(["data", "align", colour_rows(tmp_path, 6, seed=3), "-o", tmp_path / "colours.arrow"])
    ok(["data", "pack", tmp_path / "colours.arrow", "-m", model, "--stage", "ppo", "--cutoff", "256",
        "-o", tmp_path / "prompts.arrow"])
    err = bad(["train", "grpo", "-m", model, "-d", tmp_path / "prompts.arrow", "-o", tmp_path / "run",
               "--reward", "exact", "--tool", "calc=cat"])
    assert "--tools, --tool and --environment with image prompts: not supported" in err, err
    assert not (tmp_path / "run" / "lmforge.json").exists()


def test_the_board_offers_the_agent_options_and_passes_them_on(tmp_path):
    """The board's train grpo form has the Agent panel; a pipeline with tools and an environment
    runs `train grpo` with them (a tools file inside the workspace, like every path)."""
    import shutil

    import demo
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app
    from lmforge.tools.board import usage_error

    ws = tmp_path / "ws"
    shutil.copytree(shared_path(STORIES), ws / "models" / "stories260K")
    demo.write(ws / "demo", rows=20)
    (ws / "tools.json").write_text(json.dumps([{"type": "function", "function": {"name": "echo"}, "command": "cat"}]))
    shutil.copy(ENVS / "walk.sh", ws / "walk.sh")
    board = Board(ws, check=usage_error)
    with TestClient(create_app(board), base_url="http://127.0.0.1:7860",
                    headers={"Authorization": f"Bearer {board.token}"}) as client:
        options = client.get("/api/catalog").json()["commands"]["train grpo"]
        assert {o["name"] for o in options if o["panel"] == "Agent"} == {
            "tools", "tool", "environment", "max_turns", "tool_timeout", "tool_output_cap", "environment_timeout"}
        config = {"stage": "grpo", "model": "models/stories260K", "data": {"files": ["demo/tasks.jsonl"]},
                  "options": {"data pack": {"template": "default", "cutoff": "64"},
                              "train grpo": {"max_steps": "1", "tools": "tools.json", "tool": ["calc=cat"],
                                             "environment": "bash walk.sh", "max_turns": "3"}}}
        answer = client.post("/api/pipeline", json=config)
        assert answer.status_code == 200, answer.text
        argv = answer.json()["steps"][-1]["argv"]
        for word in ("--tools=tools.json", "--tool=calc=cat", "--environment=bash walk.sh", "--max-turns=3"):
            assert word in argv, argv
        outside = {**config, "options": {**config["options"], "train grpo": {"tools": str(tmp_path / "x.json")}}}
        assert client.post("/api/pipeline", json=outside).status_code == 400
