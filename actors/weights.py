"""The weights actor: every stage's tensors, read once and kept in the Ray object store.

One detached actor per deployment (`meshpipe/<name>/weights`) owns the objects, so they outlive
the stage actors and the router. A stage actor that Ray restarts after a crash gets its tensors
from here (a zero-copy view of shared memory on the same node, an object-store transfer from
another) instead of parsing the GGUF or safetensors again: that is what keeps a restart within
the recovery target (README: Fault tolerance).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import ModelConfig
from models.config import resolve_dtype
from topology.split import StageSpec

log = logging.getLogger(__name__)

StageKey = tuple[tuple[int, ...], bool, bool, str]  # layers, embed, head, torch dtype name


def to_arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays (bfloat16 travels as its int16 bits), so Ray stores them zero-copy."""
    return {k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def from_arrays(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inverse of `to_arrays`: tensors sharing the arrays' (read-only, shared) memory."""
    with warnings.catch_warnings():  # the object store's buffers are read-only; inference never writes weights
        warnings.simplefilter("ignore", UserWarning)
        out = {k: torch.from_numpy(a) for k, a in arrays.items()}
    return {k: v.view(torch.bfloat16) if dtype == torch.bfloat16 else v for k, v in out.items()}


class WeightsActor:
    """Reads each stage's tensors once (in threads, stages in parallel) and hands out object refs."""

    def __init__(self, deployment: str, source: str | Path, config: dict) -> None:
        self.deployment = deployment
        self.source = str(source)
        self.cfg = ModelConfig.from_dict(config)
        self._refs: dict[StageKey, Any] = {}
        self._locks: dict[StageKey, threading.Lock] = {}
        self._guard = threading.Lock()
        self.load_s: dict[str, float] = {}

    def stage(self, spec: StageSpec, dtype: str, device: str) -> list[Any]:
        """[ref] to the stage's {name: array} dict (in a list, so Ray hands over the ref, not the value)."""
        import ray

        from models.loading import load_state_dict

        dt = resolve_dtype(dtype, device)
        key: StageKey = (tuple(spec.layers), spec.embed, spec.head, str(dt))
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._refs:
                t0 = time.perf_counter()
                state = load_state_dict(self.source, self.cfg, spec.layers, spec.embed, spec.head, dt)
                self._refs[key] = ray.put(to_arrays(state))
                self.load_s[spec.label] = round(time.perf_counter() - t0, 3)
                log.info("weights of %s (%s) read in %.2f s", spec.label, dt, self.load_s[spec.label])
        return [self._refs[key]]

    def stats(self) -> dict[str, Any]:
        return {"stages_kept": len(self._refs), "load_s": dict(self.load_s)}


def fetch_stage_state(weights: Any, spec: StageSpec, dtype: str, device: str) -> dict[str, torch.Tensor]:
    """A stage's tensors from the deployment's weights actor (called in the stage actor)."""
    import ray

    (ref,) = ray.get(weights.stage.remote(spec, dtype, device))
    return from_arrays(ray.get(ref), resolve_dtype(dtype, device))
