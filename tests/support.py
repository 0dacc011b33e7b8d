"""Helpers shared by the integration tests: references and the margin rule of DESIGN.md §2."""

from __future__ import annotations

from models import Completion


def min_margin(completions: list[Completion]) -> float:
    """Smallest top-1 minus top-2 logit gap over every generated step (needs logprobs >= 2)."""
    gaps = []
    for c in completions:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        for lp in c.logprobs:
            top = sorted(lp.top.values(), reverse=True)
            gaps.append(top[0] - top[1])  # logprob gaps are logit gaps
    return min(gaps)


def tokens(completions: list[Completion]) -> list[list[int]]:
    return [c.token_ids for c in completions]
