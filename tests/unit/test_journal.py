"""The request journal's records: JSON (never pickles), sealed with the deployment key, checkpoints of
new tokens only, finished records bounded. No Ray (a dict stands in for the GCS key-value store)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from actors.journal import PLAIN, RequestJournal, open_record, seal_record
from models import Completion, TokenLogprob
from tests.unit.test_router_parts import DictKV, make_request


def test_checkpoints_write_only_the_new_tokens_and_load_joins_them() -> None:
    kv = DictKV()
    journal = RequestJournal("d", kv)
    a = make_request("a", [1, 2])
    journal.admit(a)
    for t in (7, 8):
        a.seq.add(t, None, None)
    journal.checkpoint([a])
    a.seq.add(9, None, None)
    journal.checkpoint([a])
    sizes = sorted(len(v) for k, v in kv.data.items() if "/t/" in k)
    assert len(sizes) == 2 and json.loads(kv.data["meshpipe/d/requests/a/t/000000002"][len(PLAIN):])["generated"] == [9]
    (rec,) = journal.load()
    assert rec.generated == [7, 8, 9] and rec.prompt == [1, 2] and rec.params.seed == 1


def test_records_are_json_and_sealed_records_refuse_plaintext_forgery_and_moves() -> None:
    key = os.urandom(32)
    kv = DictKV()
    journal = RequestJournal("d", kv, key=key)
    req = make_request("a", [5, 6])
    journal.admit(req)
    blob = kv.data["meshpipe/d/requests/a"]
    assert b"prompt" not in blob and b"\x80" not in blob[:1]  # sealed, and not a pickle
    journal.finish(req, Completion("hi", [3], "stop", {"prompt_tokens": 2, "completion_tokens": 1,
                                                       "total_tokens": 3}, [TokenLogprob(3, -0.5, {3: -0.5, 4: -1.0})]))
    (rec,) = journal.load()
    assert rec.completion.logprobs[0].top == {3: -0.5, 4: -1.0}
    kv.data["meshpipe/d/requests/b"] = kv.data["meshpipe/d/requests/a"]  # moved to another request's key
    kv.data["meshpipe/d/requests/c"] = seal_record("meshpipe/d/requests/c", {"rid": "c"}, None)  # plaintext
    assert [r.rid for r in journal.load()] == ["a"]
    with pytest.raises(ValueError, match="plaintext"):
        open_record("meshpipe/d/requests/c", kv.data["meshpipe/d/requests/c"], key)
    with pytest.raises(ValueError, match="not a meshpipe journal record"):
        open_record("x", b"\x80\x04pickle", None)
    assert RequestJournal("d", kv).load() == []  # without the key nothing sealed opens (c is no full record)


def test_the_stages_as_deployed_are_kept_sealed_apart_from_the_requests_and_cleared_with_them() -> None:
    from actors.errors import DeploymentError

    key, kv = os.urandom(32), DictKV()
    journal = RequestJournal("d", kv, key=key)
    with pytest.raises(DeploymentError, match="no record"):  # a router restarted before its first start kept them
        journal.deployed_replicas()
    infos = [[{"stage": 0, "replica": 0, "kv_cache_tokens": 512}], [{"stage": 1, "replica": 0}, {"stage": 1, "replica": 1}]]
    journal.keep_replicas(infos)
    assert RequestJournal("d", kv, key=key).deployed_replicas() == infos  # what a restarted router reads
    assert journal.load() == [] and b"kv_cache_tokens" not in kv.data["meshpipe/d/replicas"]  # no request; sealed
    with pytest.raises(DeploymentError, match="unreadable"):
        RequestJournal("d", kv, key=os.urandom(32)).deployed_replicas()
    journal.clear()
    assert kv.data == {}


def test_finished_records_are_bounded() -> None:
    kv = DictKV()
    journal = RequestJournal("d", kv, finished_kept=3)
    for i in range(6):
        req = make_request(f"r{i}", [1])
        journal.admit(req)
        journal.finish(req, Completion("", [], "stop", {}, None))
    assert sorted(k.rsplit("/", 1)[1] for k in kv.data) == ["r3", "r4", "r5"]


def test_subkeys_are_per_purpose_and_deterministic() -> None:
    from actors.wire import subkey

    root = os.urandom(32)
    a, b = subkey(root, "wire:d1"), subkey(root, "wire:d2")
    assert a == subkey(root, "wire:d1") and a != b and a != root and len(a) == 32
    assert subkey(None, "wire:d1") is None
    sealed = seal_record("k", {"rid": "x"}, subkey(root, "journal:d1"))
    with pytest.raises(ValueError, match="authentication"):
        open_record("k", sealed, subkey(root, "journal:d2"))


def test_an_unknown_restart_count_keeps_the_journal_and_ids_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: when the GCS cannot say how often the router restarted, it acts as restarted (keeps the
    journal, resets nothing); request ids of two router processes never collide, whatever they know."""
    import ray

    from actors import gcs
    from actors.journal import incarnation_of
    from actors.request import RequestIds

    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"get_actor_id": lambda self: "ab"})())
    monkeypatch.setattr(gcs, "actor_record", lambda actor: ("UNKNOWN", 0))
    assert gcs.own_restarts() is None and incarnation_of(gcs.own_restarts()) == 1
    monkeypatch.setattr(gcs, "actor_record", lambda actor: ("ALIVE", 0))
    assert incarnation_of(gcs.own_restarts()) == 0  # a first start: the only case that clears the journal
    monkeypatch.setattr(gcs, "actor_record", lambda actor: ("ALIVE", 3))
    assert incarnation_of(gcs.own_restarts()) == 3
    first, second = RequestIds("dep"), RequestIds("dep")
    a, b = {first() for _ in range(1000)}, {second() for _ in range(1000)}
    assert len(a) == len(b) == 1000 and not a & b and all(i.startswith("dep-") for i in a | b)


