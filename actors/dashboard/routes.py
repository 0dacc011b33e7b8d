"""The dashboard's HTTP side, shared by `meshpipe serve` (on its FastAPI app) and `meshpipe watch` (its own):
the page, its static files (an allowlist), the login form that sets the session cookie, and the
status JSON (`StatusBoard`: one collector per deployment)."""

from __future__ import annotations

import hmac
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from actors.dashboard.status import PipelineStatus, StatusCollector
from actors.http_guard import SESSION_COOKIE, SESSION_S, hash_key, session_cookie

STATIC = Path(__file__).parent / "static"
FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "uPlot.iife.min.js": "text/javascript",
         "uPlot.min.css": "text/css", "uPlot.LICENSE": "text/plain"}
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                      "frame-ancestors 'self'"}
MAX_KEY = 512  # characters of a key typed in the login form


def page() -> HTMLResponse:
    """The dashboard page (it fetches everything else itself)."""
    return HTMLResponse((STATIC / "index.html").read_text(), headers=HEADERS)


def static(name: str) -> Response:
    """One of the page's own files; anything else is a 404 (no paths from the request reach the disk)."""
    if name not in FILES:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response((STATIC / name).read_bytes(), media_type=FILES[name], headers=HEADERS)


async def login(request: Request, digests: frozenset[str]) -> Response:
    """The login form: a key that matches sets the session cookie; either way back to the page."""
    try:
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    except ValueError:  # more fields than a login form has: refused like a wrong key
        form = {}
    key = (form.get("key") or [""])[0][:MAX_KEY]
    digest = hash_key(key)
    if not any([hmac.compare_digest(digest, d) for d in digests]):  # each compared in constant time
        return RedirectResponse("/dashboard?denied=1", status_code=303, headers=HEADERS)
    out = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    out.set_cookie(SESSION_COOKIE, session_cookie(digest), max_age=SESSION_S, httponly=True, samesite="strict",
                   secure=request.url.scheme == "https", path="/")
    return out


class StatusBoard:
    """The collectors of the deployments a server shows (made on first request)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.collectors: dict[str, StatusCollector] = {}

    def pick(self, deployment: str | None) -> str | None:
        """The deployment asked for (the only one when none is named); None when it is not shown here."""
        if deployment is None:
            return self.names[0] if len(self.names) == 1 else None
        return deployment if deployment in self.names else None

    async def status(self, name: str) -> PipelineStatus:
        if name not in self.collectors:
            self.collectors[name] = StatusCollector(name)
        return await self.collectors[name].status()
