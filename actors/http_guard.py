"""The HTTP front's gate, before any route runs: request body size and API keys (pure ASGI, no Ray).

- Bodies over `max_body_bytes` are refused with 413 from their `Content-Length`, or as soon as a
  streamed body passes the limit, before the JSON is parsed.
- With API keys set, every path but the open ones (`/health`, `/openapi.json`) needs
  `Authorization: Bearer KEY`, as OpenAI's clients send it. Keys are held only as SHA-256 digests
  (`hash_key`), compared in constant time against each; a wrong or missing key is a 401 in
  OpenAI's error shape, which never echoes what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException

OPEN_PATHS = frozenset({"/health", "/openapi.json"})
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
        if cfg.key_digests and scope.get("path", "") not in OPEN_PATHS and \
                not key_matches(headers.get("authorization"), cfg.key_digests):
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
