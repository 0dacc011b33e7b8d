"""Deploy progress: what `Pipeline.deploy(progress=...)` reports, and tqdm bars for the CLI and notebooks.

Library code only calls the callback (and logs); drawing bars is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeployProgress:
    phase: str  # "weights": stages whose tensors the weights actor has read; "stages": replicas loaded, ready
    done: int  # finished so far
    total: int  # in all


ProgressFn = Callable[[DeployProgress], None]

_LABELS = {"weights": "reading weights", "stages": "starting stages"}


class TqdmProgress:
    """One `tqdm.auto` bar per deploy phase (a widget in Jupyter, a text bar in a terminal): `progress=TqdmProgress()`."""

    def __init__(self, **tqdm_options: Any) -> None:
        self.options = {"unit": "stage", "leave": True, **tqdm_options}
        self.bars: dict[str, Any] = {}

    def __call__(self, p: DeployProgress) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(p.phase)
        if bar is None:
            bar = self.bars[p.phase] = tqdm(total=p.total, desc=_LABELS.get(p.phase, p.phase), **self.options)
        bar.update(p.done - bar.n)
        if p.done >= p.total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
