"""`lmforge board`: the API the page uses, on a real workspace (stories260K + the demo
data), the run lifecycle on disk (reattach after a restart, stop, resume), and a walk through the
page in a real browser (Playwright driving Debian's Chromium; skipped with a reason without them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LMFORGE, ROOT, bad, shared_path

BOARD = ROOT / "shared" / "board"
ARTIFACTS = ROOT / "tests" / "artifacts" / "board"
TRAIN = {"max_steps": "3", "logging_steps": "1", "batch_size": "2", "grad_accum": "1"}


def _config(**train) -> dict:
    return {"stage": "sft", "model": "models/stories260K", "data": {"files": ["demo/tasks.jsonl"]},
            "options": {"data pack": {"template": "default", "cutoff": "64"}, "train sft": {**TRAIN, **train}}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A board workspace: stories260K, the demo data, a LLaMA-Factory dataset_info.json."""
    import demo

    ws = tmp_path_factory.mktemp("board-ws")
    shutil.copytree(shared_path("models/stories260K"), ws / "models" / "stories260K")
    demo.write(ws / "demo", rows=120)
    lf = shared_path("data/llamafactory")
    (ws / "lf").mkdir()
    for name in ("dataset_info.json", "identity.json"):
        shutil.copy(lf / name, ws / "lf" / name)
    return ws


@pytest.fixture(scope="module")
def packed(workspace) -> str:
    """Demo rows aligned and packed for stories260K, inside the workspace (in this process: fast)."""
    from conftest import ok

    (workspace / "data").mkdir()
    ok(["data", "align", workspace / "demo" / "tasks.jsonl", "--max-samples", "40", "-o",
        workspace / "data" / "aligned.arrow"])
    ok(["data", "pack", workspace / "data" / "aligned.arrow", "-m", workspace / "models" / "stories260K", "-t",
        "default", "--cutoff", "64", "-o", workspace / "data" / "packed.arrow"])
    return "data/packed.arrow"


@pytest.fixture(scope="module")
def client(workspace):
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app
    from lmforge.tools.board import usage_error

    board = Board(workspace, check=usage_error)
    with TestClient(create_app(board), base_url="http://127.0.0.1:7860",
                    headers={"Authorization": f"Bearer {board.token}"}) as c:
        c.board = board
        yield c


def _wait(client, run: str, until, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        detail = client.get(f"/api/runs/{run}").json()
        if until(detail):
            return detail
        assert time.monotonic() < deadline, f"run {run} did not get there: {json.dumps(detail)[-3000:]}"
        time.sleep(0.3)


# ----------------------------------------------------------------------------- configure


def test_a_newly_declared_option_reaches_the_forms_and_the_command_line(client, monkeypatch):
    from lmforge.shared.core import catalog
    from lmforge.shared.core.options import Opt

    new = Opt("brand_new", type="int", default=3, help="Declared after the board was written.", panel="Method")
    monkeypatch.setitem(catalog.COMMANDS, "train sft", (*catalog.COMMANDS["train sft"], new))
    opts = {o["name"]: o for o in client.get("/api/catalog").json()["commands"]["train sft"]}
    assert opts["brand_new"] == {**opts["brand_new"], "flag": "--brand-new", "type": "int", "default": 3,
                                 "panel": "Method", "help": "Declared after the board was written."}
    assert opts["lora_rank"]["default"] == 8 and opts["method"]["choices"][:3] == ["full", "freeze", "lora"]
    # the running lmforge built its commands before this declaration: leave out its usage check
    monkeypatch.setattr(client.board, "check", None)
    plan = client.post("/api/pipeline", json=_config(brand_new="7"))
    assert plan.status_code == 200, plan.text
    assert "--brand-new=7" in plan.json()["steps"][2]["argv"]


def test_the_pipeline_is_the_commands_a_user_would_type(client, packed):
    plan = client.post("/api/pipeline", json={**_config(), "run": "mine"}).json()
    align, pack, train = (s["argv"] for s in plan["steps"])
    assert align == ["lmforge", "data", "align", "--output=runs/mine/aligned.arrow", "demo/tasks.jsonl"]
    assert pack[:3] == ["lmforge", "data", "pack"] and "--template=default" in pack and "--stage=sft" in pack
    assert train[:3] == ["lmforge", "train", "sft"] and "--max-steps=3" in train
    assert "--lora-rank=8" not in train   # defaults are the command's own: not repeated
    assert plan["shell"].count(" && \\\n  ") == 2 and plan["shell"].startswith("lmforge data align")
    make = plan["makefile"]
    assert "all: runs/mine/model/lmforge.json" in make
    assert "runs/mine/packed.arrow: runs/mine/aligned.arrow\n\tlmforge data pack" in make
    # aligned data skips `data align`
    assert [s["name"] for s in client.post("/api/pipeline", json={**_config(), "data": {"files": [
        "data/aligned.arrow"]}}).json()["steps"]] == ["data pack", "train sft"]
    # LLaMA-Factory entries
    entries = [e["name"] for e in client.get("/api/dataset_info?path=lf/dataset_info.json").json()["entries"]]
    assert "identity" in entries and "alpaca_en_demo" in entries
    config = {**_config(), "data": {"dataset_info": "lf/dataset_info.json", "names": ["identity"]}}
    align = client.post("/api/pipeline", json=config).json()["steps"][0]["argv"]
    assert "--dataset-info=lf/dataset_info.json" in align and "--name=identity" in align


def test_a_bad_form_value_gets_the_commands_own_line(client, workspace):
    config = _config()
    config["options"]["data pack"]["cutoff"] = "many"
    answer = client.post("/api/pipeline", json=config)
    assert answer.status_code == 400
    line = bad(["data", "pack", "--model=models/stories260K", "--cutoff=many", "x.arrow"])
    assert "error: " + answer.json()["error"] == line
    config = _config(method="nope")
    assert client.post("/api/runs", json=config).json()["error"].startswith("Invalid value for '--method'")
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())


