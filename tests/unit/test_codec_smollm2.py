"""What lossy message codecs do to SmolLM2's next-token choice (no Ray; the pipeline applies the same codec).

SmolLM2 in two stages, stage 0's hidden states packed and unpacked with each codec before stage
1, teacher-forced along the single-process greedy continuation: the share of steps whose top-1
token is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from actors.wire import Header, LinkCodec, pack, unpack
from actors.layout import partition
from models import Batch, Transformer, load_stage
from models.loading import read_config, resolve_source

pytestmark = pytest.mark.smollm2

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first humans", "Water boils at a temperature of",
           "The quick brown fox", "My favourite recipe for pancakes needs"]
NEW = 24


CODECS = {"none": 1.0, "fp16": 1.0, "bf16": 0.97, "int8": 0.99}  # codec -> least share of top-1 kept


@pytest.fixture(scope="module")
def agreement(smollm2: Transformer) -> dict[str, tuple[float, int]]:
    """Every codec in one teacher-forced pass: stage 0's hidden state does not depend on the codec (the
    reference token is fed whatever was chosen), so it is computed once per step and each codec's
    packed copy goes through a stage 1 with a cache of its own."""
    from models.tokenizer import load_tokenizer

    src = resolve_source("smollm2-135m")
    cfg, tokenizer = read_config(src), load_tokenizer(src)
    s0_spec, s1_spec = partition(cfg, num_stages=2)
    s0, s1 = (load_stage(src, s.layers, "float32", config=cfg, embed=s.embed, head=s.head)
              for s in (s0_spec, s1_spec))
    refs = smollm2.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    wants = [ref.token_ids for ref in refs]
    ids = [f"s{i}" for i in range(len(PROMPTS))]
    same, total = dict.fromkeys(CODECS, 0), 0
    with torch.inference_mode():  # every prompt in one batch, as the reference ran them
        c0, c1 = s0.new_cache(), {codec: s1.new_cache() for codec in CODECS}
        inputs = [tokenizer.encode(p) for p in PROMPTS]
        starts = [0] * len(PROMPTS)
        for step in range(NEW):
            lengths = [len(x) for x in inputs]
            b = Batch.build(ids, starts, lengths)
            h = s0(torch.tensor([t for x in inputs for t in x]), b, c0)  # (N, dim)
            header = Header(kind="step", step=step, msg_id=step, attempt=0, sender="test", seq_ids=ids,
                            starts=list(starts), lengths=lengths, release=[])
            want = torch.tensor([w[step] for w in wants])
            for codec in CODECS:
                _, h2 = unpack(pack(header, h, LinkCodec(codec=codec)))
                same[codec] += int((s1(h2.to(h.dtype), b, c1[codec]).argmax(-1) == want).sum())
            total += len(PROMPTS)
            starts = [s + n for s, n in zip(starts, lengths)]
            inputs = [[w[step]] for w in wants]  # teacher forcing: the reference token, whatever was chosen
    return {codec: (same[codec] / total, total) for codec in CODECS}


@pytest.mark.parametrize("codec", list(CODECS))
def test_top1_agreement_per_codec(agreement: dict[str, tuple[float, int]], codec: str) -> None:
    share, steps = agreement[codec]
    assert steps == len(PROMPTS) * NEW
    assert share >= CODECS[codec], f"{codec}: {share:.4f} of {steps} steps keep their top-1 token"
