"""The board's front door: which requests it answers.

Three checks, each against one attack:
- the Host header names this board (a loopback name on a loopback bind, and its port): a page
  elsewhere that rebinds its DNS name to 127.0.0.1 is refused;
- every request carries the board's token (a query parameter once, then a SameSite=Strict
  cookie, or an `Authorization: Bearer` header): nothing answers a client that does not know it;
- a request that changes anything (any method but GET/HEAD) has a JSON body and, when it comes
  from a browser, that browser's Origin (or Referer) is the board's own: a page on another origin
  that the user visits cannot make the browser POST to the board with the user's cookie (a form
  or a `text/plain` fetch needs no CORS preflight, so only these checks stop it).
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from lmforge.shared.core.errors import BadInput

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]"}
MIN_TOKEN = 16
SAFE_METHODS = ("GET", "HEAD")

# a Host header: a DNS name or IPv4 address, or a bracketed IPv6 address, then an optional port;
# anything else (userinfo, a second colon, spaces) is malformed
_HOST = re.compile(r"^(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?)"
                   r"(?::(?P<port>[0-9]{1,5}))?$")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str:
    """A token given by the user: long enough to be unguessable, no blanks around it."""
    if token != token.strip() or len(token) < MIN_TOKEN:
        raise BadInput(f"--token: a token needs at least {MIN_TOKEN} characters and no spaces around them",
                       "leave --token out and the board makes a random one")
    return token


def parse_host(header: str) -> tuple[str, int | None] | None:
    """('localhost', 7860) for 'localhost:7860'; None for anything that is not a plain host[:port]."""
    found = _HOST.match(header or "")
    if not found:
        return None
    port = found.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return None
    return found.group("name").lower().rstrip("."), int(port) if port else None


def origin_of(url: str) -> str | None:
    """'http://127.0.0.1:7860' for a URL, None for an opaque or malformed one ('null')."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass
class Refusal:
    status: int
    error: str


class Guard:
    def __init__(self, token: str, bind: str = "127.0.0.1", port: int | None = None):
        self.token = token
        self.bind = bind
        self.port = port
        self.cookie = f"lmforge_board_{port}" if port else "lmforge_board"   # one per board on a machine

    @property
    def loopback(self) -> bool:
        return self.bind in LOOPBACK

    def refusal(self, method: str, headers, query_token: str | None, cookies) -> Refusal | None:
        """Why a request is refused (status, one line), or None to answer it."""
        host = parse_host(headers.get("host") or "")
        if host is None:
            return Refusal(400, "malformed Host header")
        name, port = host
        if self.loopback and name not in LOCAL_NAMES:   # DNS rebinding: a page elsewhere naming this port
            return Refusal(403, f"host {name!r} refused: the board answers on {', '.join(sorted(LOCAL_NAMES))}")
        if self.port and port is not None and port != self.port and self.loopback:
            return Refusal(403, f"port {port} refused: the board listens on {self.port}")
        bearer = headers.get("authorization", "")
        bearer = bearer[len("Bearer "):].strip() if bearer.startswith("Bearer ") else ""
        given = query_token or cookies.get(self.cookie) or bearer
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return Refusal(401, "this board needs its token: open the address it printed when it started "
                                "(http://HOST:PORT/?token=...)")
        if method in SAFE_METHODS:
            return None
        kind = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            return Refusal(403, f"{method} refused: the board takes JSON bodies only (Content-Type {kind or 'none'})")
        own = f"http://{headers.get('host')}".lower()
        origin = headers.get("origin")
        if origin is None and headers.get("referer"):
            origin = origin_of(headers["referer"]) or "null"
        if origin is not None and origin_of(origin) != own and origin.lower() != own:
            return Refusal(403, f"{method} from {origin} refused: only the board's own page ({own}) may change things")
        if origin is None and not bearer:
            # browsers send an Origin with every POST; one that carries only the cookie is not our page
            return Refusal(403, f"{method} refused: no Origin header (scripts use 'Authorization: Bearer TOKEN')")
        return None
