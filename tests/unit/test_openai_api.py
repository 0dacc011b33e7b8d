"""The OpenAI-compatible API without a server: request validation, sampling, errors, response shapes."""

from __future__ import annotations

import pydantic
import pytest

from actors.errors import BackPressureError, DeploymentError, RequestTimeoutError, StageFailedError
from actors.openai_api import (
    MAX_PROMPT_IDS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    api_error,
    chat_logprobs,
    choice,
    chunk_choice,
    completion_logprobs,
    usage,
    validation_error,
)
from models import Completion, ConfigError, InvalidRequestError, PromptTooLongError, TokenLogprob


def _errors(cls: type, **body: object) -> list[dict]:
    with pytest.raises(pydantic.ValidationError) as e:
        cls(**body)
    return e.value.errors()


@pytest.mark.parametrize(("prompt", "prompts"), [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_a_prompt_is_text_or_token_ids_one_or_several(prompt: object, prompts: list) -> None:
    assert CompletionRequest(prompt=prompt).prompts() == prompts


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "speculative": 17}, "speculative"),
    ({"prompt": "x", "speculative": -1}, "speculative"),
])
def test_out_of_range_fields_are_named(body: dict, field: str) -> None:
    err = validation_error(_errors(CompletionRequest, **body))
    assert err.status == 400 and err.param and err.param.startswith(field), (err.param, err.message)


@pytest.mark.parametrize(("body", "words"), [
    ({"prompt": "x", "echo": True}, "echo is not supported"),
    ({"prompt": "x", "suffix": "y"}, "suffix is not supported"),
    ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty is not supported"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias is not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of=3"),
    ({"prompt": []}, "prompt is empty"),
])
def test_unsupported_fields_are_refused_not_ignored(body: dict, words: str) -> None:
    err = validation_error(_errors(CompletionRequest, **body))
    assert err.status == 400 and words in err.message


@pytest.mark.parametrize("prompt", [[0] * (MAX_PROMPT_IDS + 1), [[1, 2], [0] * (MAX_PROMPT_IDS + 1)]])
def test_an_oversized_token_prompt_is_one_error_before_its_ids_are_parsed(prompt: list) -> None:
    errors = _errors(CompletionRequest, prompt=prompt)  # not one error per id from each member of the union
    assert len(errors) == 1 and f"{MAX_PROMPT_IDS + 1} token ids: at most {MAX_PROMPT_IDS}" in errors[0]["msg"]
    assert CompletionRequest(prompt=[7] * MAX_PROMPT_IDS).prompts() == [[7] * MAX_PROMPT_IDS]


def test_chat_requests() -> None:
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                       {"type": "text", "text": "there"}]}],
                                max_completion_tokens=7, logprobs=True, top_logprobs=3, user="u1", metadata={})
    assert req.template_messages() == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hi there"}]
    assert req.max_tokens == 7 and req.logprobs_k() == 3
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True).logprobs_k() == 0
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).logprobs_k() is None
    assert "top_logprobs needs logprobs" in str(_errors(ChatCompletionRequest, messages=[{"role": "user", "content": "x"}],
                                                        top_logprobs=2))
    assert "image_url" in str(_errors(ChatCompletionRequest, messages=[
        {"role": "user", "content": [{"type": "image_url"}]}]))
    assert _errors(ChatCompletionRequest, messages=[])[0]["loc"] == ("messages",)
    assert _errors(ChatCompletionRequest, messages=[{"role": "robot", "content": "x"}])[0]["loc"][-1] == "role"
    assert "tools are not supported" in str(_errors(ChatCompletionRequest, messages=[{"role": "user", "content": "x"}],
                                                    tools=[{"type": "function"}]))


def test_sampling_params_per_choice() -> None:
    req = CompletionRequest(prompt="x", max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=10, stop="END")
    p0, p1 = req.sampling(0, 2, 256), req.sampling(1, 2, 256)
    assert (p0.seed, p1.seed) == (10, 11)  # choices differ, and replay
    assert p0.max_new_tokens == 5 and p0.temperature == 0.7 and p0.top_p == 0.9 and p0.top_k == 40
    assert p0.stop == ("END",) and p0.logprobs == 2
    default = CompletionRequest(prompt="x", max_tokens=None, top_p=1.0).sampling(0, None, 256)
    assert default.top_p is None and default.seed is None and default.max_new_tokens == 256  # the context's end
    assert CompletionRequest(prompt="x").sampling(0, None, 256).max_new_tokens == 16  # OpenAI's default
    assert CompletionRequest(prompt="x").temperature == 1.0
    assert CompletionRequest(prompt="x", speculative=4).sampling(0, None, 256).speculative == 4  # an extension
    assert CompletionRequest(prompt="x").sampling(0, None, 256).speculative == 0


