"""AES-256-GCM sealing of a payload, and the deployment key (`load_key`, `new_key`).

A sealed payload is nonce (12 random bytes) | ciphertext | tag (16); the prefix and header bytes are
the associated data (authenticated, not secret). Errors never include key material.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from actors.wire.errors import DecryptionError, KeyConfigError, MessageError

__all__ = ["KEY_SIZE", "NONCE_SIZE", "OVERHEAD", "TAG_SIZE", "key_bytes", "load_key", "new_key",
           "open_payload", "seal_into", "subkey"]

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE  # bytes sealing adds to a payload
KEY_SIZE = 32  # AES-256
NEW_KEY_HINT = "python -c 'from actors.wire import new_key; print(new_key())'"


@functools.lru_cache(maxsize=8)
def _aead(key: bytes) -> AESGCM:
    return AESGCM(key)


def subkey(key: bytes | None, purpose: str) -> bytes | None:
    """A key of its own for one purpose (one deployment's wire, its journal), derived from the deployment
    key with HKDF-SHA256: each gets its own budget of random 96-bit nonces (about 2^32 messages a key),
    and a message sealed for one purpose never opens in another."""
    if key is None:
        return None
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                info=b"meshpipe/" + purpose.encode()).derive(key_bytes(key))


def key_bytes(key: Any) -> bytes:
    """A usable 32-byte key from pack/unpack's argument (bytes or any form load_key accepts)."""
    if isinstance(key, (bytes, bytearray, memoryview)) and len(key) == KEY_SIZE:
        return bytes(key)
    k = load_key(key)
    assert k is not None  # key is not None here, so load_key either returns bytes or raises
    return k


def load_key(value: str | bytes | None = None, env: str = "MESHPIPE_KEY") -> bytes | None:
    """The 32-byte AES-256 key from `value`, else from $env (None when neither is set).

    Accepted: 32 raw bytes, 64 hex characters, or 44 base64 characters (standard or URL-safe alphabet).
    Errors never include the key material.
    """
    source = "the key argument"
    if value is None:
        value = os.environ.get(env)
        source = f"${env}"
        if value is None or value == "":
            return None
    accepted = (f"{source} must be an AES-256 key: 32 raw bytes, 64 hex characters or 44 base64 "
                f"characters (make one with `{NEW_KEY_HINT}`)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        if len(value) == KEY_SIZE:
            return value
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise KeyConfigError(f"{accepted}; got {len(value)} bytes that are not ASCII") from None
    if not isinstance(value, str):
        raise KeyConfigError(f"{accepted}; got a {type(value).__name__}")
    text = value.strip()
    key: bytes | None = None
    try:
        if len(text) == 2 * KEY_SIZE:
            key = bytes.fromhex(text)
        elif len(text) == 44:
            alt = "-_" if ("-" in text or "_" in text) else None
            key = base64.b64decode(text.encode("ascii"), altchars=alt.encode() if alt else None,
                                   validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        key = None
    if key is None or len(key) != KEY_SIZE:
        kind = {64: "not valid hex", 44: "not valid base64 of 32 bytes"}.get(len(text), "of the wrong length")
        raise KeyConfigError(f"{accepted}; got {len(text)} characters, {kind}")
    return key


def new_key() -> str:
    """A fresh random AES-256 key, base64 (44 characters): set it as MESHPIPE_KEY on every node."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def seal_into(key: bytes, data: Any, aad: np.ndarray, out: np.ndarray) -> None:
    """Encrypts `data` into `out` (len(data) + OVERHEAD bytes): a fresh nonce, ciphertext and tag."""
    nonce = os.urandom(NONCE_SIZE)
    out[:NONCE_SIZE] = np.frombuffer(nonce, dtype=np.uint8)
    _aead(key).encrypt_into(nonce, data, aad, out[NONCE_SIZE:])


def open_payload(key: Any, data: np.ndarray, aad: np.ndarray, what: str) -> np.ndarray:
    """The plaintext of a sealed payload; DecryptionError (naming `what`) when authentication fails."""
    if data.size < OVERHEAD:
        raise MessageError(f"encrypted payload is {data.size} bytes, shorter than nonce + tag: a sender bug")
    plain = np.empty(data.size - OVERHEAD, dtype=np.uint8)
    try:
        _aead(key_bytes(key)).decrypt_into(data[:NONCE_SIZE].tobytes(), data[NONCE_SIZE:], aad, plain)
    except InvalidTag:
        raise DecryptionError(
            f"{what} failed AES-GCM authentication although its checksum holds: the sender uses a different "
            "key, or the message was tampered with; check MESHPIPE_KEY on both nodes; do not retry blindly"
        ) from None
    return plain