def test_a_bad_value_names_its_field_so_the_page_can_mark_it(client):
    config = _config()
    config["options"]["data pack"]["cutoff"] = "many"
    assert client.post("/api/runs", json=config).json()["field"] == {
        "command": "data pack", "option": "cutoff", "flag": "--cutoff"}
    answer = client.post("/api/pipeline", json=_config(learning_rate="-1")).json()   # named '--learning-rate' / '--lr'
    assert answer["error"].startswith("Invalid value for '--learning-rate'")
    assert answer["field"] == {"command": "train sft", "option": "learning_rate", "flag": "--learning-rate"}
    answer = client.post("/api/pipeline", json=_config(eval_data="../../etc/passwd")).json()   # refused on its way
    assert "outside the board's workspace" in answer["error"]
    assert answer["field"] == {"command": "train sft", "option": "eval_data", "flag": "--eval-data"}
    assert "field" not in client.post("/api/pipeline", json={**_config(), "model": "../x"}).json()


def test_a_link_out_of_the_workspace_is_named_as_a_link(tmp_path):
    from lmforge.shared.board.workspace import Workspace
    from lmforge.shared.core.errors import BadInput

    ws, outside = tmp_path / "ws", tmp_path / "elsewhere"
    (ws / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "rows.jsonl").write_text("{}\n")
    (ws / "data" / "rows.jsonl").symlink_to(outside / "rows.jsonl")
    (ws / "shared").symlink_to(outside)
    (tmp_path / "ws-link").symlink_to(ws)   # the workspace named through a link of its own
    cases = {
        "data/rows.jsonl": f"data file 'data/rows.jsonl' is a symbolic link to {outside / 'rows.jsonl'}, "
                           f"outside the board's workspace {ws}",
        "./data/rows.jsonl": f"data file './data/rows.jsonl' is a symbolic link to {outside / 'rows.jsonl'}, "
                             f"outside the board's workspace {ws}",
        "shared/rows.jsonl": f"data file 'shared/rows.jsonl': 'shared' is a symbolic link to {outside}, "
                             f"outside the board's workspace {ws}",
    }
    for root in (ws, tmp_path / "ws-link"):
        for name, message in {**cases, f"{root}/shared/rows.jsonl": cases["shared/rows.jsonl"].replace(
                "'shared/rows.jsonl'", repr(f"{root}/shared/rows.jsonl"), 1)}.items():
            with pytest.raises(BadInput) as refused:
                Workspace(root).path(name, "data file")
            assert refused.value.message == message
    with pytest.raises(BadInput) as refused:   # outside by its name: no link to speak of
        Workspace(ws).path("../elsewhere/rows.jsonl", "data file")
    assert "symbolic link" not in str(refused.value) and "outside the board's workspace" in str(refused.value)


def test_dataset_info_entries_say_local_or_hub_local_first(client, workspace):
    listed = client.get("/api/dataset_info?path=lf/dataset_info.json").json()["entries"]
    info = json.loads((workspace / "lf" / "dataset_info.json").read_text())
    assert sorted(e["name"] for e in listed) == sorted(info) and len(listed) > 100
    by_name = {e["name"]: e for e in listed}
    assert by_name["identity"]["source"] == "local"   # identity.json is beside it
    assert by_name["alpaca_en_demo"]["source"] == "missing"   # named, not copied into the workspace
    for name, entry in info.items():
        if "file_name" not in entry:
            hub = "hf" if "hf_hub_url" in entry else "ms" if "ms_hub_url" in entry else "om"
            assert by_name[name]["source"] == "hub" and by_name[name]["hub"] == hub, name
    order = [{"local": 0, "hub": 1, "missing": 2}[e["source"]] for e in listed]
    assert order == sorted(order) and order[0] == 0
    hubs = [e["name"] for e in listed if e["source"] == "hub"]
    assert hubs == [name for name in info if by_name[name]["source"] == "hub"]   # the file's order within
    # a file_name that leads out of the workspace is not looked at: missing, not local
    (workspace / "lf2").mkdir()
    try:
        (workspace / "lf2" / "dataset_info.json").write_text(json.dumps({
            "out": {"file_name": "../../../../../../../etc/hostname"}, "ms": {"ms_hub_url": "a/b"},
            "both": {"file_name": "here.json", "hf_hub_url": "a/b"}, "here": {"file_name": "here.json"}}))
        (workspace / "lf2" / "here.json").write_text("[]")
        listed = client.get("/api/dataset_info?path=lf2").json()["entries"]
        assert [(e["name"], e["source"], e["hub"]) for e in listed] == [
            ("both", "local", "hf"), ("here", "local", None), ("ms", "hub", "ms"), ("out", "missing", None)]
    finally:
        shutil.rmtree(workspace / "lf2")


