"""`serve` with the real `openai` client against a server on a free 127.0.0.1 port, and `chat`.

The plain server runs the real stories260K model; the tool-call server runs stories260K after a
short full fine-tune on get_weather calls (so it really emits a call the API must parse)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from conftest import LMFORGE, bad, ok, shared_path

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install -e .[test]")
httpx = pytest.importorskip("httpx")

KEY = "sk-test-key"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve` in a subprocess, stopped at the end."""

    def __init__(self, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = ["--api-key", api_key] if api_key else []
        env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
        self.proc = subprocess.Popen([*LMFORGE, "serve", *args, "--port", str(self.port), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.proc.stderr.read().decode()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("serve did not start in 120 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def client(self, key: str | None = KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server("-m", str(shared_path("models/stories260K")), "--template", "default", "--name", "stories",
               api_key=KEY)
    yield s
    s.stop()


def ask(client, content: str = "Once upon a time", **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 24)
    return client.chat.completions.create(model="stories", messages=[{"role": "user", "content": content}], **kwargs)


# ----------------------------------------------------------------------------- the happy paths

def test_models_and_api_key(server):
    assert [m.id for m in server.client().models.list().data] == ["stories"]
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        ask(server.client(key="wrong"))
    assert server.health()["status"] == "ok"  # health needs no key


def test_chat_greedy_usage_and_length(server):
    r = ask(server.client(), max_tokens=12)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert ask(server.client(), max_tokens=12).choices[0].message.content == choice.message.content


def test_prompt_is_rendered_as_data_pack_renders_it(server, tmp_path):
    """The served prompt is the exact token prefix `data pack` trains on (template code shared)."""
    from conftest import aligned, read_rows

    src = aligned(tmp_path, "one", [{"instruction": "Once upon a time", "output": "there was a cat."}])
    ok(["data", "pack", src, "-m", shared_path("models/stories260K"), "-t", "default", "-o", tmp_path / "p.arrow"])
    row = read_rows(tmp_path / "p.arrow")[0]
    masked_prefix = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert ask(server.client(), max_tokens=1).usage.prompt_tokens == masked_prefix


def test_sampling_seed_n_and_stop(server):
    client = server.client()
    a = ask(client, temperature=1.0, seed=7, max_tokens=16).choices[0].message.content
    b = ask(client, temperature=1.0, seed=7, max_tokens=16).choices[0].message.content
    assert a == b
    r = ask(client, temperature=0.9, top_p=0.95, n=3, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 3 * 8
    full = ask(client, max_tokens=24).choices[0].message.content
    word = full.split()[2]
    cut = ask(client, max_tokens=24, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(word)]


def test_streaming_matches_and_ends_with_usage(server):
    client = server.client()
    expected = ask(client, max_tokens=20).choices[0].message.content
    chunks = list(ask(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    raw = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                     json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_streaming_with_a_stop_string_across_tokens(server):
    """The streamer decodes incrementally and looks for stops in the new text only: a stop string
    that spans tokens still cuts the stream where the whole answer's text has it."""
    client = server.client()
    full = ask(client, max_tokens=40).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 5]   # mid-answer, across a token boundary or two
    cut = ask(client, max_tokens=40, stop=[stop]).choices[0]
    chunks = list(ask(client, max_tokens=40, stop=[stop], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert cut.message.content == streamed == full[:full.index(stop)]
    assert cut.finish_reason == "stop" and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_route(server):
    client = server.client()
    r = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="stories", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_concurrent_requests_are_batched_and_do_not_block(server):
    client = server.client()
    prompts = ["Once upon a time", "The dog", "Lily and Tom", "A big red ball"] * 2
    alone = {p: ask(client, p, max_tokens=48).choices[0].message.content for p in set(prompts)}
    results: dict[int, str] = {}
    errors: list[Exception] = []

    def one(i: int, prompt: str) -> None:
        try:
            results[i] = "".join(c.choices[0].delta.content or "" for c in
                                 ask(client, prompt, max_tokens=48, stream=True) if c.choices)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    health_times = []
    while any(t.is_alive() for t in threads):
        start = time.perf_counter()
        server.health()
        health_times.append(time.perf_counter() - start)
    for t in threads:
        t.join()
    assert not errors
    # left-padded batches generate what each prompt generates alone (greedy)
    assert all(results[i] == alone[p] for i, p in enumerate(prompts))
    assert max(health_times) < 2.0  # the event loop stays free while the worker generates


def test_disconnect_stops_generation(server):
    before = server.health()["generated_tokens"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 480,
                            "temperature": 0, "stream": True}, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 20
    while server.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.health()["running"] == 0
    assert server.health()["generated_tokens"] - before < 480  # stopped well before its max_tokens


# ----------------------------------------------------------------------------- errors

def post(server, body: bytes | dict, key: str = KEY):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=data, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_error_shapes_and_codes(server):
    user = [{"role": "user", "content": "Hi"}]
    assert error_of(post(server, b"{not json"), 400)["type"] == "invalid_request_error"
    assert error_of(post(server, b"[1, 2]"), 400)
    assert error_of(post(server, {"messages": user}, key="bad"), 401)["code"] == "invalid_api_key"
    assert error_of(post(server, {"model": "gpt-9", "messages": user}), 404)["code"] == "model_not_found"
    assert error_of(post(server, {"messages": []}), 400)["param"] == "messages"
    assert error_of(post(server, {"messages": [{"role": "wizard", "content": "x"}]}), 400)["param"] == "messages"
    assert error_of(post(server, {"messages": [{"role": "assistant", "content": "x"}]}), 400)
    assert error_of(post(server, {"messages": [*user, {"role": "system", "content": "late"}]}), 400)
    for bad_params in ({"temperature": 5}, {"top_p": -1}, {"n": 0}, {"max_tokens": 0}, {"max_tokens": "ten"},
                       {"seed": 1.5}, {"stop": [1, 2]}, {"stream_options": 3}, {"stream": "yes"}):
        param = next(iter(bad_params))
        assert error_of(post(server, {"messages": user, **bad_params}), 400)["param"] == param
    long = error_of(post(server, {"messages": [{"role": "user", "content": "word " * 600}]}), 400)
    assert long["code"] == "context_length_exceeded"
    assert error_of(post(server, {"messages": user, "max_tokens": 100000}), 400)["code"] == "context_length_exceeded"
    assert error_of(httpx.get(server.url + "/v1/nowhere"), 404)
    # and the client library maps them to its exceptions
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-9", messages=user)
    with pytest.raises(openai.BadRequestError):
        ask(server.client(), max_tokens=100000)


def test_hostile_requests_get_json_errors_and_health_stays_fast(server):
    user = [{"role": "user", "content": "Hi"}]
    # non-finite numbers: Python's json takes them, JSON does not
    for text in (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
                 b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}',
                 b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": 1e999}'):
        assert error_of(post(server, text), 400)["type"] == "invalid_request_error"
    # nesting: a 400 JSON error, never a 500 page
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested" in error_of(post(server, deep), 400)["message"]
    # size: 413 before the body is read whole
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}'
    assert error_of(post(server, huge), 413)
    # a large request (under the limit) is parsed and tokenized off the event loop: /health answers meanwhile
    big = {"messages": [{"role": "user", "content": "word " * 1_500_000}]}
    import threading

    slow = threading.Thread(target=lambda: post(server, big))
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    waited = time.monotonic() - started
    slow.join(timeout=120)
    assert waited < 2.0, f"/health waited {waited:.1f}s behind a large request"
    assert error_of(post(server, {"messages": user, "max_tokens": "x"}), 400)


def test_cli_refuses_bad_setups(server, tmp_path):
    port = server.port  # taken by the running server
    err = bad(["serve", "-m", shared_path("models/stories260K"), "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err
    err = bad(["serve", "-m", tmp_path / "missing", "--port", str(free_port())])
    assert "missing" in err


# ----------------------------------------------------------------------------- tool calls

@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """stories260K fine-tuned (full, ~30 s) to answer weather questions with a get_weather call."""
    work = tmp_path_factory.mktemp("tools")
    rows = [{"conversations": [{"from": "human", "value": f"Weather in {city}?"},
                               {"from": "function_call",
                                "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})}],
             "tools": json.dumps(WEATHER)} for city in ["Paris", "Rome", "Oslo", "Lima"] * 4]
    (work / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = shared_path("models/stories260K")
    ok(["data", "align", work / "tools.jsonl", "-o", work / "a.arrow"])
    ok(["data", "pack", work / "a.arrow", "-m", base, "-t", "default", "--cutoff", "512", "-o", work / "p.arrow"])
    ok(["train", "sft", "-m", base, "-d", work / "p.arrow", "-o", work / "model", "--method", "full",
        "--learning-rate", "5e-3", "--max-steps", "100", "--batch-size", "8", "--logging-steps", "50"])
    return work / "model"


def test_tool_calls(tool_model):
    s = Server("-m", str(tool_model))  # template: what it was trained with (default)
    try:
        client = s.client()
        messages = [{"role": "user", "content": "Weather in Oslo?"}]
        r = client.chat.completions.create(model="model", messages=messages, tools=WEATHER, temperature=0,
                                           max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert "city" in json.loads(call.function.arguments)
        chunks = list(client.chat.completions.create(model="model", messages=messages, tools=WEATHER,
                                                     temperature=0, max_tokens=60, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.content for d in deltas)  # the call's JSON is never streamed as text
        streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert streamed[0].function.name == "get_weather"
        assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        # the call and its result go back in as history
        follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                             {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
        r2 = client.chat.completions.create(model="model", messages=follow, tools=WEATHER, max_tokens=8)
        assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
        bad_tools = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                               json={"messages": messages, "tools": [{"type": "function"}]})
        assert bad_tools.status_code == 400 and bad_tools.json()["error"]["param"] == "tools"
    finally:
        s.stop()


# ----------------------------------------------------------------------------- chat

def test_chat_command_multi_turn_reset_exit():
    stories = shared_path("models/stories260K")
    result = ok(["chat", "-m", stories, "--template", "default", "--temperature", "0", "--max-tokens", "12"],
                input=b"Once upon a time\nThe dog\n/reset\nOnce upon a time\n/exit\nnever read\n")
    out = result.stdout.decode()
    assert "[conversation reset]" in out
    answers = [line for line in out.splitlines() if line and not line.startswith("[")]
    assert len(answers) == 3
    assert answers[0] == answers[2]  # after /reset the conversation starts over


# ----------------------------------------------------------------------------- vLLM (GPU)

@pytest.mark.gpu
def test_vllm_backend_on_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM backend needs a CUDA GPU (none here)")
    pytest.importorskip("vllm", reason="vllm is a GPU extra: pip install 'lmforge[gpu]'")
    s = Server("-m", str(shared_path("models/stories260K")), "--template", "default", "--backend", "vllm")
    try:
        client = s.client()
        r = client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Once"}],
                                           max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="stories260K", messages=[{"role": "user", "content": "Once"}], max_tokens=8, temperature=0,
            stream=True) if c.choices)
        assert text == r.choices[0].message.content
    finally:
        s.stop()
