"""Messages on real Ray: corrupted and dropped messages are resent, bad ones rejected, tokens unchanged."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import ray
import torch

from actors import Pipeline, StageFailedError
from actors.wire import (
    DecryptionError,
    Envelope,
    Header,
    LinkCodec,
    OutOfOrderError,
    ReplayError,
    TruncatedMessageError,
    new_key,
)
from models import load_model
from tests.support import min_margin, tokens

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS = [[5, 17, 42, 99, 3], [11, 12], list(range(30, 51)), [200], [9] * 13]
KEY = new_key()


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> list:
    return tokens(load_model(tiny_ckpt, dtype="float64").generate(PROMPTS, max_new_tokens=8, ignore_eos=True))


@pytest.fixture(scope="module")
def sealed(tiny_ckpt: Path):  # noqa: ANN201
    """Three stages, every link encrypted (AES-GCM), int8 nowhere: float64 tokens must be exact."""
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=3, dtype="float64", name="sealed", encryption="always",
                        encryption_key=KEY, max_retransmits=3, micro_batches=1)
    yield p
    p.shutdown()


def _stage_counters(p: Pipeline) -> list[dict]:
    return p.stats()["stages"]


def test_encrypted_pipeline_gives_the_same_tokens(sealed: Pipeline, reference: list) -> None:
    assert all(link["encrypt"] for link in sealed.describe()["links"])
    assert tokens(sealed.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == reference


def test_corrupted_and_dropped_messages_are_resent_and_tokens_stay_identical(sealed: Pipeline,
                                                                             reference: list) -> None:
    before = sealed.stats()["router"]["retransmits"]
    sealed.inject_fault(0, "corrupt", 2)  # stage 0 -> stage 1: two messages with a flipped byte
    sealed.inject_fault(1, "drop", 1)  # stage 1 -> stage 2: one message lost
    assert tokens(sealed.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == reference
    stages = _stage_counters(sealed)
    assert stages[1]["retransmits_asked"] >= 2 and stages[2]["retransmits_asked"] >= 1
    assert stages[0]["resends"] >= 2 and stages[1]["resends"] >= 1
    assert sealed.stats()["router"]["retransmits"] - before >= 3


def test_a_link_that_keeps_corrupting_fails_the_step_with_a_typed_error(sealed: Pipeline, reference: list) -> None:
    sealed.inject_fault(0, "corrupt", 100)
    try:
        with pytest.raises(StageFailedError, match="still fails after 3 resends"):
            sealed.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)
    finally:
        sealed.inject_fault(0, "none")
    assert tokens(sealed.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == reference  # still serving


_msg_ids = itertools.count(10**9)


def _message(key: str | None, seq: str, start: int, n: int, encrypt: bool = True, msg_id: int | None = None) -> Envelope:
    from actors.wire import load_key, subkey

    header = Header(kind="step", step=1, msg_id=next(_msg_ids) if msg_id is None else msg_id, attempt=0,
                    sender="test", seq_ids=[seq], starts=[start], lengths=[n], release=[])
    return Envelope.seal(header, torch.arange(n, dtype=torch.long), LinkCodec(encrypt=encrypt),
                         subkey(load_key(key), "wire:sealed") if key else None)  # the deployment's wire key


def test_replayed_out_of_order_truncated_and_wrongly_keyed_messages_are_rejected(sealed: Pipeline,
                                                                                 reference: list) -> None:
    stage0 = ray.get_actor("meshpipe/sealed/stage-0/replica-0", namespace="meshpipe")

    def cause(ref) -> Exception:  # noqa: ANN001
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(ref)
        return info.value.cause

    first = _message(KEY, "probe-a", 0, 3)
    ray.get(stage0.forward.remote(first))  # applied once
    assert isinstance(cause(stage0.forward.remote(first)), ReplayError)
    assert isinstance(cause(stage0.forward.remote(_message(KEY, "probe-b", 5, 2))), OutOfOrderError)
    # a message id applied once is refused again, even carrying positions that would follow in order
    header_id = first.msg_id
    assert isinstance(cause(stage0.forward.remote(_message(KEY, "probe-a", 3, 1, msg_id=header_id))), ReplayError)
    wrong = cause(stage0.forward.remote(_message(new_key(), "probe-c", 0, 2)))
    assert isinstance(wrong, DecryptionError) and KEY not in str(wrong)
    cut = _message(KEY, "probe-d", 0, 2)
    cut.wire = cut.wire[:-5]
    assert isinstance(cause(stage0.forward.remote(cut)), TruncatedMessageError)
    ray.get(stage0.free.remote(["probe-a"]))
    assert tokens(sealed.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == reference  # still serving


@pytest.mark.parametrize("codec,compress", [("fp16", None), ("bf16", "zstd"), ("int8", "lz4"), ("none", "zstd")])
def test_every_codec_serves(tiny_ckpt: Path, codec: str, compress: str | None) -> None:
    ref = load_model(tiny_ckpt, dtype="float32").generate(PROMPTS, max_new_tokens=6, ignore_eos=True, logprobs=2)
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, name=f"codec-{codec}", codec=codec, compress=compress)
    try:
        assert p.describe()["links"][1]["codec"] == codec
        outs = p.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert [len(o.token_ids) for o in outs] == [6] * len(PROMPTS)
        if codec == "none" or (codec == "fp16" and min_margin(ref) > 0.05):
            assert tokens(outs) == tokens(ref)  # lossless, or fp16's rounding far below the margins
    finally:
        p.shutdown()


def test_bad_message_options_name_the_field(tiny_ckpt: Path) -> None:
    from models import ConfigError

    with pytest.raises(ConfigError, match="codec"):
        Pipeline.deploy(str(tiny_ckpt), name="bad", codec="int4")
    with pytest.raises(ConfigError, match="compress"):
        Pipeline.deploy(str(tiny_ckpt), name="bad", compress="gzip")
    with pytest.raises(ConfigError, match="encryption='always' needs a key"):
        Pipeline.deploy(str(tiny_ckpt), name="bad", encryption="always")
