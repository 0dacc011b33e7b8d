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


def top1_agreement(smollm2: Transformer, codec: str) -> tuple[float, int]:
    src = resolve_source("smollm2-135m")
    cfg = read_config(src)
    s0_spec, s1_spec = partition(cfg, num_stages=2)
    s0, s1 = (load_stage(src, s.layers, "float32", config=cfg, embed=s.embed, head=s.head)
              for s in (s0_spec, s1_spec))
    refs = smollm2.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    same = total = 0
    with torch.inference_mode():
        for prompt, ref in zip(PROMPTS, refs):
            ids = smollm2_tokens(prompt)
            c0, c1 = s0.new_cache(), s1.new_cache()
            inputs, start = ids, 0
            for want in ref.token_ids:
                b = Batch.build(["s"], [start], [len(inputs)])
                h = s0(torch.tensor(inputs), b, c0)
                header = Header(kind="step", step=0, msg_id=0, attempt=0, sender="test", seq_ids=["s"],
                                starts=[start], lengths=[len(inputs)], release=[])
                _, h2 = unpack(pack(header, h, LinkCodec(codec=codec)))
                got = int(s1(h2.to(h.dtype), b, c1).argmax(-1)[0])
                same += got == want
                total += 1
                start += len(inputs)
                inputs = [want]  # teacher forcing: the reference token, whatever was chosen
    return same / total, total


def smollm2_tokens(text: str) -> list[int]:
    from models.tokenizer import load_tokenizer

    return load_tokenizer(resolve_source("smollm2-135m")).encode(text)


@pytest.mark.parametrize("codec,floor", [("none", 1.0), ("fp16", 1.0), ("bf16", 0.97), ("int8", 0.99)])
def test_top1_agreement_per_codec(smollm2: Transformer, codec: str, floor: float) -> None:
    agreement, steps = top1_agreement(smollm2, codec)
    assert steps == len(PROMPTS) * NEW
    assert agreement >= floor, f"{codec}: {agreement:.4f} of {steps} steps keep their top-1 token"
