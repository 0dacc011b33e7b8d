"""Decode rings (the default data path): stages loop on their own, the router admits and receives tokens.

Greedy and seeded tokens equal the single-process model with sequences joining and leaving, with
speculation, and after a stage dies mid-generation; the sampled distribution with drafts is the
model's softmax (chi-square).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from actors import Pipeline
from models import ConfigError, Transformer, generate_local, load_model, propose_drafts
from tests.checkpoints import make_tiny_llama
from tests.support import tokens, wait_for
from tests.unit.test_speculative import check_first_two_tokens

pytestmark = pytest.mark.usefixtures("ray_cluster")

PHRASE = [5, 17, 42, 99, 3]
PROMPTS = [[5, 17, 42, 99, 3], [11, 12], list(range(30, 51)), [200], [9] * 13, PHRASE * 4]
MAX_NEW = [24, 5, 17, 1, 24, 12]  # different lengths: sequences leave while others run


@pytest.fixture(scope="module")
def local(tiny_ckpt: Path) -> Transformer:
    return load_model(tiny_ckpt, dtype="float64")


@pytest.fixture(scope="module")
def loopy_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small weights: greedy output falls into cycles, so prompt-lookup drafts hit."""
    return make_tiny_llama(tmp_path_factory.mktemp("loopy") / "llama", n_layers=2, init=0.02)


def _rings(pipe: Pipeline) -> tuple[list[dict], list[dict]]:
    stats = pipe.stats()["router"]
    return stats["rings"], stats["rings_broken"]


def _staggered(pipe: Pipeline, gap_s: float = 0.03, **kw: object) -> list:
    """Submits PROMPTS one by one, `gap_s` apart (they join running ones); their completions."""
    ids = []
    for p, n in zip(PROMPTS, MAX_NEW):
        ids.append(pipe.submit(p, max_new_tokens=n, ignore_eos=True, **kw))
        time.sleep(gap_s)
    return [pipe.result(i, timeout=120) for i in ids]


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_sequences_join_and_leave_a_ring_with_the_tokens_of_one_process(tiny_ckpt: Path, local: Transformer,
                                                                       stages: int) -> None:
    want = [generate_local(local, p, n, ignore_eos=True)[0].token_ids for p, n in zip(PROMPTS, MAX_NEW)]
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=stages, dtype="float64", name=f"ring-{stages}")
    try:
        assert [o.token_ids for o in _staggered(pipe)] == want
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)) == \
            tokens(generate_local(local, PROMPTS, 24, ignore_eos=True))  # all at once too
        rings, broken = _rings(pipe)
        assert rings and sum(r["passes"] for r in rings) > 0 and not broken  # the ring carried them
        reports = pipe.stats()["router"]["ring_reports"]  # the tail's reports took its socket, none refused
        assert reports["by_socket"] > 0 and reports["refused"] == 0
        phases = [s["phases_ms"] for s in sorted(pipe.stats()["stages"], key=lambda s: s["stage"])]
        assert all(p["forward"] > 0 and p["inputs"] > 0 and p["after"] > 0 for p in phases)  # where a step goes
        assert "sample" in phases[-1] and all("send" in p for p in phases[:-1])
        assert stages == 1 or all(p["receive"] > 0 for p in phases)  # one stage has no channel to read
        assert pipe.stats()["router"]["lanes"] == [0] * len(pipe.stats()["router"]["lanes"])
        wait_for(lambda: all(s["sequences"] == 0 for s in pipe.stats()["stages"]), what="caches freed")
    finally:
        pipe.shutdown()


