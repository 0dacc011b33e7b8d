"""The OpenAI-compatible HTTP API, without the server: request schemas, sampling, responses, errors.

Pure (no Ray, no FastAPI): `actors/serve.py` hosts it on Ray Serve. Requests are validated at the
edge by pydantic; a field we do not support is rejected by name (400), never silently ignored when
it would change the output. Response shapes follow OpenAI's `/v1/completions` and
`/v1/chat/completions` (`finish_reason`, `usage`, `logprobs`, streaming chunks).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.errors import BackPressureError, DeploymentError, RequestTimeoutError, StageFailedError
from models import Completion, MeshpipeError, PromptTooLongError, SamplingParams, TokenLogprob
from models.sampling import MAX_SPECULATIVE

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_PROMPTS = 256  # prompts in one completions request (times n: sequences it asks for)
MAX_MESSAGES = 2048  # messages in one chat request (checked before any message is parsed)
MAX_PROMPT_IDS = 2**17  # token ids in one prompt (checked before the ids are parsed; the context refuses sooner)
INT64 = 2**63  # OpenAI's seed is a 64-bit integer
CHARS_PER_TOKEN = 64  # chat text beyond this many characters per context token cannot fit: refused untokenized
# every status an operation can answer, each with OpenAI's error body (the OpenAPI document lists them)
ERROR_STATUSES = {400: "bad request: a field names the problem", 401: "missing or incorrect API key",
                  404: "unknown model or path", 405: "method not allowed (see the Allow header)",
                  413: "request body too large", 429: "the pipeline is full: retry after Retry-After seconds",
                  500: "internal error (its type only)", 503: "a stage or the router is unavailable",
                  504: "the request ran past its deadline"}


class ApiError(Exception):
    """An HTTP error with OpenAI's JSON body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error's body (OpenAI's shape)."""

    error: ErrorDetail


def api_error(e: BaseException) -> ApiError:
    """The HTTP error for an exception: bad input 400, unknown model 404, back-pressure 429, failures 5xx."""
    if isinstance(e, ApiError):
        return e
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, PromptTooLongError):
        return ApiError(400, msg, param="prompt", code="context_length_exceeded")
    if isinstance(e, BackPressureError):
        return ApiError(429, msg, "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(e, RequestTimeoutError):
        return ApiError(504, msg, "timeout_error", code="timeout")
    if isinstance(e, (StageFailedError, DeploymentError)):
        return ApiError(503, msg, "server_error", code="service_unavailable")
    if isinstance(e, MeshpipeError) and isinstance(e, ValueError):  # InvalidRequestError, ConfigError, ...
        return ApiError(400, msg)
    if isinstance(e, UnicodeError):  # text that is not valid Unicode (a lone surrogate) reached a tokenizer
        return ApiError(400, "the text is not valid Unicode (a lone surrogate?): send UTF-8 text", code="invalid_text")
    # never the message: it may carry a traceback, paths, addresses or process ids
    return ApiError(500, f"internal error ({type(e).__name__}); the server log has the details", "server_error")


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """pydantic/FastAPI validation errors as one 400 naming the field (malformed JSON included)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ApiError(400, f"{field or 'body'}: {first['msg']}{more}", param=field)


# ----------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool = False  # one last chunk with `usage` and no choices


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (unknown fields are ignored, like OpenAI's)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # a served deployment's name (GET /v1/models); optional when one is served
    max_tokens: int | None = Field(None, ge=1)  # None: until EOS, a stop string or the context's end
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # an extension (as vLLM's)
    n: int = Field(1, ge=1, le=16)  # choices per prompt
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # choice i samples with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # an extension: generate past EOS (benchmarks)
    # an extension: drafts verified a pass (lossless): the deployment's draft model's, else prompt lookup
    speculative: int = Field(0, ge=0, le=MAX_SPECULATIVE)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by meshpipe: leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by meshpipe: leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, choice: int, logprobs: int | None, max_new_tokens: int) -> SamplingParams:
        """SamplingParams of choice `choice` (raises InvalidRequestError on a bad combination)."""
        return SamplingParams(
            max_new_tokens=self.max_tokens or max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=None if self.top_p >= 1 else self.top_p,
            seed=None if self.seed is None else self.seed + choice,
            stop=tuple(self.stop or ()),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            speculative=self.speculative,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # one prompt or several; text or token ids
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's logprob plus this many alternatives
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        # the union below tries every member on every element: a few million ids would cost seconds
        ids = [v] if isinstance(v, list) and v and isinstance(v[0], int) else v if isinstance(v, list) else []
        for one in ids:
            if isinstance(one, list) and len(one) > MAX_PROMPT_IDS:
                raise ValueError(f"a prompt has {len(one)} token ids: at most {MAX_PROMPT_IDS}")
        return v

    @model_validator(mode="after")
    def _completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by meshpipe: leave it false")
        if self.suffix:
            raise ValueError("suffix is not supported by meshpipe: leave it out")
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of={self.best_of} is not supported: leave it out or equal to n={self.n}")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty: give a string, a list of strings or token ids")
        if len(self.prompts()) * self.n > MAX_PROMPTS:
            raise ValueError(f"{len(self.prompts())} prompts x n={self.n} ask for more than {MAX_PROMPTS} "
                             "sequences in one request: send fewer")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts: a str, a list of token ids, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _by_role(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the call it answers) and content")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        bad = [p.type for p in v if p.type != "text"] if isinstance(v, list) else []
        if bad:
            raise ValueError(f"content parts of type {bad[0]!r} are not supported: send text")
        return v

    def for_template(self) -> dict[str, str]:
        """{"role", "content"} as chat templates read it ("developer" is read as "system")."""
        text = "".join(p.text or "" for p in self.content) if isinstance(self.content, list) else self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough(cls, v: Any) -> Any:  # before each message is parsed: a flood is refused at once
        if isinstance(v, list) and len(v) > MAX_MESSAGES:
            raise ValueError(f"{len(v)} messages: at most {MAX_MESSAGES} in one request")
        return v
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.tools:
            raise ValueError("tools are not supported by meshpipe: leave them out")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported: use text")
        return self

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ----------------------------------------------------------------------------- responses


@dataclass
class Reply:
    """Ids and the clock of one HTTP response (shared by every chunk of a stream)."""

    kind: str  # "text_completion" | "chat.completion"
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "cmpl" if self.kind == "text_completion" else "chatcmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def envelope(self, choices: list[dict], usage: dict | None, chunk: bool = False,
                 with_usage: bool = False) -> dict[str, Any]:
        obj = self.kind + (".chunk" if chunk and self.kind != "text_completion" else "")
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                               "choices": choices}
        if usage is not None or not chunk or with_usage:  # a stream that asked for usage: null until the last
            out["usage"] = usage
        return out


def usage(prompt_tokens: Sequence[int], completion_tokens: Sequence[int]) -> dict[str, int]:
    """Each prompt counted once, however many choices it had; every choice's tokens."""
    p, c = sum(prompt_tokens), sum(completion_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def logprob_ids(lps: Sequence[TokenLogprob] | None) -> set[int]:
    """The token ids whose text a logprobs answer needs."""
    return {i for lp in lps or () for i in (lp.token_id, *lp.top)}


def completion_logprobs(lps: Sequence[TokenLogprob], texts: dict[int, str], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [texts[lp.token_id] for lp in lps]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{texts[i]: v for i, v in lp.top.items()} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: Sequence[TokenLogprob], texts: dict[int, str]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(i: int, v: float) -> dict[str, Any]:
        return {"token": texts[i], "logprob": v, "bytes": list(texts[i].encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top.items()]}
                        for lp in lps], "refusal": None}


def choice(kind: str, index: int, c: Completion, texts: dict[int, str]) -> dict[str, Any]:
    """One finished choice of a completion (`text`) or chat completion (`message`)."""
    if kind == "text_completion":
        lp = None if c.logprobs is None else completion_logprobs(c.logprobs, texts)
        return {"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
    lp = None if c.logprobs is None else chat_logprobs(c.logprobs, texts)
    return {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
            "finish_reason": c.finish_reason}


def chunk_choice(kind: str, index: int, text: str, lps: Sequence[TokenLogprob] | None, texts: dict[int, str],
                 finish_reason: str | None, first: bool = False, offset: int = 0) -> dict[str, Any]:
    """One choice of a streamed chunk: new `text`, or a chat `delta` (the first one names the role)."""
    if kind == "text_completion":
        lp = None if lps is None else completion_logprobs(lps, texts, offset)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    lp = None if lps is None else chat_logprobs(lps, texts)
    return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
