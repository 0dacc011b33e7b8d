"""Splitting N decoder layers into S contiguous stages, balanced by compute, within memory.

Works on plain numbers (`StageCostModel`): what one layer costs in compute and bytes, what the
embedding table and the LM head cost. actors/ derives them from a model's config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from topology.errors import SplitError


@dataclass(frozen=True)
class StageSpec:
    index: int  # position in the pipeline, 0 = first
    layers: tuple[int, ...]  # global indices of the decoder layers it owns (contiguous)
    embed: bool  # owns the token embedding (first stage)
    head: bool  # owns the final norm and LM head, and samples (last stage)

    @property
    def label(self) -> str:
        parts = (["embed"] if self.embed else []) + [f"layers {self.layers[0]}-{self.layers[-1]}"] + (
            ["head"] if self.head else [])
        return f"stage-{self.index} ({', '.join(parts)})"


@dataclass(frozen=True)
class StageCostModel:
    """Compute and weight memory of a stage owning layers [start, stop) (split and placement share it).

    Every decoder layer is alike. Compute: one unit a decoder layer, `head_cost` for the LM head
    (last stage); the embedding lookup is free. Memory: the layers, the embedding table on the first
    stage, and the LM head on the last (a tied head costs nothing extra when the first stage is also
    the last).
    """

    n_layers: int  # decoder layers of the model
    head_cost: float  # the LM head's compute, in decoder-layer units
    layer_bytes: float  # bytes one decoder layer needs (weights + any per-layer headroom)
    embedding_bytes: float  # bytes of the embedding table (= an untied LM head's)
    tie_embeddings: bool  # the LM head reuses the embedding table
    bytes_per_param: float = 4  # what the byte counts were computed with (named in error messages)

    def with_headroom(self, extra_bytes_per_layer: float) -> StageCostModel:
        """The same model with `extra_bytes_per_layer` (e.g. KV cache) added to every layer's bytes."""
        return replace(self, layer_bytes=self.layer_bytes + extra_bytes_per_layer)

    def cost(self, start: int, stop: int) -> float:
        """Compute of layers [start, stop), the head included when `stop` is the last layer's end."""
        return (stop - start) + (self.head_cost if stop == self.n_layers else 0.0)

    def memory(self, start: int, stop: int) -> float:
        """Bytes a stage owning layers [start, stop) holds."""
        tied_head = stop == self.n_layers and (not self.tie_embeddings or start > 0)
        return ((stop - start) * self.layer_bytes + (self.embedding_bytes if start == 0 else 0)
                + (self.embedding_bytes if tied_head else 0))


def min_max_cuts(model: StageCostModel, num_stages: int,
                 capacity: float = float("inf")) -> tuple[float, tuple[int, ...]]:
    """Cut points (stage ends) of `num_stages` contiguous stages minimising the costliest stage.

    Returns (that cost, cuts); the cost is inf when no split fits `capacity` bytes a stage.
    Among equally good splits the first stage ends earliest, then recursively for the rest.
    Bottom up, one row per number of stages left: a recursion one frame a stage hit Python's
    recursion limit (a bare RecursionError) from about 500 stages, which MAX_LAYERS allows.
    """
    n, cost, mem, inf = model.n_layers, model.cost, model.memory, float("inf")
    if num_stages < 1:
        raise SplitError(f"num_stages={num_stages!r} must be a positive integer")
    if num_stages > n:
        return inf, ()
    # worst[i]: min over splits of layers [i, n) into the stages left of the costliest stage;
    # end[s][i]: where the first of them ends (i ranges over the starts that leave a layer a stage)
    worst = {i: cost(i, n) if mem(i, n) <= capacity else inf for i in range(num_stages - 1, n)}
    end: list[dict[int, int]] = [{i: n for i in worst}]
    for s in range(2, num_stages + 1):  # s stages left, starting at layer i
        row: dict[int, float] = {}
        ends: dict[int, int] = {}
        for i in range(num_stages - s, n - s + 1):
            best, at = inf, -1
            for j in range(i + 1, n - s + 2):
                if mem(i, j) > capacity:
                    break
                w = max(cost(i, j), worst[j])
                if w < best:  # strict: ties keep the earliest end
                    best, at = w, j
            row[i], ends[i] = best, at
        worst = row
        end.append(ends)
    if worst[0] == inf:
        return inf, (n,) if num_stages == 1 else ()
    cuts, i = [], 0
    for ends in reversed(end):
        i = ends[i]
        cuts.append(i)
    return worst[0], tuple(cuts)


def split(model: StageCostModel, num_stages: int | None = None, layers_per_stage: int | None = None,
          stage_memory_bytes: float | None = None) -> list[StageSpec]:
    """Contiguous layer ranges minimising the costliest stage (exactly one of the two counts).

    With `stage_memory_bytes`, no stage may hold more weights. Raises SplitError naming the value.
    """
    n = model.n_layers
    if (num_stages is None) == (layers_per_stage is None):
        raise SplitError(
            f"give exactly one of num_stages ({num_stages}) and layers_per_stage ({layers_per_stage})"
        )
    if layers_per_stage is not None:
        if not isinstance(layers_per_stage, int) or not 1 <= layers_per_stage <= n:
            raise SplitError(
                f"layers_per_stage={layers_per_stage!r} must be between 1 and {n} (the model's layers)")
        return stage_specs(list(range(0, n, layers_per_stage)) + [n])
    if not isinstance(num_stages, int) or num_stages < 1:
        raise SplitError(f"num_stages={num_stages!r} must be a positive integer")
    if num_stages > n:
        raise SplitError(f"num_stages={num_stages} is more stages than the model's {n} layers")

    cap = float("inf") if stage_memory_bytes is None else stage_memory_bytes
    worst, cuts = min_max_cuts(model, num_stages, cap)
    if worst == float("inf"):
        raise SplitError(
            f"{n} layers do not fit in {num_stages} stages of {cap / 2**30:.2f} GiB each: "
            "use more stages or GPUs with more memory"
        )
    return stage_specs([0, *cuts])


def stage_specs(bounds: list[int]) -> list[StageSpec]:
    """The stages between consecutive `bounds` (layer indices, 0 first, n last)."""
    last = len(bounds) - 2
    return [
        StageSpec(index=s, layers=tuple(range(bounds[s], bounds[s + 1])), embed=s == 0, head=s == last)
        for s in range(last + 1)
    ]