@pytest.mark.parametrize(("exc", "status", "code"), [
    (PromptTooLongError("prompt has 300 tokens"), 400, "context_length_exceeded"),
    (InvalidRequestError("token id 999 is outside"), 400, None),
    (ConfigError("this model has no chat template"), 400, None),
    (BackPressureError("pipeline is full"), 429, "rate_limit_exceeded"),
    (RequestTimeoutError("timed out"), 504, "timeout"),
    (StageFailedError("stage 1 has no replica left"), 503, "service_unavailable"),
    (DeploymentError("router unavailable"), 503, "service_unavailable"),
])
def test_errors_map_to_statuses(exc: Exception, status: int, code: str | None) -> None:
    err = api_error(exc)
    assert (err.status, err.code) == (status, code)
    assert str(exc) in err.body()["error"]["message"]
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    if status == 429:
        assert err.headers == {"Retry-After": "1"}
    assert api_error(err) is err


def test_malformed_json_is_named() -> None:
    err = validation_error([{"type": "json_invalid", "loc": ("body", 9), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting value"}}])
    assert err.status == 400 and err.code == "invalid_json" and "Expecting value" in err.message


def _completion(logprobs: list[TokenLogprob] | None = None) -> Completion:
    return Completion(text="ab", token_ids=[7, 8], finish_reason="stop",
                      usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, logprobs=logprobs)


def test_response_shapes() -> None:
    lps = [TokenLogprob(7, -0.1, {7: -0.1, 9: -2.5}), TokenLogprob(8, -0.2, {8: -0.2, 9: -1.9})]
    texts = {7: "a", 8: "b", 9: "é"}
    assert completion_logprobs(lps, texts) == {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"a": -0.1, "é": -2.5}, {"b": -0.2, "é": -1.9}], "text_offset": [0, 1]}
    chat = chat_logprobs(lps, texts)["content"]
    assert chat[0]["token"] == "a" and chat[0]["bytes"] == [97]
    assert chat[1]["top_logprobs"][1] == {"token": "é", "logprob": -1.9, "bytes": [0xC3, 0xA9]}
    text = choice("text_completion", 0, _completion(), {})
    assert text == {"index": 0, "text": "ab", "logprobs": None, "finish_reason": "stop"}
    msg = choice("chat.completion", 1, _completion(lps), texts)
    assert msg["message"] == {"role": "assistant", "content": "ab"} and msg["logprobs"]["content"][0]["token"] == "a"
    first = chunk_choice("chat.completion", 0, "a", None, {}, None, first=True)
    assert first["delta"] == {"role": "assistant", "content": "a"}
    assert chunk_choice("chat.completion", 0, "", None, {}, "stop")["delta"] == {}
    assert chunk_choice("text_completion", 0, "b", lps[1:], texts, None, offset=1)["logprobs"]["text_offset"] == [1]
    assert usage([3, 4], [2, 2, 5]) == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}


def test_reply_envelopes() -> None:
    r = Reply("chat.completion", "m")
    assert r.id.startswith("chatcmpl-") and r.created > 0
    full = r.envelope([], {"prompt_tokens": 1})
    assert full["object"] == "chat.completion" and full["usage"] == {"prompt_tokens": 1}
    chunk = r.envelope([], None, chunk=True)
    assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk and chunk["id"] == r.id
    assert Reply("text_completion", "m").envelope([], None, chunk=True)["object"] == "text_completion"
    assert isinstance(ApiError(418, "x"), Exception)


def test_internal_errors_never_carry_their_message() -> None:
    """A 500 names the error's type only: its text may hold a traceback, a path, an address or a pid."""
    err = api_error(RuntimeError("Traceback ... File \"/srv/x.py\" (pid=4242, ip=10.0.0.7)"))
    assert err.status == 500 and err.body()["error"]["message"].startswith("internal error (RuntimeError)")
    assert not any(s in err.message for s in ("Traceback", "/srv", "4242", "10.0.0.7"))
    bad = api_error(UnicodeEncodeError("utf-8", "a\ud800b", 1, 2, "surrogates not allowed"))
    assert bad.status == 400 and bad.code == "invalid_text"


def test_fields_over_their_bounds_are_refused_by_name() -> None:
    assert _errors(CompletionRequest, prompt="x", stop=["y" * 257])[0]["loc"] == ("stop",)
    assert CompletionRequest(prompt="x", stop=["y" * 256]).stop == ["y" * 256]
    assert "sequences in one request" in str(_errors(CompletionRequest, prompt=["a"] * 100, n=3))
    assert len(CompletionRequest(prompt=["a"] * 16, n=16).prompts()) == 16


def test_chat_messages_are_checked_by_role() -> None:
    assert "tool_call_id" in str(_errors(ChatCompletionRequest, messages=[{"role": "tool"}]))
    assert "tool_call_id" in str(_errors(ChatCompletionRequest, messages=[{"role": "tool", "content": "42"}]))
    assert "needs content" in str(_errors(ChatCompletionRequest, messages=[{"role": "user"}]))
    ok = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}, {"role": "assistant"},
                                         {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert [m.role for m in ok.messages] == ["user", "assistant", "tool"]
