"""The HTTP gate (body limit, API keys) on a small FastAPI app, through Starlette's test client. No Ray."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from actors.http_guard import GuardConfig, HttpGuard, hash_key, key_matches


@pytest.fixture()
def client() -> TestClient:
    app = FastAPI()
    app.state.guard = GuardConfig(max_body_bytes=1000, key_digests=frozenset({hash_key("k1"), hash_key("k2")}))
    app.add_middleware(HttpGuard, config=lambda: app.state.guard)

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return TestClient(app)


def test_keys_are_checked_as_digests_in_constant_time() -> None:
    digests = [hash_key("secret")]
    assert key_matches("Bearer secret", digests) and key_matches("bearer  secret ", digests)
    assert not key_matches("Bearer secre", digests) and not key_matches("secret", digests)
    assert not key_matches(None, digests) and not key_matches("Basic secret", digests)
    assert "secret" not in hash_key("secret")


def test_a_non_ascii_key_sent_as_utf8_matches() -> None:
    """ASGI servers hand headers over as latin-1; a client sends the key's UTF-8 bytes."""
    digests = [hash_key("clé-ключ")]
    assert key_matches("Bearer clé-ключ".encode("utf-8").decode("latin-1"), digests)
    assert key_matches("Bearer clé-ключ", digests)
    assert not key_matches("Bearer cle-ключ".encode("utf-8").decode("latin-1"), digests)


def test_requests_need_a_key_except_health(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
        r = client.post("/v1/echo", content=b"{}", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key" and "nope" not in r.text
    assert client.post("/v1/echo", content=b"{}", headers={"Authorization": "Bearer k2"}).json() == {"n": 2}


def test_bodies_over_the_limit_get_413_declared_or_streamed(client: TestClient) -> None:
    auth = {"Authorization": "Bearer k1"}
    assert client.post("/v1/echo", content=b"x" * 1000, headers=auth).json() == {"n": 1000}
    r = client.post("/v1/echo", content=b"x" * 1001, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # noqa: ANN202 - no Content-Length: counted as it streams in
        for _ in range(5):
            yield b"x" * 400
    r = client.post("/v1/echo", content=chunks(), headers=auth)
    assert r.status_code == 413
