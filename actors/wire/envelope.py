"""What travels stage to stage (as an ObjectRef, never through the driver).

The message itself is `wire`: a typed header (sequences, starts, lengths, step, message id,
attempt, kind, sender, codec, shape, dtype) and the encoded payload (token ids into the first
stage, packed hidden states (N, dim) between stages) with a checksum, optionally encrypted
(`actors.wire.framing`). Numpy bytes pass zero-copy through Ray's object store. Around it ride control
fields the transport needs and no stage trusts for content: the handle to ask for a resend, the
per-hop codec plan, push-mode hops, timing trace, and (out of the last stage) the sampled tokens.
Senders `seal` an envelope, receivers `open` it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.wire.framing import Header, pack, unpack
from actors.wire.links import LinkCodec
from models.sampling import SamplingParams, TokenLogprob

__all__ = ["Envelope"]


@dataclass(slots=True)
class Envelope:
    """One hop's message plus the control fields around it."""

    wire: np.ndarray | None  # the message (actors/wire/framing.py format); None if it was dropped in transit
    msg_id: int  # router-unique id of this step on this route: the key for a resend
    reply_to: Any = None  # the sender's actor handle, asked to resend a bad message (None: the router)
    links: list[LinkCodec] = field(default_factory=list)  # links[k]: how the message into stage k is encoded
    params: list[SamplingParams] | None = None  # (B,) sampling options, read by the last stage
    hops: list[Any] = field(default_factory=list)  # push mode: actor handles of the stages still to visit
    sent_at: float = 0.0  # time.time() when the producer sent it (inbound wait = start - sent_at)
    # (stage, replica, inbound_ms, compute_ms) per hop so far
    trace: list[tuple[int, int, float, float]] = field(default_factory=list)
    retransmits: int = 0  # resends this step needed so far, summed over hops
    sampled: list[int] | None = None  # (B,) next tokens: out of the last stage
    logprobs: list[TokenLogprob | None] | None = None  # (B,) when asked for

    @property
    def push(self) -> bool:
        """Whether the stages call each other (push mode) rather than the router calling each."""
        return bool(self.hops)

    @classmethod
    def seal(cls, header: Header, tensor: torch.Tensor, link: LinkCodec, key: bytes | None,
             **control: Any) -> Envelope:
        """Encodes `tensor` under `header` for one link."""
        return cls(pack(header, tensor, link, key), header.msg_id, **control)

    def open(self, key: bytes | None) -> tuple[Header, torch.Tensor]:
        """Verifies and decodes the message (raises a MessageError subclass if it is bad)."""
        return unpack(self.wire if self.wire is not None else b"", key)