def test_speculation_through_the_ring_is_lossless_and_accepts_drafts(loopy_ckpt: Path) -> None:
    model = load_model(loopy_ckpt, dtype="float64")
    pipe = Pipeline.deploy(str(loopy_ckpt), num_stages=2, dtype="float64", name="ring-spec")
    try:
        prompts = [PHRASE * 4, [5, 17, 42, 99, 3, 250, 7], [11, 12]]
        plain = generate_local(model, prompts, 40, ignore_eos=True)
        spec = pipe.generate(prompts, max_new_tokens=40, ignore_eos=True, speculative=4)
        assert tokens(spec) == tokens(plain)
        assert [o.finish_reason for o in spec] == [o.finish_reason for o in plain]
        assert spec[0].speculation["accepted"] > 0
        s = pipe.stats()["router"]["speculation"]
        assert s["accepted"] > 0 and s["tokens_per_pass"] > 1.0 and s["drafted"] >= s["accepted"]
        # seeded sampling: each position's own draw, so drafts change nothing
        for temperature, seed in ((0.005, 3), (1.0, 11)):
            kw = dict(temperature=temperature, seed=seed, ignore_eos=True)
            want = tokens(generate_local(model, prompts, 24, **kw))
            assert tokens(pipe.generate(prompts, max_new_tokens=24, speculative=4, **kw)) == want
            assert tokens(pipe.generate(prompts, max_new_tokens=24, **kw)) == want
        # stop strings and max_new_tokens inside an accepted run: the same cut as plain decoding
        cut = pipe.generate([PHRASE * 4], max_new_tokens=7, ignore_eos=True, speculative=8)
        assert cut[0].token_ids == plain[0].token_ids[:7] and cut[0].finish_reason == "length"
        # ... and the drafts counted accepted are those of the tokens kept, as in one process
        assert cut[0].speculation == generate_local(model, [PHRASE * 4], 7, ignore_eos=True,
                                                    speculative=8)[0].speculation
    finally:
        pipe.shutdown()


def test_a_draft_model_drafts_for_the_ring_and_the_tokens_stay_identical(tiny_ckpt: Path, local: Transformer,
                                                                          tmp_path: Path) -> None:
    """The model itself as its own drafter: every greedy draft is right, so the drafter's cache follows the
    sequences as they join, draft and leave (a drafter whose drafts are rejected: tests/unit/test_drafter.py)."""
    plain = generate_local(local, PROMPTS, 24, ignore_eos=True)
    with pytest.raises(ConfigError, match="draft_model .*vocabulary has 300 tokens but the model's has 256"):
        Pipeline.deploy(str(tiny_ckpt), num_stages=2, name="ring-draft-bad",
                        draft_model=str(make_tiny_llama(tmp_path / "wide", n_layers=1, vocab=300)))
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="ring-draft", draft_model=str(tiny_ckpt))
    try:
        outs = _staggered(pipe, speculative=4)  # sequences join and leave while others draft
        assert tokens(outs) == [t[:n] for t, n in zip(tokens(plain), MAX_NEW)]
        s = pipe.stats()
        assert next(st for st in s["stages"] if st["stage"] == 0)["draft_model_passes"] > 0
        spec = s["router"]["speculation"]  # all drafts confirmed: each pass brings its drafts and one more token
        assert spec["accepted"] == spec["drafted"] > 0 and spec["tokens_per_pass"] > 2.5
        kw = dict(temperature=1.0, seed=7, ignore_eos=True)  # seeded sampling: drafts change nothing
        assert tokens(pipe.generate(PROMPTS[:3], max_new_tokens=16, speculative=3, **kw)) == \
            tokens(generate_local(local, PROMPTS[:3], 16, **kw))
    finally:
        pipe.shutdown()


def test_sampled_tokens_with_drafts_follow_the_model_softmax(tiny_ckpt: Path, local: Transformer) -> None:
    """2000 fixed seeds through a 2-stage ring: the first token and, after a confirmed first draft, the second
    are distributed as softmax(logits)."""
    pytest.importorskip("scipy")
    from models import Batch

    V = local.cfg.vocab_size

    def softmax_after(seqs: list[list[int]]) -> torch.Tensor:  # (len(seqs), V), equal lengths
        n = len(seqs[0])
        batch = Batch.build([str(i) for i in range(len(seqs))], [0] * len(seqs), [n] * len(seqs))
        return torch.softmax(local(torch.tensor(sum(seqs, [])), batch, local.new_cache()).double(), -1)

    candidates = [PHRASE + [c, 60, 61] + PHRASE for c in range(V)]
    c = int(softmax_after(candidates)[torch.arange(V), torch.arange(V)].argmax())
    prompt = candidates[c]
    assert propose_drafts(prompt, 4)[0] == c
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="ring-chi2")
    try:  # fixed seeds, one per request (a batch shares its seed): the same draws on every run
        outs = []
        for first in range(0, 2000, 250):  # the router keeps a bounded number of finished results
            rids = [pipe.submit(prompt, max_new_tokens=2, temperature=1.0, ignore_eos=True, speculative=4, seed=seed)
                    for seed in range(first, first + 250)]
            outs += [pipe.result(rid) for rid in rids]
    finally:
        pipe.shutdown()
    check_first_two_tokens(outs, prompt, c, softmax_after, min_second=50)


