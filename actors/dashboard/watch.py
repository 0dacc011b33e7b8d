"""`meshpipe watch`: the dashboard page and its status JSON for running deployments, without the HTTP
API (a small FastAPI app on uvicorn in this process, attached to the Ray cluster)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from actors.dashboard import routes
from actors.dashboard.status import PipelineStatus
from actors.http_guard import DEFAULT_MAX_BODY, GuardConfig, HttpGuard, hash_key

log = logging.getLogger(__name__)


def build_app(names: list[str], api_keys: tuple[str, ...] = ()) -> FastAPI:
    """The page, its files, its login form (with keys) and `GET /v1/pipeline/status` for `names`."""
    app = FastAPI(title="meshpipe watch", summary="The live status of meshpipe deployments", docs_url=None,
                  redoc_url=None)
    guard = GuardConfig(DEFAULT_MAX_BODY, frozenset(hash_key(k) for k in api_keys))
    app.add_middleware(HttpGuard, config=lambda: guard)
    board = routes.StatusBoard(names)

    @app.get("/", include_in_schema=False)
    async def root() -> Any:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    async def page() -> Any:
        return routes.page()

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str) -> Any:
        return routes.static(name)

    @app.post("/dashboard/login", include_in_schema=False)
    async def login(request: Request) -> Any:
        return await routes.login(request, guard.key_digests)

    @app.get("/v1/pipeline/status", response_model=PipelineStatus)
    async def status(deployment: str | None = None) -> Any:
        """The live status of a deployment: replicas, route, throughput, events, training runs."""
        name = board.pick(deployment)
        if name is None:
            return JSONResponse({"error": {"message": f"give ?deployment= one of {names}",
                                           "type": "invalid_request_error", "code": "deployment"}}, status_code=404)
        try:
            return await board.status(name)
        except Exception as e:  # noqa: BLE001 - a JSON error, never a traceback
            log.warning("status of %r failed: %s", name, e)
            return JSONResponse({"error": {"message": f"the deployment {name!r} is not reachable now: "
                                                      f"{type(e).__name__}", "type": "server_error",
                                           "code": "unavailable"}}, status_code=503)

    return app


def run(names: list[str], host: str = "127.0.0.1", port: int = 8266, api_keys: tuple[str, ...] = ()) -> None:
    """Serves the dashboard until interrupted."""
    import uvicorn

    uvicorn.run(build_app(names, api_keys), host=host, port=port, log_level="warning")
