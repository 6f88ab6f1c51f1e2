"""`serve` against hostile request bodies: every malformed body gets a 400 (413 for sizes) in
OpenAI's error shape, never a 500; images are held to the serve limits from their headers, before
anything is decoded, and decoding is bounded however many clients send images at once.

Most requests go to the app in this process (FastAPI's TestClient, server errors answered as
responses, not raised); one test runs `lmforge serve` itself, to see the options and the memory."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import shared_path

pytest.importorskip("fastapi")
pytest.importorskip("PIL")
httpx = pytest.importorskip("httpx")


def png(width: int, height: int, gray_bits: int | None = None, truncated: bool = False) -> bytes:
    """A PNG of that size, all black, written row by row (the test never holds its pixels): RGB, or
    grayscale of `gray_bits` bits per pixel. `truncated`: the header and a few bytes of pixel
    data only, so any attempt to decode it fails (only its header can be read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour, depth, channels = (0, gray_bits, 1) if gray_bits else (2, 8, 3)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    if truncated:
        pixels = b"\x78\x9c\x01\x02"
    else:
        row = bytes(1 + (width * channels * depth + 7) // 8)   # filter byte, then the row's pixels
        z = zlib.compressobj(9)
        pixels = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def with_images(*images: bytes, max_tokens: int = 2) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [*parts, {"type": "text", "text": "What colour is the square ?"}]}]}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["type"] == "invalid_request_error"
    return body


def app_client(model: str, template: str = "auto"):
    from fastapi.testclient import TestClient
    from lmforge.shared.infer.app import create_app, prepare

    served = prepare(model, None, template, "hf", 4, 4, None, "m")
    return served, TestClient(create_app(served), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def stories():
    return app_client(str(shared_path("models/stories260K")), "default")


def chat(client, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})


USER = [{"role": "user", "content": "Once upon a time"}]
DEEP = "[" * 100_000 + "]" * 100_000


# ----------------------------------------------------------------------------- malformed bodies

def test_nesting_anywhere_in_the_request_is_a_400(stories, tmp_path):
    _, client = stories
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    # tool-call arguments nested deeply inside a JSON string (was a RecursionError: 500)
    body = error_of(chat(client, {"messages": [*USER, call, {"role": "tool", "tool_call_id": "c1", "content": "x"}],
                                  "max_tokens": 2}), 400)
    assert "tool_calls[0].function.arguments" in body["message"] and "nested" in body["message"]
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": DEEP}}
    assert "nested" in error_of(chat(client, {"messages": [*USER, legacy], "max_tokens": 2}), 400)["message"]
    # tools given as JSON text
    assert error_of(chat(client, {"messages": USER, "tools": DEEP, "max_tokens": 2}), 400)["param"] == "tools"
    # the body itself, and a body in UTF-16 (Python's json would read it; the nesting scan could not)
    assert "nested" in error_of(chat(client, b'{"messages": ' + DEEP.encode() + b"}"), 400)["message"]
    sneaky = '{"a": "\u0122", "messages": ' + "[" * 900 + "]" * 900 + "}"
    assert "UTF-8" in error_of(chat(client, sneaky.encode("utf-16")), 400)["message"]
    # a template that parses tool results as JSON (mistral) given one nested past what Python parses
    _, mistral = app_client(str(shared_path("models/stories260K")), "mistral")
    deep_result = {"messages": [*USER, {**call, "tool_calls": [{**call["tool_calls"][0],
                                                                  "function": {"name": "f", "arguments": "{}"}}]},
                                {"role": "tool", "tool_call_id": "c1", "content": "[" * 5000 + "]" * 5000}],
                   "tools": tools, "max_tokens": 2}
    assert "nested" in error_of(chat(mistral, deep_result), 400)["message"]