class AsyncKV(DictKV):
    """The GCS store's async side: each write takes a moment; counts how many are in flight at once."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.in_flight = self.most_in_flight = 0
        self.log: list[tuple[str, str]] = []
        self.fail = fail  # writes of keys containing this raise

    async def _op(self, name: str, key: str, apply: Any) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if self.fail and self.fail in key:
            raise ConnectionError("GCS unreachable")
        self.log.append((name, key))
        apply()

    async def put_async(self, key: str, value: bytes) -> None:
        await self._op("put", key, lambda: self.put(key, value))

    async def delete_async(self, key: str, by_prefix: bool = False) -> None:
        await self._op("delete", key, lambda: self.delete(key, by_prefix))


def test_writes_leave_the_event_loop_go_out_together_and_keep_each_requests_order() -> None:
    """Under a running loop nothing blocks on the store: 50 admissions are in flight at once, `flush`
    waits for them, and a request's finish lands after its checkpoint and before its chunks' deletion."""
    async def main() -> AsyncKV:
        kv = AsyncKV()
        journal = RequestJournal("d", kv, finished_kept=100)
        reqs = [make_request(f"r{i}", [1, 2]) for i in range(50)]
        for r in reqs:
            journal.admit(r)
        assert kv.data == {}  # queued, not written: admit returned at once
        await journal.flush([r.rid for r in reqs])
        assert len(kv.data) == 50 and kv.most_in_flight == 50
        a = reqs[0]
        a.seq.add(7, None, None)
        journal.checkpoint([a])
        journal.finish(a, Completion("", [7], "length", {}, None))
        await journal.flush()
        mine = [op for op in kv.log if op[1].startswith("meshpipe/d/requests/r0/") or op[1] == "meshpipe/d/requests/r0"]
        assert [op[0] for op in mine] == ["put", "put", "put", "delete"]  # admit, chunk, finished record, chunks
        assert "meshpipe/d/requests/r0/t/000000000" not in kv.data
        (rec,) = [r for r in RequestJournal("d", kv).load() if r.rid == "r0"]
        assert rec.completion.token_ids == [7]
        return kv

    kv = asyncio.run(main())
    assert len(kv.data) == 50


def test_a_failed_admission_write_fails_the_flush_and_other_failures_are_only_logged() -> None:
    async def main() -> None:
        kv = AsyncKV(fail="bad")
        journal = RequestJournal("d", kv)
        journal.admit(make_request("ok", [1]))
        journal.admit(make_request("bad", [1]))
        await journal.flush(["ok"])  # a concurrent caller's own requests landed: no error of others for it
        with pytest.raises(ConnectionError, match="unreachable"):
            await journal.flush(["bad"])
        await journal.flush(["bad"])  # raised once
        assert list(kv.data) == ["meshpipe/d/requests/ok"]
        journal.finish(make_request("bad2", [1]), Completion("", [], "stop", {}, None))
        await journal.flush()  # a finished record that could not be written is logged, not raised
        assert journal.writer.failures == 2

    asyncio.run(main())


def test_a_request_dropped_after_its_record_was_evicted_costs_no_more_writes() -> None:
    kv = DictKV()
    journal = RequestJournal("d", kv, finished_kept=1)
    for rid in ("a", "b"):
        req = make_request(rid, [1])
        journal.admit(req)
        journal.finish(req, Completion("", [], "stop", {}, None))
    assert list(kv.data) == ["meshpipe/d/requests/b"] and journal.evicted == {"a"}
    kv.delete = None  # any delete now fails the test
    journal.drop("a")
    assert journal.evicted == set()


def test_a_flush_waits_for_the_writes_queued_before_it_not_for_a_steady_stream_after() -> None:
    async def main() -> None:
        kv = AsyncKV()  # 10 ms a write
        journal = RequestJournal("d", kv)
        stop = asyncio.Event()

        async def others() -> None:  # other requests' admissions, one every 3 ms
            i = 0
            while not stop.is_set():
                journal.admit(make_request(f"o{i}", [1]))
                i += 1
                await asyncio.sleep(0.003)

        load = asyncio.ensure_future(others())
        await asyncio.sleep(0.03)
        journal.admit(make_request("mine", [1, 2]))
        await asyncio.wait_for(journal.flush(["mine"]), 1.0)  # it waited for the whole stream before
        assert "meshpipe/d/requests/mine" in kv.data and not load.done()
        stop.set()
        await load
        await journal.flush()
        assert len(kv.data) == len(journal.load())

    asyncio.run(main())


def test_close_lets_the_writes_on_their_way_land_before_it_clears() -> None:
    async def main() -> AsyncKV:
        kv = AsyncKV()
        journal = RequestJournal("d", kv)
        a, b = make_request("a", [1]), make_request("b", [2])
        journal.admit(a)
        await journal.flush()
        journal.finish(a, Completion("secret", [5], "length", {}, None))
        await asyncio.sleep(0.001)  # the finished record is on its way to the store
        journal.admit(b)  # queued behind it
        await journal.close()
        await asyncio.sleep(0.05)
        return kv

    assert asyncio.run(main()).data == {}  # nothing outlives the deployment (the finished record did)


def test_resumed_requests_queue_in_the_order_they_were_admitted() -> None:
    from actors.request import RequestIds, admission_order

    ids = RequestIds("my-deploy")
    rids = [ids() for _ in range(12)]
    assert sorted(reversed(rids), key=admission_order) == rids  # as strings, "-10" came before "-9"
    assert admission_order("odd") == ("odd", -1)