def test_paths_stay_inside_the_workspace(client, workspace, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"instruction": "a", "output": "b"}\n')
    (workspace / "link.jsonl").symlink_to(outside)
    (workspace / "linkdir").symlink_to(tmp_path)
    try:
        cases = [
            client.get("/api/dataset_info?path=../dataset_info.json"),
            client.get(f"/api/dataset_info?path={outside}"),
            client.post("/api/pipeline", json={**_config(), "data": {"files": ["link.jsonl"]}}),
            client.post("/api/pipeline", json={**_config(), "data": {"files": ["linkdir/secret.jsonl"]}}),
            client.post("/api/pipeline", json={**_config(), "data": {"files": ["demo/../../x.jsonl"]}}),
            client.post("/api/pipeline", json={**_config(), "model": "/work"}),
            client.post("/api/pipeline", json={**_config(eval_data="../../etc/passwd")}),
            client.post("/api/preview", json={**_config(), "model": "../models/stories260K"}),
            client.get("/api/runs/..%2F..%2Fetc"),
        ]
        for answer in cases:
            assert answer.status_code in (400, 404), answer.text
        for answer in cases[:-1]:
            assert "outside the board's workspace" in answer.json()["error"], answer.text
        assert "link.jsonl" not in client.get("/api/files").json()["files"]
    finally:
        (workspace / "link.jsonl").unlink()
        (workspace / "linkdir").unlink()


SECRET = "s3cret-s3cret-s3cret"


