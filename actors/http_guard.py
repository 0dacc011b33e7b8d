"""The HTTP front's gate, before any route runs: request body size and API keys (pure ASGI, no Ray).

- Bodies over `max_body_bytes` are refused with 413 from their `Content-Length`, or as soon as a
  streamed body passes the limit, before the JSON is parsed.
- With API keys set, every path but the open ones (`/health`, `/openapi.json`, the dashboard's page,
  its static files and its login form) needs `Authorization: Bearer KEY`, as OpenAI's clients send it,
  or the dashboard's session cookie (`session_cookie`: an expiry signed with HMAC by a key's digest,
  set by the login form). Keys are held only as SHA-256 digests (`hash_key`), compared in constant time
  against each; a wrong or missing key is a 401 in OpenAI's error shape, which never echoes what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException

from actors.errors import DeploymentError

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/dashboard", "/dashboard/login"})
OPEN_PREFIXES = ("/dashboard/static/",)
SESSION_COOKIE = "meshpipe_session"
SESSION_S = 12 * 3600  # a dashboard login lasts this long
DEFAULT_MAX_BODY = 8 << 20  # 8 MiB

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def hash_key(key: str) -> str:
    """The digest an API key is kept as (never the key itself)."""
    return hashlib.sha256(b"meshpipe-api-key\0" + key.encode("utf-8")).hexdigest()


def key_matches(authorization: str | None, digests: Iterable[str]) -> bool:
    """Whether `Authorization: Bearer KEY` carries one of the keys whose digests are given."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    try:  # headers arrive as latin-1 text; a client sends a non-ASCII key as UTF-8 bytes
        token = token.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass  # then as it came (it matches no UTF-8 key)
    presented = hash_key(token.strip())
    ok = False
    for d in digests:  # every digest is compared: the time does not say which one matched
        ok |= hmac.compare_digest(presented, d)
    return ok


@dataclass(frozen=True)
class GuardConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY
    key_digests: frozenset[str] = field(default_factory=frozenset)  # empty: no key needed


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def session_cookie(digest: str, now: float | None = None) -> str:
    """A dashboard session: `<expiry>.<HMAC-SHA256(digest, expiry)>` (no key or digest in it)."""
    import time

    expiry = str(int((time.time() if now is None else now) + SESSION_S))
    return f"{expiry}.{hmac.new(digest.encode(), expiry.encode(), hashlib.sha256).hexdigest()}"


def session_valid(cookie: str | None, digests: Iterable[str], now: float | None = None) -> bool:
    """Whether a session cookie was signed by one of the keys' digests and has not expired."""
    import time

    expiry, _, mac = (cookie or "").partition(".")
    if not expiry.isdigit() or len(expiry) > 12 or int(expiry) < (time.time() if now is None else now):
        return False
    ok = False
    for d in digests:  # every digest compared, in constant time
        ok |= hmac.compare_digest(mac, hmac.new(d.encode(), expiry.encode(), hashlib.sha256).hexdigest())
    return ok


def _cookie(header: str | None, name: str) -> str | None:
    for part in (header or "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class HttpGuard:
    """ASGI middleware: the body limit and the API key check, from `config()` (read per request)."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: Callable[[], GuardConfig]) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg = self.config()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if cfg.key_digests and not is_open(scope.get("path", "")) and \
                not key_matches(headers.get("authorization"), cfg.key_digests) and \
                not session_valid(_cookie(headers.get("cookie"), SESSION_COOKIE), cfg.key_digests):
            await _reply(send, 401, error_body(
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                "invalid_request_error", "invalid_api_key"), {"www-authenticate": "Bearer"})
            return
        limit = cfg.max_body_bytes
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = limit + 1
        if declared > limit:
            await _reply(send, 413, _too_large(limit))
            return
        seen, started = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI turns other errors while reading the body into a 400
                    raise HTTPException(413, too_large_message(limit))
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except HTTPException as e:  # raised while the body streamed in, outside FastAPI's handlers
            if e.status_code != 413 or started:
                raise
            await _reply(send, 413, _too_large(limit))


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server accepts ({limit} bytes): send less "
            "(fewer or shorter prompts), or start the server with a larger --max-body-bytes")


def _too_large(limit: int) -> bytes:
    return error_body(too_large_message(limit), "invalid_request_error", "request_too_large")


async def _reply(send: Send, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def tls_options(cert: str | None, key: str | None) -> dict[str, str]:
    """Serve's HTTP options for HTTPS from a PEM certificate (chain) and its private key; {} for neither.

    Both files are checked here, so a typo fails before Serve starts (a proxy that cannot read them
    would fail later, on its node)."""
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise DeploymentError("TLS needs both a certificate and its private key: give --tls-cert and --tls-key")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: bad content, not a missing file
        unreadable = isinstance(e, OSError) and not isinstance(e, ssl.SSLError)
        reason = (e.strerror or "unreadable").lower() if unreadable else "not PEM, or a key that does not match"
        raise DeploymentError(f"the TLS certificate or key cannot be used ({reason}): give --tls-cert a PEM "
                              "certificate and --tls-key the unencrypted PEM private key that matches it") from None
    return {"ssl_certfile": str(Path(cert).resolve()), "ssl_keyfile": str(Path(key).resolve())}


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (no API key needed there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
