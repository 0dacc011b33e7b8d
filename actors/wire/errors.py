"""The message layer's typed errors. Every one is a `models.MeshpipeError` (via `MessageError`)."""

from __future__ import annotations

from models.errors import MeshpipeError

__all__ = [
    "ChecksumError", "DecryptionError", "KeyConfigError", "MessageError", "OutOfOrderError", "ReplayError",
    "TruncatedMessageError",
]


class MessageError(MeshpipeError):
    """A message failed verification or decoding (the message says which check and what to do)."""


class ChecksumError(MessageError):
    """The message was corrupted in transit (checksum mismatch): ask the sender to resend it."""


class TruncatedMessageError(ChecksumError):
    """The message is shorter or longer than its framing says (cut or padded in transit): resend it."""


class DecryptionError(MessageError):
    """The checksum holds but AES-GCM authentication failed: wrong key or tampering. Do not retry blindly."""


class ReplayError(MessageError):
    """(Raised by the stage.) A step already applied arrived again without being marked retransmit/rebuild."""


class OutOfOrderError(MessageError):
    """(Raised by the stage.) A step skips ahead of the sequence's KV cache."""


class KeyConfigError(MessageError):
    """The encryption key is missing or malformed (the message never contains key material)."""
