"""`meshpipe serve`: the OpenAI-compatible HTTP endpoint, a FastAPI app hosted on Ray Serve.

The Serve replica is stateless: it holds `Pipeline` handles on named deployments (their routers)
and talks to them asynchronously, so one replica serves many concurrent streams. Admission is the
router's: a full pipeline answers 429 with `Retry-After`. A client that goes away mid-request
(Ray Serve cancels the handler) cancels its requests, which frees their KV caches on every stage.
"""

import asyncio
import json
import logging
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.dashboard import routes as dashboard_routes
from actors.dashboard.status import PipelineStatus
from actors.http_guard import DEFAULT_MAX_BODY, GuardConfig, HttpGuard, hash_key, is_loopback, tls_options
from actors.openai_api import (
    CHARS_PER_TOKEN,
    ERROR_STATUSES,
    ApiError,
    ErrorBody,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    api_error,
    choice,
    chunk_choice,
    logprob_ids,
    usage,
    validation_error,
)
from actors.detach import detached
from actors.errors import DeploymentError
from actors.pipeline import Pipeline, StreamChunk
from models import InvalidRequestError, PromptTooLongError, TokenLogprob

log = logging.getLogger(__name__)

APP_NAME = "meshpipe-openai"  # the Ray Serve application's name

DEFAULT_REQUEST_TIMEOUT_S = 600.0

app = FastAPI(title="meshpipe", summary="OpenAI-compatible completions from a pipeline of Ray actors")
app.state.guard = GuardConfig()
app.add_middleware(HttpGuard, config=lambda: app.state.guard)  # body limit and API keys, before any route
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody, "description": text}
                                          for code, text in ERROR_STATUSES.items()}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(ApiError)
async def _on_api_error(_: Any, e: ApiError) -> JSONResponse:
    return _error_response(e)


@app.exception_handler(RequestValidationError)
async def _on_invalid(_: Any, e: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(e.errors()))


