"""`meshpipe serve`: the OpenAI-compatible HTTP endpoint, a FastAPI app hosted on Ray Serve.

The Serve replica is stateless: it holds `Pipeline` handles on named deployments (their routers)
and talks to them asynchronously, so one replica serves many concurrent streams. Admission is the
router's: a full pipeline answers 429 with `Retry-After`. A client that goes away mid-request
(Ray Serve cancels the handler) cancels its requests, which frees their KV caches on every stage.
"""

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.openai_api import (
    ApiError,
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
from actors.errors import DeploymentError
from actors.pipeline import Pipeline, StreamChunk
from models import TokenLogprob

log = logging.getLogger(__name__)

APP_NAME = "meshpipe-openai"  # the Ray Serve application's name

app = FastAPI(title="meshpipe", summary="OpenAI-compatible completions from a pipeline of Ray actors")


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(ApiError)
async def _on_api_error(_: Any, e: ApiError) -> JSONResponse:
    return _error_response(e)


@app.exception_handler(RequestValidationError)
async def _on_invalid(_: Any, e: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(e.errors()))


@app.exception_handler(StarletteHTTPException)
async def _on_http(_: Any, e: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
    return _error_response(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))


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

    def __init__(self, deployments: list[str]) -> None:
        self.names = list(deployments)
        self._pipes: dict[str, tuple[Pipeline, dict]] = {}  # name -> (handle, its describe())

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

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "deployments": self.names}

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        async def work(name: str, pipe: Pipeline, info: dict) -> Any:
            return await self._respond(Reply("text_completion", name), pipe, info, body, body.prompts(), body.logprobs)

        return await self._guard(body.model, work)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        async def work(name: str, pipe: Pipeline, info: dict) -> Any:
            prompt = await pipe.acall("chat_prompt", body.template_messages())
            return await self._respond(Reply("chat.completion", name), pipe, info, body, [prompt], body.logprobs_k())

        return await self._guard(body.model, work)

    async def _respond(self, reply: Reply, pipe: Pipeline, info: dict, body: Any, prompts: list[Any],
                       logprobs: int | None) -> Any:
        n = body.n
        context = info["config"]["max_seq_len"]
        params = [body.sampling(j, logprobs, context) for _ in prompts for j in range(n)]
        rids = await pipe.asubmit_many([p for p in prompts for _ in range(n)], params)  # all admitted, or 429
        if body.stream:
            return StreamingResponse(self._stream(reply, pipe, rids, n, body.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            outs = await asyncio.gather(*(pipe.acall("result", rid) for rid in rids))
        except BaseException:  # one failed, or the client went away: the others are not wanted
            for rid in rids:
                pipe.router.cancel.remote(rid)
            raise
        texts = await self._texts(pipe, [lp for c in outs for lp in c.logprobs or ()])
        return reply.envelope([choice(reply.kind, i, c, texts) for i, c in enumerate(outs)],
                              usage([outs[k * n].usage["prompt_tokens"] for k in range(len(prompts))],
                                    [c.usage["completion_tokens"] for c in outs]))

    async def _stream(self, reply: Reply, pipe: Pipeline, rids: list[str], n: int,
                      include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per new text of a choice, the finish, usage if asked, [DONE]."""
        offsets: dict[int, int] = defaultdict(int)
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        merged = _merge([pipe.afollow(rid) for rid in rids])
        try:
            async for i, chunk in merged:
                if not chunk.text and chunk.finish_reason is None and not chunk.logprobs:
                    continue  # text held back (a partial character, a possible stop string)
                texts = await self._texts(pipe, chunk.logprobs)
                yield _sse(reply.envelope([chunk_choice(reply.kind, i, chunk.text, chunk.logprobs, texts,
                                                        chunk.finish_reason, first=i not in offsets,
                                                        offset=offsets[i])], None, chunk=True))
                offsets[i] += len(chunk.text)
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


def start(deployments: list[str], host: str = "127.0.0.1", port: int = 8000, replicas: int = 1) -> str:
    """Runs the OpenAI-compatible app on Ray Serve in the connected Ray cluster; returns its base URL.

    Every name must be a running deployment (DeploymentError otherwise)."""
    if not ray.is_initialized():
        raise DeploymentError("connect to Ray first (ray.init(address=...)): the server attaches to deployments")
    for name in deployments:
        Pipeline.connect(name)  # fails fast, naming the missing deployment
    serve.start(http_options={"host": host, "port": port})
    http = serve.context._get_global_client().http_config  # Serve already running keeps its own options
    if (http.host, http.port) != (host, port):
        log.warning("Ray Serve was already running on %s:%d in this cluster: serving there, not on %s:%d",
                    http.host, http.port, host, port)
    serve.run(OpenAIServer.options(num_replicas=replicas).bind(list(deployments)), name=APP_NAME,
              route_prefix="/", blocking=False)
    url = f"http://{http.host}:{http.port}/v1"
    log.info("serving %s at %s", deployments, url)
    return url


def stop() -> None:
    """Removes the HTTP app (the deployments it served keep running)."""
    serve.delete(APP_NAME)
