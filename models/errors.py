"""Typed errors of the model layer. Each message says what was wrong and what to do."""

from __future__ import annotations


class MeshpipeError(Exception):
    """Base of every error meshpipe raises on purpose."""


class ConfigError(MeshpipeError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class UnknownModelError(MeshpipeError, ValueError):
    """A model source is neither a known name, a .gguf file nor a Hugging Face folder."""


class ModelNotInstalledError(MeshpipeError, FileNotFoundError):
    """A known model name whose weights are not installed (run `meshpipe pull NAME`)."""


class InvalidRequestError(MeshpipeError, ValueError):
    """A request is malformed: empty prompt, bad token ids, too long, bad sampling options."""


class PromptTooLongError(InvalidRequestError):
    """A prompt does not fit the model's context (HTTP 400, code `context_length_exceeded`)."""


class NonFiniteLogitsError(MeshpipeError, ArithmeticError):
    """A sequence's logits were NaN or infinite (its weights or activations overflowed their dtype): that
    sequence ends with this error; the others in its step go on."""


class CacheMissError(MeshpipeError, LookupError):
    """A stage was asked to extend a sequence whose KV cache it does not hold (or holds shorter).

    The router answers it by rebuilding the cache from the sequence's history.
    """


class CacheFullError(MeshpipeError, MemoryError):
    """A stage's KV pool has no free or cached block left (the router's block budget prevents it)."""
