"""The dashboard without Ray: events from two polls (pure), the page's files (an allowlist), the login
form and session cookie in front of the status JSON, and the status in the OpenAPI document."""

from __future__ import annotations

from fastapi.testclient import TestClient

from actors.dashboard.status import Observed, changes, observe, ring_cause
from actors.dashboard.watch import build_app
from actors.http_guard import SESSION_COOKIE


def test_changes_between_two_polls_become_events() -> None:
    prev = Observed(restarts={"a": 0, "b": 2}, alive={"a": True, "b": True}, recoveries=1, rings_broken=0)
    cur = Observed(restarts={"a": 1, "b": 2}, alive={"a": True, "b": False}, recoveries=3, last_recovery_s=0.42,
                   rings_broken=1, last_ring_why="a replica died", decisions=1,
                   last_decision={"stage": 1, "delta": 1, "reason": "queue 12 > 8"})
    events = changes(prev, cur, 100.0)
    kinds = [e.kind for e in events]
    assert kinds == ["restart", "down", "recovery", "reroute", "autoscale"], kinds
    assert "a restarted (restart 1)" in events[0].text and "0.42 s" in events[2].text
    assert "+1 replica(s) of stage 1 (queue 12 > 8)" in events[4].text
    assert changes(None, cur, 1.0) == [] and changes(cur, cur, 2.0) == []
    back = changes(cur, Observed(restarts=cur.restarts, alive={"a": True, "b": True}, recoveries=3,
                                 rings_broken=1, decisions=1), 3.0)
    assert [e.kind for e in back] == ["back"]


def test_events_keep_coming_once_the_routers_lists_are_full() -> None:
    """The router lists the last breaks, recoveries and decisions; the events count their totals."""
    def poll(n: int) -> Observed:
        stats = {"rings_broken": [{"why": f"break {i}"} for i in range(n - 64, n)], "rings_broken_total": n,
                 "recoveries_s": [0.1] * 256, "recoveries_total": n + 300}
        return observe(stats, [], [{"n": i, "stage": 1, "delta": 1} for i in range(n - 256, n + 1)])
    events = changes(poll(1000), poll(1001), 5.0)
    assert [e.kind for e in events] == ["recovery", "reroute", "autoscale"], events
    assert "break 1000" in events[1].text


def test_a_ring_breaks_event_names_the_error_type_and_no_address() -> None:
    why = ("meshpipe/d/stage-1/replica-0: ChannelError: tcp channel a<->b: recv failed after 0.20 s "
           "(timeout 0 s): [Errno 104] Connection reset by peer 10.1.2.3:40123")
    assert ring_cause(why) == "meshpipe/d/stage-1/replica-0: ChannelError"
    assert ring_cause("admission failed: ActorDiedError: The actor died. ip: 10.1.2.3") == \
        "admission failed: ActorDiedError"
    assert ring_cause("a replica died") == "a replica died" and ring_cause("x: StopIteration 10.1.2.3") == "x"
    event = changes(Observed(), observe({"rings_broken": [{"why": why}], "rings_broken_total": 1}, [], []), 1.0)
    assert len(event) == 1 and "ChannelError" in event[0].text and "10.1.2.3" not in event[0].text


def test_the_page_and_its_files_are_open_and_nothing_else_is_read_from_disk() -> None:
    client = TestClient(build_app(["d"], api_keys=("s3cret",)))
    page = client.get("/dashboard")
    assert page.status_code == 200 and "route-graph" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/dashboard/static/uPlot.iife.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("..%2fstatus.py", "index.html", "%2e%2e/%2e%2e/pyproject.toml", "routes.py"):
        assert client.get(f"/dashboard/static/{bad}").status_code == 404, bad


def test_the_status_needs_a_key_or_the_login_cookie() -> None:
    client = TestClient(build_app(["d"], api_keys=("s3cret",)), follow_redirects=False)
    assert client.get("/v1/pipeline/status").status_code == 401
    wrong = client.post("/dashboard/login", content="key=nope", headers={"content-type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 303 and wrong.headers["location"] == "/dashboard?denied=1"
    assert SESSION_COOKIE not in wrong.cookies
    stuffed = client.post("/dashboard/login", content="&".join(f"f{i}=1" for i in range(10)),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert stuffed.status_code == 303 and stuffed.headers["location"] == "/dashboard?denied=1"
    right = client.post("/dashboard/login", content="key=s3cret",
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert right.status_code == 303 and right.headers["location"] == "/dashboard"
    cookie = right.cookies[SESSION_COOKIE]
    assert "s3cret" not in cookie and "httponly" in right.headers["set-cookie"].lower()
    # past the gate: no Ray here, so the deployment is unreachable (a JSON 503, not a 401)
    assert client.get("/v1/pipeline/status", cookies={SESSION_COOKIE: cookie}).status_code == 503
    assert client.get("/v1/pipeline/status", headers={"authorization": "Bearer s3cret"}).status_code == 503
    forged = cookie.split(".")[0] + "." + "0" * 64
    assert client.get("/v1/pipeline/status", cookies={SESSION_COOKIE: forged}).status_code == 401


def test_the_status_endpoint_is_in_the_servers_openapi_document() -> None:
    from actors.serve import app

    doc = app.openapi()
    op = doc["paths"]["/v1/pipeline/status"]["get"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/PipelineStatus") and "ReplicaView" in doc["components"]["schemas"]
    assert "/dashboard" not in doc["paths"]