def test_wrong_types_and_nameless_tools_are_a_400(stories):
    _, client = stories
    for extra, param in (({"seed": 2 ** 64}, "seed"),   # past what torch takes: was a 500 from the engine
                         ({"reasoning_effort": 5}, "reasoning_effort"),
                         ({"reasoning_effort": "extreme"}, "reasoning_effort"),
                         ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
                         ({"chat_template_kwargs": [True]}, "chat_template_kwargs"),
                         ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "enable_thinking"),
                         ({"tools": [{"type": "function", "function": {}}]}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": " "}}]}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools")):
        assert error_of(chat(client, {"messages": USER, "max_tokens": 2, **extra}), 400)["param"] == param, extra
    # the same fields well formed are taken
    fine = {"reasoning_effort": "low", "chat_template_kwargs": {"enable_thinking": False},
            "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                                        "parameters": {"type": "object"}}}]}
    assert chat(client, {"messages": USER, "max_tokens": 2, **fine}).status_code == 200


def test_image_paths_with_a_nul_or_naming_no_file_are_a_400(stories, tmp_path):
    served, client = stories
    served.media_dir = str(tmp_path.resolve())
    (tmp_path / "sub").mkdir()
    try:
        for url, words in (("a\x00b.png", "NUL"), ("file://a\x00b.png", "NUL"), ("sub", "not a file"),
                           ("missing.png", "cannot be read")):
            body = {"max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}
            assert words in error_of(chat(client, body), 400)["message"], url
    finally:
        served.media_dir = None


def test_a_server_failure_is_a_json_500_of_type_server_error(stories, monkeypatch):
    """500 is for lmforge's own failures: still OpenAI's shape, typed server_error."""
    served, client = stories

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(served.renderer, "generation_prompt", broken)
    response = chat(client, {"messages": USER, "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


# ----------------------------------------------------------------------------- images

@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    from vlmkit import qwen2_vl

    return qwen2_vl(tmp_path_factory.mktemp("hostile-vlm") / "qwen2vl")


@pytest.fixture(scope="module")
def vlm_app(vlm):
    return app_client(str(vlm))


def test_a_decompression_bomb_is_refused_with_413_before_it_is_decoded(vlm_app):
    served, client = vlm_app
    bomb = png(20_000, 20_000, gray_bits=1)   # 400 million pixels in a few dozen KB
    assert len(bomb) < 400_000
    body = error_of(chat(client, with_images(bomb)), 413)
    assert "400000000 pixels" in body["message"] and body["param"] == "messages"
    # only the header is read: a file with no valid pixel data at all is refused the same way
    # (decoding it would fail, with a 400)
    assert "400000000 pixels" in error_of(chat(client, with_images(png(20_000, 20_000, truncated=True))),
                                          413)["message"]
    assert "9000 x 9000" in error_of(chat(client, with_images(png(9000, 9000, truncated=True))), 413)["message"]
    assert "cannot be decoded" in error_of(chat(client, with_images(png(64, 64, truncated=True))), 400)["message"]
    # and the server still answers
    assert chat(client, with_images(png(56, 56))).status_code == 200


def test_an_image_the_models_processor_refuses_is_a_400(vlm_app):
    """Qwen's image processor takes no aspect ratio of 200 or more (a ValueError: it was a 500)."""
    _, client = vlm_app
    for size in ((4000, 1), (1, 4000)):
        assert "image processor cannot take" in error_of(chat(client, with_images(png(*size))), 400)["message"]


def test_image_count_bytes_and_pixels_limits_and_the_options_raise_them(vlm_app):
    from lmforge.shared.core.catalog import defaults

    served, client = vlm_app
    limits = defaults("serve")
    assert (served.max_images, served.max_image_bytes, served.max_image_pixels) == (
        limits["max_images"], limits["max_image_bytes"], limits["max_image_pixels"])
    small = png(56, 56)
    many = with_images(*[small] * (served.max_images + 1))
    assert f"at most {served.max_images}" in error_of(chat(client, many), 400)["message"]
    big = png(4200, 4200)   # 17.6 million pixels: over the default 4096 x 4096
    message = error_of(chat(client, with_images(big)), 413)["message"]
    assert "4200 x 4200" in message and "--max-image-pixels" in message
    try:
        served.max_images, served.max_image_pixels = served.max_images + 1, 4200 * 4200
        assert chat(client, many).status_code == 200
        assert chat(client, with_images(big)).status_code == 200
        served.max_image_bytes = len(small) - 1
        assert "--max-image-bytes" in error_of(chat(client, with_images(small)), 413)["message"]
    finally:
        served.max_images, served.max_image_bytes, served.max_image_pixels = (
            limits["max_images"], limits["max_image_bytes"], limits["max_image_pixels"])


def test_a_local_image_over_the_byte_limit_is_refused_unread(vlm_app, tmp_path):
    served, client = vlm_app
    (tmp_path / "big.png").write_bytes(png(56, 56))
    served.media_dir, served.max_image_bytes = str(tmp_path.resolve()), 40
    try:
        body = {"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "big.png"}}, {"type": "text", "text": "?"}]}]}
        assert "--max-image-bytes" in error_of(chat(client, body), 413)["message"]
    finally:
        from lmforge.shared.core.catalog import defaults

        served.media_dir, served.max_image_bytes = None, defaults("serve")["max_image_bytes"]


def test_open_image_refuses_a_bomb_in_one_line():
    """`data pack` and every decode go through open_image: PIL's bomb error is a BadInput there."""
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.data.multimodal import image_size, open_image

    with pytest.raises(BadInput, match="too large"):
        open_image(png(20_000, 20_000, gray_bits=1), "row 3: image 1")
    assert image_size(png(300, 200)) == (300, 200)


def test_a_pixel_limit_above_pils_own_lets_pil_read_that_much(monkeypatch):
    """PIL refuses more than about 179 million pixels on its own; serve --max-image-pixels above that
    raises PIL's guard with it (and a limit below it leaves PIL's guard alone)."""
    from lmforge.shared.data.multimodal import ImageTooLarge, image_size
    from lmforge.shared.infer.app import Served, limit_images
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)   # put back afterwards
    huge = png(17_000, 17_000, truncated=True)   # 289 million pixels
    with pytest.raises(ImageTooLarge):
        image_size(huge, "image 1", max_pixels=300_000_000)
    served = Served(None, None, None, "m", 512, None, 1)
    limit_images(served, 1 << 20, 1000)
    assert Image.MAX_IMAGE_PIXELS > 1000
    limit_images(served, 1 << 20, 300_000_000)
    assert (served.max_image_bytes, served.max_image_pixels) == (1 << 20, 300_000_000)
    assert image_size(huge, "image 1", max_pixels=served.max_image_pixels) == (17_000, 17_000)


@pytest.mark.parametrize("flag", ["--max-images", "--max-image-bytes", "--max-image-pixels"])
def test_image_limits_below_their_minimum_are_refused(flag):
    from conftest import bad

    assert flag in bad(["serve", "-m", "nowhere", flag, "0"])


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_serve_options_and_memory_under_concurrent_image_requests(vlm):
    """`lmforge serve --max-images/--max-image-bytes/--max-image-pixels` reach the server, and 8
    clients each sending a 25-megapixel image (75 MB decoded) raise its peak memory by far less
    than 8 decoded images: decoding is bounded, not the clients."""
    from test_serve import Server

    s = Server("-m", str(vlm), "--max-images", "2", "--max-image-pixels", str(5000 * 5000),
               "--max-image-bytes", "200000")
    try:
        url = s.url + "/v1/chat/completions"
        small = png(56, 56)
        assert httpx.post(url, json=with_images(small), timeout=60).status_code == 200   # warm
        too_many = httpx.post(url, json=with_images(small, small, small), timeout=60)
        assert "at most 2" in error_of(too_many, 400)["message"]
        assert "5001 x 5000" in error_of(httpx.post(url, json=with_images(png(5001, 5000)), timeout=60),
                                         413)["message"]
        large = png(5000, 5000)
        assert len(large) < 200_000
        before = _peak_rss(s.proc.pid)
        answers: list[int] = []

        def one() -> None:
            answers.append(httpx.post(url, json=with_images(large), timeout=300).status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == [200] * 8, answers
        grown = _peak_rss(s.proc.pid) - before
        one_image = 5000 * 5000 * 3
        assert grown < 5 * one_image, f"peak memory grew {grown / 2**20:.0f} MiB in {time.monotonic() - started:.1f}s"
        assert httpx.post(url, json=with_images(png(56, 57)), timeout=60).status_code == 200
    finally:
        s.stop()
