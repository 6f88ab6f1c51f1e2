"""`chat --url`: the conversation of `chat`, answered by a running `lmforge serve` (or any server
of OpenAI's chat completions API) instead of a model loaded here.

Each turn is one POST to URL/v1/chat/completions with stream=true; the answer is printed from the
server-sent events as they come. Ctrl-C closes the connection, which the server takes as a client
gone away: it stops generating. The standard library's HTTP client is enough (no dependency).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Callable

from lmforge.shared.core.errors import BadInput
from lmforge.shared.infer.chat import Answer, Settings

TIMEOUT = 600.0   # seconds without a byte from the server (a long queue, a slow first token)


class RemoteModel:
    """A served model: its name (`--model`, else the first the server lists) and address."""

    reads_images: bool | None = None   # the server says so when it gets an image

    def __init__(self, url: str, model: str | None, api_key: str | None):
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise BadInput(f"--url {url}: not an http:// or https:// address",
                           "give the server's address, e.g. http://127.0.0.1:8000")
        self.base = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = api_key
        served = self._models()
        if model is not None and model not in served:
            raise BadInput(f"--model {model}: {self.base} serves {', '.join(served) or 'no model'}",
                           "drop --model, or name one the server serves")
        if not served and model is None:
            raise BadInput(f"--url {self.base}: the server lists no model", "name it with --model")
        self.name = model or served[0]

    def _request(self, path: str, body: dict | None = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        return urllib.request.Request(self.base + path, data=data, headers=headers,
                                      method="POST" if body is not None else "GET")

    def _models(self) -> list[str]:
        """The served model ids (GET /v1/models): the server is there, and takes our key."""
        try:
            with urllib.request.urlopen(self._request("/v1/models"), timeout=30) as response:
                listed = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise BadInput(f"--url {self.base}: the server wants an API key"
                               + (" and refused this one" if self.api_key else ""),
                               "pass --api-key KEY (or set LMFORGE_API_KEY) as given to `lmforge serve`") from None
            raise BadInput(f"--url {self.base}: GET /v1/models answered HTTP {exc.code} ({_said(exc)})",
                           "is this an lmforge serve (an OpenAI-compatible server) address?") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BadInput(f"--url {self.base}: cannot reach the server ({reason})",
                           "start it with `lmforge serve -m MODEL`, or check the address and port") from None
        except ValueError:
            raise BadInput(f"--url {self.base}: GET /v1/models did not answer JSON",
                           "is this an lmforge serve (an OpenAI-compatible server) address?") from None
        data = listed.get("data") if isinstance(listed, dict) else None
        return [m["id"] for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def interrupt(self) -> None:
        raise KeyboardInterrupt   # out of the blocking read, to `answer`, which closes the connection

    def answer(self, turns: list[dict], system: str, settings: Settings, write: Callable[[str], None]) -> Answer:
        body: dict = {"model": self.name, "messages": openai_messages(turns, system), "stream": True,
                      "temperature": settings.temperature}
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        if settings.frequency_penalty:
            body["frequency_penalty"] = settings.frequency_penalty
        if settings.presence_penalty:
            body["presence_penalty"] = settings.presence_penalty
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty
        parts: list[str] = []
        response = None
        try:
            try:
                response = urllib.request.urlopen(self._request("/v1/chat/completions", body), timeout=TIMEOUT)
            except urllib.error.HTTPError as exc:
                return Answer("", error=f"the server refused the message (HTTP {exc.code}): {_said(exc)}")
            except (urllib.error.URLError, OSError) as exc:
                return Answer("", error=f"the server cannot be reached ({getattr(exc, 'reason', exc)})")
            thinking = False
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event.get("error"), dict):
                    return Answer("".join(parts), error=f"the server failed: {event['error'].get('message')}")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = ""
                    if delta.get("reasoning_content"):   # a thinking model's reasoning, shown as the model wrote it
                        piece = ("" if thinking else "<think>") + delta["reasoning_content"]
                        thinking = True
                    if delta.get("content"):
                        piece += ("</think>\n\n" if thinking else "") + delta["content"]
                        thinking = False
                        parts.append(delta["content"])
                    if piece:
                        write(piece)
            return Answer("".join(parts))
        except KeyboardInterrupt:   # Ctrl-C: the connection closes below, and the server stops
            return Answer("".join(parts), stopped=True)
        except (OSError, urllib.error.URLError) as exc:
            return Answer("".join(parts), error=f"the connection to the server broke ({exc})")
        finally:
            if response is not None:
                response.close()

    def close(self) -> None:
        pass


def openai_messages(turns: list[dict], system: str) -> list[dict]:
    """Aligned messages (and the system prompt) as OpenAI chat messages; images as data: URLs."""
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    for m in turns:
        if m.get("parts"):
            content: object = [
                {"type": "image_url", "image_url": {"url": f"data:image/{p.get('format') or 'png'};base64,"
                                                           + base64.b64encode(p["image"]).decode("ascii")}}
                if p.get("type") == "image" else {"type": "text", "text": p.get("text") or ""}
                for p in m["parts"]]
        else:
            content = m.get("content") or ""
        out.append({"role": m["role"], "content": content})
    return out


def _said(exc: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-shaped error body, else the HTTP reason."""
    try:
        body = json.loads(exc.read())
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