def test_the_router_counts_every_pass_and_every_resend_of_a_ring(tiny_ckpt: Path, local: Transformer) -> None:
    """The tail reports in batches (one call in flight, ~15 ms apart): each pass's trace still reaches the
    router, so its steps are the passes and its retransmits the resends the stages asked for, mid-generation
    and on a cancel's release-only message alike."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="ring-count")

    def passes() -> int:
        return sum(r["passes"] for r in _rings(pipe)[0])

    def counts() -> tuple[int, int]:
        stats = pipe.stats()
        return stats["router"]["retransmits"], sum(s["retransmits_asked"] for s in stats["stages"])

    try:
        steps = pipe.stats()["router"]["steps"]
        assert tokens(pipe.generate([PROMPTS[0]], max_new_tokens=40, ignore_eos=True)) == \
            tokens(generate_local(local, [PROMPTS[0]], 40, ignore_eos=True))
        assert pipe.stats()["router"]["steps"] - steps == 40  # a pass a token, each one reported

        pipe.set_hop_delay(1, 0.005)  # passes ~10 ms apart: reports carry one or two
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(r=pipe.generate([PROMPTS[2]], max_new_tokens=60,
                                                                       ignore_eos=True)))
        t.start()
        wait_for(lambda: passes() >= 50, what="the generation under way")
        pipe.inject_fault(0, "corrupt", 1)  # stage 0 -> stage 1, a pass mid-generation
        t.join(timeout=60)
        assert tokens(out["r"]) == tokens(generate_local(local, [PROMPTS[2]], 60, ignore_eos=True))
        wait_for(lambda: counts() == (1, 1), what="the mid-generation resend counted")

        pipe.set_hop_delay(1, 0.05)
        rid = pipe.submit(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
        wait_for(lambda: passes() >= 103, what="the next generation under way")
        pipe.inject_fault(0, "corrupt", 1)  # the next message stage 0 sends: a pass, or the release-only one
        pipe.cancel(rid)
        wait_for(lambda: counts() == (2, 2), what="the resend around a cancel counted")
    finally:
        pipe.shutdown()


def test_a_member_waiting_for_a_dead_peer_still_answers_and_its_stop_ends_the_wait(tiny_ckpt: Path) -> None:
    """`ring_start` waits (up to 30 s) for its previous member to connect; when that member died during the
    ring's setup, the stage still serves the router's calls meanwhile and the ring's stop ends the wait."""
    import socket

    from actors.ring_stage import RingSpec
    from actors.wire import LinkCodec

    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="ring-setup-wait")
    nxt = socket.create_server(("127.0.0.1", 0))  # the next member: takes the connection, says nothing
    try:
        s1 = ray.get_actor("meshpipe/ring-setup-wait/stage-1/replica-0", namespace="meshpipe")
        spec = RingSpec("lone-ring", 1, 2, [LinkCodec(), LinkCodec()], pipe.router, [None, s1],
                        ["a-member-that-died", "meshpipe/ring-setup-wait/stage-1/replica-0"], secret=b"k" * 32)
        assert ray.get(s1.ring_open.remote(spec, 1)) is not None
        started = s1.ring_start.remote("lone-ring", nxt.getsockname(), 30.0)
        time.sleep(1.0)
        t0 = time.monotonic()
        assert ray.get(s1.stats.remote(), timeout=5)["stage"] == 1  # answered while ring_start waits
        assert ray.get(s1.ring_stop.remote("lone-ring"), timeout=5) == 1
        with pytest.raises(ray.exceptions.RayTaskError, match="closed while waiting|stopped while it started"):
            ray.get(started, timeout=10)
        assert time.monotonic() - t0 < 5  # not the 30 s accept timeout
        assert tokens(pipe.generate(PROMPTS[:2], max_new_tokens=4, ignore_eos=True))  # still serving
    finally:
        nxt.close()
        pipe.shutdown()


