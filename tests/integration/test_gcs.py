"""Ray's record of actors, read from the GCS: one at a time and many at once agree."""

from __future__ import annotations

import time

import pytest

from actors.gcs import actor_record, actor_records

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _wait_for(actor: object, state: str, restarts: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while actor_record(actor) != (state, restarts):
        assert time.monotonic() < deadline, f"actor never reached {state} after {restarts} restarts"
        time.sleep(0.05)


def test_many_actors_read_at_once_match_their_records_alive_restarted_dead() -> None:
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class Probe:
        def ping(self) -> int:
            return 1

    alive, restarted, dead = (Probe.remote() for _ in range(3))
    ray.get([a.ping.remote() for a in (alive, restarted, dead)])
    ray.kill(restarted, no_restart=False)
    ray.kill(dead)
    _wait_for(restarted, "ALIVE", 1)
    _wait_for(dead, "DEAD", 0)
    actors = [alive, restarted, dead, alive._actor_id.hex()]  # a handle or an id
    assert actor_records(actors) == [("ALIVE", 0), ("ALIVE", 1), ("DEAD", 0), ("ALIVE", 0)]
    assert actor_records(actors) == [actor_record(a) for a in actors]
    assert actor_records([]) == []
    assert actor_records(["00" * 16]) == [("UNKNOWN", 0)]  # no such actor: unreadable, never "dead"


def test_bench_watch_prints_both_ways_of_reading_per_deployment_size() -> None:
    from actors.bench.watch import bench_watch

    rows = list(bench_watch([1, 3], rounds=3))
    assert [r["replicas"] for r in rows] == [1, 3]
    for r in rows:
        for way in ("one_read_each", "one_read"):
            assert r[way]["wall_ms"] > 0 and r[way]["caller_cpu_ms"] >= 0, r