@app.exception_handler(StarletteHTTPException)
async def _on_http(_: Any, e: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method (with Allow)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
    return _error_response(ApiError(e.status_code, str(e.detail), code=code, headers=dict(e.headers or {})))


def _openapi() -> dict[str, Any]:
    """FastAPI's document without its 422 (validation errors are answered 400, as OpenAI does)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def _cancel_all(router: Any, rids: list[str]) -> None:
    """Asks the router to cancel each request (a finished one's cancel is a no-op), outside the calling
    task: Ray Serve cancels an abandoned request's task with every call it made."""
    for rid in rids:
        detached(router.cancel.remote, rid)


class _Owned:
    """Cancels its requests when it is dropped: a stream whose client left before it started (its
    generator never ran, so its `finally` never will) holds one."""

    def __init__(self, pipe: Pipeline, rids: list[str]) -> None:
        self.rids = rids
        weakref.finalize(self, _cancel_all, pipe.router, list(rids))


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its body however the response ends. Starlette leaves a body cut
    short at a `send` (the client left) to the garbage collector, which a traceback's reference cycle
    can delay for long: the body's `finally`, which cancels the requests, must run now."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr] - always our async generator


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _merge(streams: list[AsyncIterator[StreamChunk]]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Interleaves several streams as (index, chunk); closing it closes them all (cancelling their requests)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, chunk, err = await queue.get()
            if err is not None:
                raise err
            if chunk is None:
                left -= 1
                continue
            yield i, chunk
    finally:
        for t in tasks:
            t.cancel()  # a stream cut short cancels its request (Pipeline.afollow)


@serve.deployment(name="openai", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIServer:
    """The HTTP front of one or more named deployments; a request's `model` names the deployment."""

    def __init__(self, deployments: list[str], key_digests: tuple[str, ...] = (),
                 max_body_bytes: int = DEFAULT_MAX_BODY, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.names = list(deployments)
        self._pipes: dict[str, tuple[Pipeline, dict]] = {}  # name -> (handle, its describe())
        self.request_timeout_s = request_timeout_s  # every request's deadline: then 504, its caches freed
        self.board = dashboard_routes.StatusBoard(self.names)  # the dashboard's collectors
        app.state.guard = GuardConfig(max_body_bytes, frozenset(key_digests))  # SHA-256 digests, never keys

    async def _deployment(self, model: str | None) -> tuple[str, Pipeline, dict]:
        if model is None:
            if len(self.names) != 1:
                raise ApiError(400, f"model is required: one of {self.names}", param="model")
            model = self.names[0]
        if model not in self.names:
            raise ApiError(404, f"the model {model!r} does not exist here: use one of {self.names} (GET /v1/models)",
                           param="model", code="model_not_found")
        if model not in self._pipes:
            pipe = Pipeline.connect(model)
            self._pipes[model] = (pipe, await pipe.acall("describe"))
        return (model, *self._pipes[model])

    async def _texts(self, pipe: Pipeline, lps: list[TokenLogprob] | None) -> dict[int, str]:
        ids = sorted(logprob_ids(lps))
        return dict(zip(ids, await pipe.acall("token_texts", ids))) if ids else {}

    async def _guard(self, model: str | None, work: Any) -> Any:
        """Runs `work(name, pipe, info)`, turning every error into OpenAI's JSON error and status."""
        try:
            name, pipe, info = await self._deployment(model)
            return await work(name, pipe, info)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - every error gets a JSON body
            if isinstance(e, DeploymentError) and model in self._pipes:
                self._pipes.pop(model)  # connect again next time (redeployed, or gone)
            err = api_error(e)
            if err.status >= 500:
                log.error("request failed: %s", e, exc_info=err.status == 500)
            raise err from None

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard(self) -> Any:
        return dashboard_routes.page()

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def dashboard_static(self, name: str) -> Any:
        return dashboard_routes.static(name)

    @app.post("/dashboard/login", include_in_schema=False)
    async def dashboard_login(self, request: Request) -> Any:
        return await dashboard_routes.login(request, app.state.guard.key_digests)

    @app.get("/v1/pipeline/status", response_model=PipelineStatus, responses=ERRORS)
    async def pipeline_status(self, deployment: str | None = None) -> PipelineStatus:
        """The live status of a deployment (the dashboard page draws it): replicas, route, throughput,
        events, training runs. `deployment` may be left out when the server shows one."""
        name = self.board.pick(deployment)
        if name is None:
            raise ApiError(404 if deployment else 400, f"give ?deployment= one of {self.names}", param="deployment")
        try:
            return await self.board.status(name)
        except Exception as e:  # noqa: BLE001 - every error gets a JSON body
            raise api_error(e) from None

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "deployments": self.names}

    @app.get("/v1/models", responses=ERRORS)
    async def models(self) -> dict[str, Any]:
        data = []
        for name in self.names:
            try:
                _, _, info = await self._deployment(name)
            except Exception as e:  # noqa: BLE001 - a deployment that is gone is not listed
                log.warning("deployment %r is not available: %s", name, e)
                continue
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "meshpipe",
                         "root": Path(info["model"]).name, "max_model_len": info["config"]["max_seq_len"],
                         "stages": len(info["replicas"])})
        return {"object": "list", "data": data}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(self, body: CompletionRequest) -> Any:
        async def work(name: str, pipe: Pipeline, info: dict) -> Any:
            return await self._respond(Reply("text_completion", name), pipe, info, body, body.prompts(), body.logprobs)

        return await self._guard(body.model, work)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        async def work(name: str, pipe: Pipeline, info: dict) -> Any:
            chars, context = sum(len(m["content"]) for m in body.template_messages()), info["config"]["max_seq_len"]
            if chars > CHARS_PER_TOKEN * context:  # refused before the template is rendered or anything tokenized
                raise PromptTooLongError(f"the messages have {chars} characters: far more than the model's context "
                                         f"of {context} tokens can hold")
            prompt = await pipe.acall("chat_prompt", body.template_messages())
            return await self._respond(Reply("chat.completion", name), pipe, info, body, [prompt], body.logprobs_k())

        return await self._guard(body.model, work)

    async def _respond(self, reply: Reply, pipe: Pipeline, info: dict, body: Any, prompts: list[Any],
                       logprobs: int | None) -> Any:
        n = body.n
        context = info["config"]["max_seq_len"]
        if body.max_tokens is not None and body.max_tokens >= context:
            raise InvalidRequestError(f"max_tokens={body.max_tokens} leaves no room for a prompt in the model's "
                                      f"context of {context} tokens: ask for fewer")
        for p in prompts:  # token ids are counted before anything is sent on (text is counted once tokenized)
            if isinstance(p, list) and len(p) >= context:
                raise PromptTooLongError(f"a prompt of {len(p)} token ids leaves no room in the model's context of "
                                         f"{context} tokens")
        params = [body.sampling(j, logprobs, context) for _ in prompts for j in range(n)]
        submit = asyncio.ensure_future(pipe.asubmit_many([p for p in prompts for _ in range(n)], params,
                                                         self.request_timeout_s))  # all admitted, or 429
        try:
            rids = await asyncio.shield(submit)
        except asyncio.CancelledError:  # the client left while they were admitted: cancel them once they are
            submit.add_done_callback(lambda t: None if t.cancelled() or t.exception() is not None
                                     else _cancel_all(pipe.router, t.result()))
            raise
        if body.stream:
            return _ClosingStream(self._stream(reply, pipe, _Owned(pipe, rids), n, body.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            outs = await asyncio.gather(*(pipe.acall("result", rid) for rid in rids))
        except BaseException:  # one failed, or the client went away: the others are not wanted
            _cancel_all(pipe.router, rids)
            raise
        texts = await self._texts(pipe, [lp for c in outs for lp in c.logprobs or ()])
        return reply.envelope([choice(reply.kind, i, c, texts) for i, c in enumerate(outs)],
                              usage([outs[k * n].usage["prompt_tokens"] for k in range(len(prompts))],
                                    [c.usage["completion_tokens"] for c in outs]))

    async def _stream(self, reply: Reply, pipe: Pipeline, owned: _Owned, n: int,
                      include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per new text of a choice, the finish, usage if asked, [DONE]."""
        offsets: dict[int, int] = defaultdict(int)  # per choice: characters its streamed tokens cover
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        merged = _merge([pipe.afollow(rid) for rid in owned.rids])
        try:
            async for i, chunk in merged:
                if not chunk.text and chunk.finish_reason is None and not chunk.logprobs:
                    continue  # text held back (a partial character, a possible stop string)
                texts = await self._texts(pipe, chunk.logprobs)
                yield _sse(reply.envelope([chunk_choice(reply.kind, i, chunk.text, chunk.logprobs, texts,
                                                        chunk.finish_reason, first=i not in offsets,
                                                        offset=offsets[i])], None, chunk=True,
                                          with_usage=include_usage))
                # text_offset counts the tokens' text, not the text sent (held back for stop strings)
                offsets[i] += sum(len(texts[lp.token_id]) for lp in chunk.logprobs or ())
                if chunk.usage is not None:
                    prompt_tokens[i // n] = chunk.usage["prompt_tokens"]
                    completion_tokens[i] = chunk.usage["completion_tokens"]
            if include_usage:
                yield _sse(reply.envelope([], usage(list(prompt_tokens.values()), list(completion_tokens.values())),
                                          chunk=True))
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error travels as an event
            yield _sse(api_error(e).body())
        finally:  # a dropped client closes this stream at a `yield`: `async for` would leave `merged` to
            await merged.aclose()  # the garbage collector, and its requests running; cancel them now
        yield "data: [DONE]\n\n"


def start(deployments: list[str], host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          api_keys: tuple[str, ...] = (), insecure: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY,
          request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, tls_cert: str | None = None,
          tls_key: str | None = None) -> str:
    """Runs the OpenAI-compatible app on Ray Serve in the connected Ray cluster; returns its base URL.

    Every name must be a running deployment (DeploymentError otherwise). With `api_keys`, requests need
    `Authorization: Bearer KEY` (the app keeps their SHA-256 digests); a host other than loopback
    without a key is refused unless `insecure`. With `tls_cert` and `tls_key` (PEM files, readable where
    Serve's proxies run) the server speaks HTTPS."""
    if not api_keys and not insecure and not is_loopback(host):
        raise DeploymentError(f"serving on {host} without an API key would let anyone who reaches it use the "
                              "deployments: give --api-key KEY (or MESHPIPE_API_KEY), or --insecure to do it anyway")
    tls = tls_options(tls_cert, tls_key)
    if not ray.is_initialized():
        raise DeploymentError("connect to Ray first (ray.init(address=...)): the server attaches to deployments")
    for name in deployments:
        Pipeline.connect(name)  # fails fast, naming the missing deployment
    serve.start(http_options={"host": host, "port": port, **tls})
    http = serve.context._get_global_client().http_config  # Serve already running keeps its own options
    if tls and not http.ssl_certfile:
        raise DeploymentError("Ray Serve already runs in this cluster without TLS: its HTTP options are set when "
                              "it starts; `serve shutdown` it first, or serve without --tls-cert")
    if (http.host, http.port) != (host, port):
        log.warning("Ray Serve was already running on %s:%d in this cluster: serving there, not on %s:%d",
                    http.host, http.port, host, port)
    digests = tuple(hash_key(k) for k in api_keys)
    serve.run(OpenAIServer.options(num_replicas=replicas).bind(list(deployments), digests, max_body_bytes,
                                                               request_timeout_s), name=APP_NAME,
              route_prefix="/", blocking=False)
    url = f"{'https' if http.ssl_certfile else 'http'}://{http.host}:{http.port}/v1"
    log.info("serving %s at %s", deployments, url)
    return url


def stop() -> None:
    """Removes the HTTP app (the deployments it served keep running)."""
    serve.delete(APP_NAME)