def test_a_token_guards_every_request_and_other_hosts_need_one(workspace):
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app

    guarded = TestClient(create_app(Board(workspace, token=SECRET, host="0.0.0.0", port=7860)),
                         base_url="http://10.1.2.3:7860")
    assert guarded.get("/").status_code == 401
    assert guarded.get("/api/catalog").status_code == 401
    assert guarded.get("/api/catalog", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/api/catalog", headers={"Authorization": f"Bearer {SECRET}"}).status_code == 200
    first = guarded.get(f"/?token={SECRET}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/"   # the token leaves the address bar
    cookie = first.headers["set-cookie"]
    assert cookie.startswith("lmforge_board_7860=") and "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()
    assert guarded.get("/").status_code == 200 and guarded.get("/api/runs").status_code == 200   # the cookie
    line = bad(["board", "--host", "0.0.0.0", "--workspace", workspace])
    assert "--token" in line


def test_every_board_has_a_token_even_on_loopback(workspace):
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app

    board = Board(workspace)
    assert len(board.token) >= 16 and board.token != Board(workspace).token   # a new one per start
    local = TestClient(create_app(board), base_url="http://127.0.0.1:7860")
    assert local.get("/api/catalog").status_code == 401
    assert local.get(f"/api/catalog?token={board.token}").status_code == 200
    rebound = TestClient(create_app(board), base_url="http://evil.example:7860")
    assert rebound.get(f"/api/catalog?token={board.token}").status_code == 403   # DNS rebinding


@pytest.mark.parametrize("host", ["127.0.0.1:17860@evil.com", "localhost:evil.com", "evil.com", "evil.com:7860",
                                  "127.0.0.1:7860:80", "127.0.0.1 :7860", "localhost.evil.com", "[::1]@evil.com",
                                  "127.0.0.1:99999", ""])
def test_host_header_tricks_are_refused(workspace, host):
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app

    board = Board(workspace, port=7860)
    answer = TestClient(create_app(board)).get("/api/catalog", headers={"host": host,
                                                                       "Authorization": f"Bearer {board.token}"})
    assert answer.status_code in (400, 403), (host, answer.status_code)


def test_host_names_of_this_machine_are_answered(workspace):
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app

    board = Board(workspace, port=7860)
    client = TestClient(create_app(board))
    for host in ("127.0.0.1:7860", "localhost:7860", "LOCALHOST:7860", "[::1]:7860", "127.0.0.1", "localhost."):
        answer = client.get("/api/catalog", headers={"host": host, "Authorization": f"Bearer {board.token}"})
        assert answer.status_code == 200, (host, answer.text)
    assert client.get("/api/catalog", headers={"host": "127.0.0.1:7861",
                                               "Authorization": f"Bearer {board.token}"}).status_code == 403


def test_a_cross_origin_page_cannot_start_anything(workspace):
    """The victim has the board open (its cookie is set); a page elsewhere makes the browser POST
    a pipeline whose GRPO reward is a command of its choosing."""
    from fastapi.testclient import TestClient
    from lmforge.shared.board.server import Board, create_app

    board = Board(workspace, port=7860)
    victim = TestClient(create_app(board), base_url="http://127.0.0.1:7860")
    assert victim.get(f"/?token={board.token}").status_code == 200   # the cookie is in the browser now
    attack = json.dumps({**_config(), "stage": "grpo", "options": {"train grpo": {"reward": ["cmd:touch pwned"]}}})
    own, evil = "http://127.0.0.1:7860", "http://127.0.0.1:8000"   # same site, another origin
    before = set((workspace / "runs").iterdir()) if (workspace / "runs").exists() else set()
    answers = [
        victim.post("/api/runs", content=attack, headers={"content-type": "text/plain", "origin": evil}),
        victim.post("/api/runs", content=attack, headers={"content-type": "text/plain"}),
        victim.post("/api/runs", data={"stage": "grpo"}, headers={"origin": evil}),   # a form
        victim.post("/api/runs", content=attack, headers={"content-type": "multipart/form-data; boundary=x",
                                                          "origin": evil}),
        victim.post("/api/runs", content=attack, headers={"content-type": "application/json", "origin": evil}),
        victim.post("/api/runs", content=attack, headers={"content-type": "application/json", "origin": "null"}),
        victim.post("/api/runs", content=attack, headers={"content-type": "application/json",
                                                          "referer": evil + "/page.html"}),
        victim.post("/api/runs", content=attack, headers={"content-type": "application/json"}),   # no Origin
        victim.post("/api/runs/x/stop", content="{}", headers={"content-type": "text/plain", "origin": evil}),
    ]
    for answer in answers:
        assert answer.status_code == 403, answer.text
    after = set((workspace / "runs").iterdir()) if (workspace / "runs").exists() else set()
    assert after == before and not (workspace / "pwned").exists()
    # the board's own page (same origin, JSON) is answered
    plan = victim.post("/api/pipeline", content=json.dumps(_config()),
                       headers={"content-type": "application/json", "origin": own})
    assert plan.status_code == 200, plan.text
    plan = victim.post("/api/pipeline", content=json.dumps(_config()),
                       headers={"content-type": "application/json; charset=utf-8", "referer": own + "/"})
    assert plan.status_code == 200, plan.text


@pytest.mark.parametrize("token", [" ", "", "short-token", " " * 20, "padded-token-abcdef "])
def test_weak_tokens_are_refused_at_start(workspace, token):
    line = bad(["board", "--workspace", workspace, "--token", token])
    assert "--token" in line and "16 characters" in line
    line = bad(["board", "--workspace", workspace], env={"LMFORGE_BOARD_TOKEN": token}) if token else line
    assert "16 characters" in line


def test_hostile_bodies_get_a_400_naming_the_field(client):
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ("/api/pipeline", deep, "nested too deeply"),
        ("/api/pipeline", '{"data": ' + deep + "}", "nested too deeply"),
        ("/api/pipeline", json.dumps({**_config(), "data": "demo/tasks.jsonl"}), "data"),
        ("/api/pipeline", json.dumps({**_config(), "run": 5}), "run"),
        ("/api/pipeline", json.dumps({**_config(), "options": "x"}), "options"),
        ("/api/pipeline", json.dumps({**_config(), "options": {"train sft": {"lr": {"a": 1}}}}), "options"),
        ("/api/pipeline", json.dumps({**_config(), "surprise": 1}), "surprise"),
        ("/api/pipeline", "[1, 2]", "not a JSON object"),
        ("/api/pipeline", "{", "not JSON"),
        ("/api/runs/x/eval", json.dumps({"kind": ["generate"]}), "kind"),
        ("/api/chat", json.dumps({"run": "x", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": "ten"}), "max_tokens"),
        ("/api/chat", json.dumps({"run": "x", "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": "hot"}), "temperature"),
        ("/api/chat", json.dumps({"run": "x", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": -5}), "max_tokens"),
        ("/api/chat", '{"run": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
         "temperature"),
        ("/api/chat", json.dumps({"run": "x", "messages": [{"role": "wizard", "content": "hi"}]}), "role"),
        ("/api/chat", json.dumps({"run": 3, "messages": []}), "run"),
        ("/api/runs/x/stop", json.dumps({"now": True}), "now"),
    ]
    for path, body, words in cases:
        answer = client.post(path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, (path, body[:80], answer.status_code, answer.text[:300])
        assert words in answer.json()["error"], (path, answer.json())
    huge = json.dumps({**_config(), "run": "x" * (2 << 20)})
    answer = client.post("/api/pipeline", content=huge, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "larger than" in answer.json()["error"]


def test_a_reward_file_must_stay_in_the_workspace(client, workspace, tmp_path):
    outside = tmp_path / "reward.py"
    outside.write_text("def reward(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (workspace / "reward_link.py").symlink_to(outside)
    (workspace / "reward_here.py").write_text(outside.read_text())
    try:
        for spec in ("reward_link.py:reward", f"{outside}:reward", "../reward.py:reward"):
            config = {**_config(), "stage": "grpo", "options": {"train grpo": {"reward": [spec]}}}
            answer = client.post("/api/pipeline", json=config)
            assert answer.status_code == 400, (spec, answer.text)
            assert "outside the board's workspace" in answer.json()["error"]
        error = client.post("/api/pipeline", json={**_config(), "stage": "grpo", "options": {
            "train grpo": {"reward": ["reward_link.py:reward"]}}}).json()["error"]
        assert "is a symbolic link to" in error   # says why a name inside the workspace is outside
        config = {**_config(), "stage": "grpo", "options": {"train grpo": {"reward": ["reward_here.py:reward",
                                                                                      "exact"]}}}
        answer = client.post("/api/pipeline", json=config)
        assert answer.status_code == 200, answer.text
        assert "--reward=reward_here.py:reward" in answer.json()["steps"][-1]["argv"]
    finally:
        (workspace / "reward_link.py").unlink()
        (workspace / "reward_here.py").unlink()


def test_every_page_string_is_in_every_locale():
    locales = {lang: json.loads((BOARD / "locales" / f"{lang}.json").read_text(encoding="utf-8"))
               for lang in ("en", "zh", "ru")}
    assert set(locales["en"]) == set(locales["zh"]) == set(locales["ru"])
    assert all(v.strip() for strings in locales.values() for v in strings.values())
    html = (BOARD / "static" / "index.html").read_text(encoding="utf-8")
    js = (BOARD / "static" / "board.js").read_text(encoding="utf-8")
    used = set(re.findall(r'data-i18n(?:-placeholder)?="([^"]+)"', html + js))
    used |= set(re.findall(r'\bt\("([^"]+)"\)', js))
    assert len(used) > 50 and used <= set(locales["en"]), sorted(used - set(locales["en"]))
    # keys are literals (or the data-i18n attributes checked above): none escapes this check
    assert not re.search(r"\bt\((?!\"|node\.dataset\.i18n)", js.replace("function t(key)", "")), "a computed key"
    assert not re.search(r"(src|href)=\"https?:", html), "nothing is fetched from elsewhere"


def test_the_page_names_cjk_fonts_and_the_guide_says_one_is_needed():
    css = (BOARD / "static" / "board.css").read_text(encoding="utf-8")
    sans = re.search(r"--sans:([^;]+);", css).group(1)
    for font in ("Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei"):
        assert f'"{font}"' in sans and f'"{font}"' in re.search(r"--mono:([^;]+);", css).group(1), font
    assert sans.strip().endswith("sans-serif") and "font: 14px/1.45 var(--sans)" in css
    assert "font-family: inherit" in css   # form controls too (they default to the system font)
    assert not re.search(r"font-family:(?! var\(--(sans|mono)\)| inherit)", css), "a font stack without CJK fonts"
    guide = (ROOT / "docs" / "guides" / "board.md").read_text(encoding="utf-8")
    assert "needs a CJK font" in guide and "apt install fonts-noto-cjk" in guide


# ----------------------------------------------------------------------------- preview, run, monitor


def test_preview_marks_the_trained_tokens_and_shows_data_stats(client):
    answer = client.post("/api/preview", json=_config())
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert len(data["rows"]) == 3 and data["rows"][0]["response"][0]["role"] == "assistant"
    first = data["tokens"][0]
    trained = "".join(p["text"] for p in first if p["trained"])
    prompt = "".join(p["text"] for p in first if not p["trained"])
    assert data["rows"][0]["response"][0]["content"] in trained and "Assistant:" in prompt
    assert data["rows"][0]["prompt"][0]["content"].split("\n")[0] in prompt
    assert data["stats"]["rows"] == 8 and 0 < data["stats"]["loss_fraction"] < 1


@pytest.mark.slow
def test_a_run_reattaches_after_a_restart_stops_and_resumes(client, workspace, packed):
    from lmforge.shared.board.server import Board, create_app
    from fastapi.testclient import TestClient

    # packed data skips `data align` and `data pack`: one step, `train sft`
    # enough steps that the stop lands mid-run on a fast machine too (stories260K runs ~30 steps/s
    # idle here: the stop comes at the first checkpoint, step 20, seconds before step 200)
    config = {**_config(max_steps="200", save_steps="20", logging_steps="50", batch_size="1"), "run": "long",
              "data": {"files": [packed]}}
    assert client.post("/api/runs", json=config).json()["id"] == "long"
    # a new board on the same workspace (a restart) finds the run from its directory
    board = Board(workspace)
    with TestClient(create_app(board), base_url="http://127.0.0.1:7860",
                    headers={"Authorization": f"Bearer {board.token}"}) as again:
        detail = _wait(again, "long", lambda d: (workspace / "runs/long/model/checkpoints/checkpoint-20").is_dir()
                       or d["status"] != "running")
        assert detail["status"] == "running", detail["log"]
        assert again.post("/api/runs/long/stop", json={}).status_code == 200
        stopped = _wait(again, "long", lambda d: d["status"] != "running")
    assert stopped["status"] == "stopped", stopped["log"]
    [train] = stopped["steps"]
    assert train["status"] == "stopped" and train["rc"] == 143 and train["error"] == "stopped by SIGTERM"
    assert train["argv"][:4] == ["lmforge", "train", "sft", "--model=models/stories260K"]
    assert client.post("/api/runs/long/resume", json={}).status_code == 200
    done = _wait(client, "long", lambda d: d["status"] not in ("running", "starting"))
    assert done["status"] == "done", done["log"][-3000:]
    assert done["steps"][0]["argv"][-2:] == ["--resume", "--overwrite"] and done["log"].count("$ lmforge train sft") == 2
    assert done["metrics"]["steps"] == 200 and [e["step"] for e in done["curve"]] == [1, *range(50, 201, 50)]
    assert done["progress"] == {"done": 200, "total": 200, "seconds_left": 0.0}
    listed = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert listed["long"]["method"] == "lora" and listed["long"]["metrics"]["train_loss"] > 0
    # evaluate the finished run with the command (a subprocess) and read its table back
    answer = client.post("/api/runs/long/eval", json={"kind": "perplexity", "options": {"batch_size": "8"}})
    assert answer.status_code == 200, answer.text
    assert "--adapter=runs/long/model" in answer.json()["shell"]
    evals = _wait(client, "long", lambda d: d["evals"] and d["evals"][0]["status"] not in ("running", "starting"))
    assert evals["evals"][0]["status"] == "done", evals["evals"]
    assert evals["evals"][0]["result"]["perplexity"] > 1
    assert "--data=data/packed.arrow" in evals["evals"][0]["command"]   # the run's own data


@pytest.mark.slow
def test_a_run_whose_runner_is_killed_is_adopted_not_lost(client, workspace, packed):
    """kill -9 of the runner leaves its `train` child running: the board follows it (Resume waits,
    Stop reaches it), and reports how it really ended."""
    import signal

    def killed_runner(run: str) -> dict:
        config = {**_config(max_steps="150", save_steps="1000", logging_steps="50", batch_size="1"), "run": run,
                  "data": {"files": [packed]}}
        assert client.post("/api/runs", json=config).status_code == 200
        detail = _wait(client, run, lambda d: d["steps"][0].get("pid") and d["log"].count("$ lmforge train"))
        state = json.loads((workspace / "runs" / run / "board.json").read_text())
        os.kill(state["pid"], signal.SIGKILL)
        adopted = _wait(client, run, lambda d: json.loads((workspace / "runs" / run / "board.json").read_text())
                        .get("adopted") or d["status"] != "running")
        return {**detail, **adopted}

    finished = killed_runner("orphan-done")
    if finished["status"] == "running":
        resume = client.post("/api/runs/orphan-done/resume", json={})
        assert resume.status_code == 400 and "still running" in resume.json()["error"]
    done = _wait(client, "orphan-done", lambda d: d["status"] != "running")
    assert done["status"] == "done", done
    assert done["steps"][0]["status"] == "done" and done["metrics"]["steps"] == 150
    assert (workspace / "runs" / "orphan-done" / "model" / "lmforge.json").exists()

    stopped = killed_runner("orphan-stop")
    assert stopped["status"] == "running"
    assert client.post("/api/runs/orphan-stop/stop", json={}).status_code == 200
    stopped = _wait(client, "orphan-stop", lambda d: d["status"] != "running")
    assert stopped["status"] == "stopped", stopped
    assert client.post("/api/runs/orphan-stop/resume", json={}).status_code == 200   # no collision now
    resumed = _wait(client, "orphan-stop", lambda d: d["status"] not in ("running", "starting"))
    assert resumed["status"] == "done", resumed["log"][-2000:]


# ----------------------------------------------------------------------------- the browser walk

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_board(workspace: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`lmforge board` as a user starts it; returns the process and its address once it answers."""
    import urllib.request

    port = free_port()
    env = {**os.environ, "LMFORGE_LOG_INTERVAL": "1000"}
    proc = subprocess.Popen([*LMFORGE, "board", "--workspace", str(workspace), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lines = []
    while not (found := re.search(r"http://\S+\?token=(\S+)", lines[-1] if lines else "")):
        lines.append(proc.stderr.readline().decode())   # "board: open http://127.0.0.1:PORT/?token=... (...)"
        assert lines[-1] or proc.poll() is None, "".join(lines)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}api/catalog?token={found.group(1)}", timeout=1).read()
            return proc, f"{url}?token={found.group(1)}"
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode()) from None
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the board did not answer within 60 s")


def browser():
    """Playwright's Chromium launcher on the system browser, or skip saying what is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download needed)")
    return sync_playwright


def fill(page, command: str, option: str, value: str) -> None:
    """Type into an option's field, opening its panel (a <details>) as a user would."""
    field = page.locator(f'[data-command="{command}"][data-opt="{option}"]')
    panel = field.locator("xpath=ancestor::details[1]")
    if panel.get_attribute("open") is None:
        panel.locator("summary").click()
    field.fill(value)


@pytest.mark.slow
def test_a_user_walks_the_board_in_a_real_browser(workspace):
    sync_playwright = browser()
    from playwright.sync_api import expect
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc, url = start_board(workspace)
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = chrome.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)
            # open the board: forms built from the catalog, in three languages
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            assert page.input_value("#model") == "models/stories260K"
            page.select_option("#lang", "ru")
            expect(page.locator("#start-btn")).to_have_text("Запустить")
            page.select_option("#lang", "zh")
            expect(page.locator("#start-btn")).to_have_text("开始训练")
            page.select_option("#lang", "en")
            expect(page.locator("#start-btn")).to_have_text("Start run")
            assert page.locator('[data-command="train sft"][data-opt="lora_rank"]').input_value() == "8"
            page.check('#data-files input[value="demo/tasks.jsonl"]')
            fill(page, "data pack", "template", "default")
            fill(page, "data pack", "cutoff", "64")
            # a bad value: the command's own one line, in the page
            fill(page, "train sft", "max_steps", "soon")
            page.click("#plan-btn")
            page.wait_for_selector("#error:not([hidden])")
            assert "Invalid value for '--max-steps'" in page.inner_text("#error")
            page.screenshot(path=str(ARTIFACTS / "1-configure-error.png"), full_page=True)
            for name, value in {**TRAIN, "max_steps": "6"}.items():
                fill(page, "train sft", name, value)
            # preview: trained tokens highlighted, data stats
            page.click("#preview-btn")
            page.wait_for_selector("#preview-tokens .tok.trained")
            assert page.locator("#preview-stats").inner_text().count("loss_fraction") == 1
            page.locator("#preview").screenshot(path=str(ARTIFACTS / "2-preview.png"))
            # the pipeline, then the run
            page.click("#plan-btn")
            page.wait_for_selector("#plan:not([hidden])")
            assert "lmforge train sft --model=models/stories260K" in page.inner_text("#shell")
            with page.expect_download() as download:
                page.click("#makefile-btn")
            assert "lmforge data pack" in Path(download.value.path()).read_text()
            page.click("#start-btn")
            page.wait_for_selector("#run-detail:not([hidden])")
            # the loss curve is drawn from trainer_log.jsonl while the run goes on
            page.wait_for_function("document.querySelectorAll('#chart-loss circle').length >= 2")
            page.screenshot(path=str(ARTIFACTS / "3-running.png"), full_page=True)
            page.wait_for_selector("#run-status.status-done")
            assert page.locator("#chart-loss circle").count() == 6
            assert page.inner_text("#progress-text") == "6 / 6"
            run = page.inner_text("#run-id")
            # a second run to compare with: this one's directory under another name
            twin = workspace / "runs" / f"{run}-twin"
            shutil.copytree(workspace / "runs" / run, twin)
            state = json.loads((twin / "board.json").read_text())
            (twin / "board.json").write_text(json.dumps({**state, "id": twin.name}))
            # a browser reload: the runs are listed from their directories; open the finished one
            page.reload()
            page.wait_for_selector("body[data-ready]")
            page.click('.tab[data-tab="runs"]')
            page.click(f'#runs-table tbody tr[data-run="{run}"]')
            page.wait_for_selector("#finished-tools:not([hidden])")
            assert '"train_loss"' in page.inner_text("#record")
            page.screenshot(path=str(ARTIFACTS / "board.png"))   # the README's picture (docs/board.png)
            page.select_option("#compare", twin.name)
            page.wait_for_function("document.querySelectorAll('#chart-loss path.series').length == 2")
            page.screenshot(path=str(ARTIFACTS / "4-finished.png"), full_page=True)
            # chat with it, streamed through serve's code
            page.fill("#chat-input", "Once upon a time")
            page.click("#chat-send")
            page.wait_for_selector("#chat-log .assistant.complete")
            assert page.inner_text("#chat-log .assistant").strip()
            page.screenshot(path=str(ARTIFACTS / "5-chat.png"), full_page=True)
            chrome.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_page_elsewhere_cannot_make_the_browser_start_a_run(workspace, tmp_path):
    """In a real browser: the user opens the board (its cookie is set), then visits a page on
    another origin of the same site that submits a form and sends no-cors fetches to the board."""
    import http.server
    import threading

    sync_playwright = browser()
    proc, url = start_board(workspace)
    board_origin = url.split("/?")[0]
    attack = json.dumps({**_config(), "stage": "grpo", "run": "csrf",
                         "options": {"train grpo": {"reward": [f"cmd:touch {tmp_path}/pwned"]}}})
    page_html = f"""<html><body>
<form id="f" method="POST" action="{board_origin}/api/runs" enctype="text/plain">
<input name='{attack[:-1]}, "x": "' value='"}}'></form>
<script>
fetch("{board_origin}/api/runs", {{method: "POST", mode: "no-cors", body: {json.dumps(attack)},
  headers: {{"Content-Type": "text/plain"}}, credentials: "include"}});
fetch("{board_origin}/api/runs", {{method: "POST", mode: "no-cors", body: {json.dumps(attack)},
  credentials: "include"}});
setTimeout(() => document.getElementById("f").submit(), 500);
</script></body></html>"""
    (tmp_path / "index.html").write_text(page_html)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            browsing = chrome.new_context()   # one profile: the board's cookie is there for every page
            page = browsing.new_page()
            page.goto(url)   # the user's own visit: the cookie is set
            page.wait_for_selector("body[data-ready]")
            assert browsing.cookies()[0]["sameSite"] == "Strict"
            other = browsing.new_page()
            responses = []
            other.on("response", lambda r: responses.append(r.status) if "/api/runs" in r.url else None)
            other.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
            other.wait_for_timeout(3000)
            chrome.close()
        assert responses and set(responses) <= {403}, responses
        assert not (workspace / "runs" / "csrf").exists() and not (tmp_path / "pwned").exists()
    finally:
        evil.shutdown()
        proc.terminate()
        proc.wait(timeout=30)


# each help text's lines (a Range's rectangles: the text as drawn, overflow included), at two widths
HELP_OVERLAPS = """() => {
  const form = document.querySelector('#form-train-sft');
  form.querySelectorAll('details').forEach(d => { d.open = true; });
  const boxes = [...form.querySelectorAll('.opt')].map(opt => {
    const range = document.createRange();
    range.selectNodeContents(opt.querySelector('.help'));
    return { name: opt.querySelector('.name').textContent, opt: opt.getBoundingClientRect(),
             lines: [...range.getClientRects()] };
  });
  const hit = (a, b) => a.left < b.right - .5 && b.left < a.right - .5 && a.top < b.bottom - .5 && b.top < a.bottom - .5;
  const out = [];
  for (const a of boxes) {
    if (a.lines.some(r => r.left < a.opt.left - .5 || r.right > a.opt.right + .5)) out.push(a.name + " leaves its field");
    for (const b of boxes)
      if (a !== b && a.lines.some(r => b.lines.some(s => hit(r, s)))) out.push(a.name + " overlaps " + b.name);
  }
  return { count: boxes.length, overlaps: out };
}"""


def test_help_texts_wrap_inside_their_fields(workspace):
    sync_playwright = browser()
    proc, url = start_board(workspace)
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for width in (1280, 700):
                page = chrome.new_page(viewport={"width": width, "height": 900})
                page.goto(url)
                page.wait_for_selector("body[data-ready]")
                found = page.evaluate(HELP_OVERLAPS)
                assert found["count"] > 30 and not found["overlaps"], (width, found)
                # a help text with a word longer than its column (a module list, a path) wraps too
                page.evaluate("""() => { document.querySelector('#form-train-sft .opt .help').textContent =
                    'Modules: ' + 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'.repeat(2) + ' (all)'; }""")
                found = page.evaluate(HELP_OVERLAPS)
                assert not found["overlaps"], (width, found)
                page.close()
            chrome.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_bad_value_is_shown_beside_start_and_its_field_marked(workspace):
    sync_playwright = browser()
    from playwright.sync_api import expect
    proc, url = start_board(workspace)
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = chrome.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            page.check('#data-files input[value="demo/tasks.jsonl"]')
            fill(page, "data pack", "template", "default")
            fill(page, "train sft", "max_steps", "soon")
            page.evaluate("document.querySelectorAll('#forms details').forEach(d => { d.open = true; })")
            page.locator("#start-btn").scroll_into_view_if_needed()
            assert page.evaluate("document.documentElement.scrollHeight") > 2500   # a long page
            field = page.locator('[data-command="train sft"][data-opt="max_steps"]')
            field.evaluate("input => input.closest('details').open = false")   # the error opens its panel
            page.click("#start-btn")
            beside = page.locator("#action-error")
            expect(beside).to_be_visible()
            assert "Invalid value for '--max-steps'" in beside.inner_text()
            start, box = page.locator("#start-btn").bounding_box(), beside.bounding_box()
            assert abs(box["y"] - start["y"]) < 80, (start, box)   # next to the button, not at the top
            assert page.inner_text("#error") == beside.inner_text()   # the banner says the same
            # the field: marked with the message, its panel open, scrolled to and focused
            marked = page.locator(".opt.invalid")
            expect(marked).to_have_count(1)
            assert "Invalid value for '--max-steps'" in marked.locator(".field-error").inner_text()
            assert marked.locator('[data-opt="max_steps"]').count() == 1
            expect(field).to_be_focused()
            expect(field).to_be_in_viewport()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "0-error-beside-start.png"), full_page=False)
            # corrected: the mark goes as the user types; both messages go with the next answer
            field.fill("3")
            expect(page.locator(".opt.invalid")).to_have_count(0)
            page.click("#plan-btn")
            page.wait_for_selector("#plan:not([hidden])")
            expect(beside).to_be_hidden()
            expect(page.locator("#error")).to_be_hidden()
            chrome.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
