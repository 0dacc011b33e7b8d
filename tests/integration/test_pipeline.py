"""The pipeline on real Ray with tiny random checkpoints: identical tokens, bad input, control."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from actors import (
    BackPressureError,
    DeployProgress,
    DeploymentError,
    InsufficientResourcesError,
    Pipeline,
    RequestTimeoutError,
)
from actors.pipeline import choose_stage_resources
from models import ConfigError, InvalidRequestError, UnknownModelError, load_model
from tests.checkpoints import make_tiny_llama
from tests.support import min_margin, tokens, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 71)), [200], [9] * 13]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):  # noqa: ANN201
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="tiny",
                        max_active_sequences=4, max_queued=2, micro_batches=2)
    yield p
    p.shutdown()


def test_deploy_reports_weights_read_and_stages_up(tiny_ckpt: Path) -> None:
    events: list[DeployProgress] = []
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], name="progress",
                        progress=events.append)
    p.shutdown()
    for phase, total in (("weights", 2), ("stages", 3)):  # 2 stages' tensors; 3 replicas
        seen = [e for e in events if e.phase == phase]
        assert seen[-1] == DeployProgress(phase, total, total)
        assert [e.done for e in seen] == sorted({e.done for e in seen})  # rising, each once
        assert all(e.total == total for e in seen)


@pytest.mark.parametrize("layout", [{"num_stages": 1}, {"num_stages": 2}, {"num_stages": 4},
                                    {"layers_per_stage": 1}])
def test_greedy_tokens_equal_the_single_process_model(tiny_tied_ckpt: Path, layout: dict) -> None:
    ref = load_model(tiny_tied_ckpt, dtype="float64").generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    p = Pipeline.deploy(str(tiny_tied_ckpt), dtype="float64", name="layout", **layout)
    try:
        n = len(p.describe()["stages"])
        assert n == layout.get("num_stages", 6)
        outs = p.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
        assert tokens(outs) == tokens(ref)
        assert [o.usage for o in outs] == [o.usage for o in ref]
    finally:
        p.shutdown()


def test_a_qwen2_pipeline_equals_the_single_process_model(tmp_path: Path) -> None:
    """q/k/v biases on every stage, through the fused projections (as on a GPU)."""
    folder = make_tiny_llama(tmp_path / "qwen2", n_layers=4, qwen2=True, seed=3)
    ref = load_model(folder, dtype="float64").generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    p = Pipeline.deploy(str(folder), num_stages=2, dtype="float64", name="qwen2", fuse_linears=True)
    try:
        assert tokens(p.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)) == tokens(ref)
    finally:
        p.shutdown()


@pytest.mark.parametrize("data_path", ["ring", "calls"])
def test_a_sequence_with_nan_logits_fails_alone(tmp_path: Path, data_path: str) -> None:
    """Its logits NaN (a token whose embedding overflowed): that request ends with NonFiniteLogitsError, the
    ones stepping with it (greedy and sampled) get their tokens, no ring breaks, and the pipeline serves on."""
    from models import NonFiniteLogitsError
    from tests.checkpoints import poison_token

    folder = poison_token(make_tiny_llama(tmp_path / "nan", n_layers=4), 7)
    good = [PROMPTS[1], PROMPTS[2], PROMPTS[3]]  # none holds token 7, nor draws it (asserted by the reference)
    opts = {"max_new_tokens": 12, "ignore_eos": True, "temperature": 0.7, "seed": 5}
    ref = load_model(folder, dtype="float64").generate(good, **opts)
    p = Pipeline.deploy(str(folder), num_stages=2, dtype="float64", name=f"nan-{data_path}", data_path=data_path)
    try:
        bad = p.submit([5, 9, 7], **opts)  # joins the others' steps
        ids = [p.submit(prompt, **opts) for prompt in good]
        with pytest.raises(NonFiniteLogitsError, match="logits after 3 tokens were NaN"):
            p.result(bad, timeout=60)
        assert [p.result(i, timeout=60).token_ids for i in ids] == tokens(ref)
        assert tokens(p.generate(good, **opts)) == tokens(ref)
        assert p.stats()["router"]["rings_broken_total"] == 0, p.stats()["router"]["rings_broken"][0]["why"]
    finally:
        p.shutdown()


@pytest.mark.parametrize("hop_mode", ["push", "router"])
def test_float32_pipeline_matches_with_asserted_margins(tiny_ckpt: Path, hop_mode: str) -> None:
    ref = load_model(tiny_ckpt, dtype="float32").generate(PROMPTS, max_new_tokens=12, ignore_eos=True,
                                                          logprobs=2)
    assert min_margin(ref) > 1e-3  # batching moves fp32 logits by ~1e-5: these cannot flip
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=4, name="fp32", micro_batches=2, hop_mode=hop_mode)
    try:
        assert tokens(p.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)) == tokens(ref)
    finally:
        p.shutdown()


def test_actor_names_are_readable(pipe: Pipeline) -> None:
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert {"meshpipe/tiny/stage-0/replica-0", "meshpipe/tiny/stage-1/replica-0",
            "meshpipe/tiny/router-0"} <= names
    assert pipe.describe()["route"] == ["meshpipe/tiny/stage-0/replica-0", "meshpipe/tiny/stage-1/replica-0"]


@pytest.mark.parametrize("prompt,kwargs,error,match", [
    ("", {}, InvalidRequestError, "empty"),
    ([], {}, InvalidRequestError, "empty"),
    ([1, 256], {}, InvalidRequestError, "outside the vocabulary"),
    ([1, 2.5], {}, InvalidRequestError, "integers"),
    ([1] * 300, {}, InvalidRequestError, "context"),
    ([1, 2], {"max_new_tokens": 0}, InvalidRequestError, "max_new_tokens"),
    ([1, 2], {"max_new_tokens": -1}, InvalidRequestError, "max_new_tokens"),
    ("hello", {}, InvalidRequestError, "no tokenizer"),
    ([1, 2], {"top_p": 2.0}, InvalidRequestError, "top_p"),
    ([1, 2], {"speculative": -1}, InvalidRequestError, "speculative"),
])
def test_bad_input_is_a_typed_error_and_the_pipeline_keeps_serving(
        pipe: Pipeline, prompt: object, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        pipe.generate(prompt, **kwargs)
    assert len(pipe.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3


def test_one_bad_prompt_rejects_the_batch_before_anything_runs(pipe: Pipeline) -> None:
    with pytest.raises(InvalidRequestError, match="outside"):
        pipe.generate([[1, 2], [999]], max_new_tokens=2)
    assert pipe.stats()["router"]["active"] == 0


def test_back_pressure_not_a_hang(pipe: Pipeline) -> None:
    """4 active + 2 queued allowed: 7 at once is refused whole, at once; 6 all finish."""
    t0 = time.monotonic()
    with pytest.raises(BackPressureError, match="full"):
        pipe.generate([[i + 3] for i in range(7)], max_new_tokens=2)
    assert time.monotonic() - t0 < 5
    outs = pipe.generate([[i + 3] for i in range(6)], max_new_tokens=4, ignore_eos=True)
    assert all(len(o.token_ids) == 4 for o in outs)


def test_kv_budget_too_small_for_one_request(tiny_ckpt: Path) -> None:
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=1, name="kv", kv_cache_tokens=16)
    try:
        with pytest.raises(InvalidRequestError, match="kv_cache_tokens"):
            p.generate([1] * 10, max_new_tokens=10)
        assert p.generate([1] * 10, max_new_tokens=6)[0].usage["prompt_tokens"] == 10
    finally:
        p.shutdown()


def test_sixteen_concurrent_threads_get_the_tokens_they_get_alone(pipe: Pipeline, tiny_ckpt: Path) -> None:
    prompts = [[(7 * i + j) % 250 + 3 for j in range(1 + 3 * i)] for i in range(16)]
    alone = [pipe.generate(p, max_new_tokens=6, ignore_eos=True)[0].token_ids for p in prompts]
    with cf.ThreadPoolExecutor(16) as ex:  # 16 > 4 active + 2 queued: retry on back-pressure
        def run(p: list[int]) -> list[int]:
            while True:
                try:
                    return pipe.generate(p, max_new_tokens=6, ignore_eos=True)[0].token_ids
                except BackPressureError:
                    time.sleep(0.05)
        together = list(ex.map(run, prompts))
    assert together == alone


def test_stream_yields_tokens_and_a_dropped_stream_frees_every_cache(pipe: Pipeline) -> None:
    full = pipe.generate([4, 5, 6], max_new_tokens=8, ignore_eos=True)[0].token_ids
    streamed = [t for chunk in pipe.stream([4, 5, 6], max_new_tokens=8, ignore_eos=True) for t in chunk.token_ids]
    assert streamed == full
    pipe.set_hop_delay(1, 0.05)
    try:
        it = pipe.stream([4, 5, 6], max_new_tokens=200, ignore_eos=True)
        next(it)
        wait_for(lambda: any(s["sequences"] for s in pipe.stats()["stages"]))
        it.close()  # the client goes away mid-stream
        wait_for(lambda: all(s["sequences"] == 0 for s in pipe.stats()["stages"]))
        assert pipe.stats()["router"]["active"] == 0
    finally:
        pipe.set_hop_delay(1, 0.0)


def test_timeout_and_cancel_free_their_caches(pipe: Pipeline) -> None:
    pipe.set_hop_delay(0, 0.05)
    try:
        with pytest.raises(RequestTimeoutError, match="timed out"):
            pipe.generate([1, 2, 3], max_new_tokens=200, ignore_eos=True, timeout_s=0.5)
        rid = pipe.submit([1, 2, 3], max_new_tokens=200, ignore_eos=True)
        time.sleep(0.3)
        assert pipe.cancel(rid)
        wait_for(lambda: all(s["sequences"] == 0 for s in pipe.stats()["stages"]))
    finally:
        pipe.set_hop_delay(0, 0.0)
    assert len(pipe.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)[0].token_ids) == 2


def test_hop_delay_hook_slows_one_hop_and_changes_nothing(pipe: Pipeline) -> None:
    fast_s = float("inf")
    for _ in range(3):  # the fastest of three: one run stalled on a loaded machine (~0.1 s) ate the margin
        t0 = time.perf_counter()
        fast = pipe.generate([8, 9], max_new_tokens=5, ignore_eos=True)[0].token_ids
        fast_s = min(fast_s, time.perf_counter() - t0)
    pipe.set_hop_delay(1, 0.1)
    try:
        t0 = time.perf_counter()
        slow = pipe.generate([8, 9], max_new_tokens=5, ignore_eos=True)[0].token_ids
        slow_s = time.perf_counter() - t0
    finally:
        pipe.set_hop_delay(1, 0.0)
    assert slow == fast and slow_s >= fast_s + 0.4  # 5 steps, each 0.1 s late


def test_second_driver_and_cli_attach_by_name(pipe: Pipeline, ray_cluster: dict) -> None:
    expected = pipe.generate([3, 4, 5], max_new_tokens=4, ignore_eos=True)[0].token_ids
    code = ("import ray; from actors import Pipeline; ray.init(address='auto'); "
            "print(Pipeline.connect('tiny').generate([3, 4, 5], max_new_tokens=4, ignore_eos=True)[0].token_ids)")
    # address 'auto' finds this session's Ray (RAY_ADDRESS pins it when other clusters run here)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"]}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected)
    cli = subprocess.run(["meshpipe", "generate", "--address", "auto", "--name", "tiny", "--prompt-ids", "3,4,5",
                          "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout.strip().splitlines()[-1])["token_ids"][:4] == expected


def test_connect_to_a_missing_deployment() -> None:
    with pytest.raises(DeploymentError, match="no deployment named 'nope'"):
        Pipeline.connect("nope")


def test_deploy_errors_name_the_problem(tiny_ckpt: Path, tmp_path: Path, pipe: Pipeline) -> None:
    with pytest.raises(UnknownModelError, match="no-such-model"):
        Pipeline.deploy("no-such-model", name="bad")
    with pytest.raises(ConfigError, match="more stages than"):
        Pipeline.deploy(str(tiny_ckpt), num_stages=5, name="bad")
    with pytest.raises(ConfigError, match="not Ray actor resources"):
        Pipeline.deploy(str(tiny_ckpt), name="bad", stage_resources={"gpus": 1})
    with pytest.raises(ConfigError, match="dtype"):
        Pipeline.deploy(str(tiny_ckpt), dtype="float8", name="bad")
    with pytest.raises(DeploymentError, match="named 'tiny' is running"):
        Pipeline.deploy(str(tiny_ckpt), name="tiny")
    wide = make_tiny_llama(tmp_path / "wide", n_layers=40, dim=16, n_heads=2, n_kv_heads=1, hidden=16)
    t0 = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match="40 stage actors need 40 GPUs"):
        Pipeline.deploy(str(wide), layers_per_stage=1, name="bad")
    assert time.monotonic() - t0 < 10  # fails fast, nothing left behind
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("meshpipe/bad/")]


def test_resource_policy() -> None:
    assert choose_stage_resources(4, 0, 0) == {"num_cpus": 0, "num_gpus": 0}  # CPU fallback
    assert choose_stage_resources(4, 8, 4) == {"num_gpus": 1, "num_cpus": 0}
    with pytest.raises(InsufficientResourcesError, match="4 stage actors need 4 GPUs .* 2 free of 8"):
        choose_stage_resources(4, 8, 2)
    assert choose_stage_resources(4, 8, 2, {"num_gpus": 0.5}) == {"num_gpus": 0.5}
    with pytest.raises(InsufficientResourcesError, match="asks for GPUs but the cluster has none"):
        choose_stage_resources(2, 0, 0, {"num_gpus": 1})


def test_unplaceable_stages_fail_with_a_named_error_not_a_hang(tiny_ckpt: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeploymentError, match="not ready after 3 s .*stage-0"):
        Pipeline.deploy(str(tiny_ckpt), num_stages=2, name="nowhere", ready_timeout_s=3,
                        stage_resources={"num_cpus": 0, "resources": {"no_such_resource": 1}})
    assert time.monotonic() - t0 < 30
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("meshpipe/nowhere/")]


def test_stage_processes_start_with_a_short_openmp_spin_unless_told_otherwise(
        tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from actors.stage import omp_env

    def spins(p: Pipeline) -> list[str | None]:
        return [psutil.Process(s["pid"]).environ().get("GOMP_SPINCOUNT") for s in p.describe()["stages"]]

    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, name="spin")
    q = Pipeline.deploy(str(tiny_ckpt), num_stages=2, name="nospin", omp_spin_count=None)
    try:
        assert spins(p) == ["50000", "50000"]  # the default: set before the process loads OpenMP
        assert spins(q) == [None, None]  # None: OpenMP's own default
        same = [x.generate([1, 2, 3], max_new_tokens=4)[0].token_ids for x in (p, q)]
        assert same[0] == same[1]
    finally:
        p.shutdown()
        q.shutdown()
    assert omp_env(7) == {"runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "7"}}}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's own choice wins
    assert omp_env(7) == {}