@pytest.mark.parametrize("graphs", [False, True])
def test_a_stage_killed_mid_ring_breaks_it_and_the_tokens_stay_identical(tiny_ckpt: Path, local: Transformer,
                                                                         graphs: bool) -> None:
    """With speculation; or plain decode steps padded as for CUDA graphs (a restarted stage starts without
    buckets, on a rebuilt cache)."""
    want = tokens(generate_local(local, PROMPTS, 24, ignore_eos=True))
    name = f"ring-kill-{graphs}"
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=3, dtype="float64", name=name, max_restarts=2,
                           cuda_graphs=graphs)
    try:
        pipe.set_hop_delay(0, 0.04)  # 24 passes take ~1 s: the kill lands mid-generation
        victim = ray.get_actor(f"meshpipe/{name}/stage-1/replica-0", namespace="meshpipe")
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(
            r=pipe.generate(PROMPTS, max_new_tokens=24, ignore_eos=True, **({} if graphs else {"speculative": 2}))))
        t.start()
        wait_for(lambda: _rings(pipe)[0] and _rings(pipe)[0][0]["passes"] >= 3, what="the ring running")
        ray.kill(victim, no_restart=False)
        t.join(timeout=120)
        assert tokens(out["r"]) == want
        broken = _rings(pipe)[1]
        assert broken and broken[0]["why"]  # the watcher or a member's channel saw the death
        assert {b["cause"] for b in broken} <= {"replica died", "member failed"}, broken
        # the watcher saw it dead or restarting: the break called the others only
        assert all(b["skipped"] == 1 for b in broken if b["why"] == "a replica died"), broken
        router = pipe.stats()["router"]
        assert router["recoveries"] and router["recoveries_total"] == len(router["recoveries"])  # the Ray-call
        # path rebuilt the restarted stage; under the lists' caps the totals count what they list
        assert router["rings_broken_total"] == len(router["rings_broken"])
        # the route gets a new ring once its replica is back
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)) == want
        rings, _ = _rings(pipe)
        assert any(r["state"] == "ready" and r["passes"] > 0 for r in rings)
        if graphs:  # the restarted stage too
            assert all(s["cuda_graphs"]["uncaptured"] > 0 for s in pipe.stats()["stages"])
    finally:
        pipe.shutdown()


def test_the_calls_data_path_gives_the_same_tokens(tiny_ckpt: Path, local: Transformer) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="ring-off", data_path="calls")
    try:
        assert [o.token_ids for o in _staggered(pipe)] == \
            [generate_local(local, p, n, ignore_eos=True)[0].token_ids for p, n in zip(PROMPTS, MAX_NEW)]
        assert _rings(pipe) == ([], [])
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("lanes", [1, 2])
def test_stages_with_padded_decode_graphs_give_the_same_tokens(tiny_ckpt: Path, local: Transformer,
                                                               lanes: int) -> None:
    """`cuda_graphs=True` (the default on CUDA devices) on CPU stages: every stage's decode steps run padded to
    their (batch, blocks) bucket on static buffers (uncaptured here), with sequences joining and leaving, one
    lane or two (their steps take turns on the buffers): the single-process tokens."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name=f"graphs-{lanes}", cuda_graphs=True,
                           micro_batches=lanes)
    try:
        assert [o.token_ids for o in _staggered(pipe)] == \
            [generate_local(local, p, n, ignore_eos=True)[0].token_ids for p, n in zip(PROMPTS, MAX_NEW)]
        stages = pipe.stats()["stages"]
        assert len(stages) == 2
        for s in stages:
            g = s["cuda_graphs"]
            assert g["uncaptured"] > 0 and g["graphs"] == 0 and g["failed"] is None
    finally:
        pipe.shutdown()


def test_stages_with_fused_projections_give_the_same_tokens(tiny_ckpt: Path, local: Transformer) -> None:
    """`fuse_linears=True` (the default on GPUs) on CPU stages: fused q|k|v and gate|up matmuls in every
    stage, the same tokens as the unfused single-process model; False keeps every stage unfused."""
    from actors.naming import NAMESPACE, stage_name

    def fused(stage: object) -> list[bool]:
        return [f.weight is not None for m in stage.model.modules() for f in vars(m).values()
                if type(f).__name__ == "FusedLinears"]

    for on in (True, False):
        pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name=f"fused-{on}", fuse_linears=on)
        try:
            assert [o.token_ids for o in _staggered(pipe)] == \
                [generate_local(local, p, n, ignore_eos=True)[0].token_ids for p, n in zip(PROMPTS, MAX_NEW)]
            for k in range(2):
                flags = ray.get(ray.get_actor(stage_name(f"fused-{on}", k, 0), namespace=NAMESPACE)
                                .__ray_call__.remote(fused))
                assert flags and all(flag == on for flag in flags)
        finally:
            pipe.shutdown()
