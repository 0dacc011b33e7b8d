"""Edge cases of the pure topology code that the per-module tests do not reach (no Ray, no models/)."""

from __future__ import annotations

import math

import pytest

from topology.errors import SplitError
from topology.placement import Gpu, place
from topology.split import StageCostModel, min_max_cuts, split


@pytest.mark.parametrize("n_layers", [0, -1])
def test_place_names_a_cost_model_without_layers(n_layers: int) -> None:
    # no layers left no candidate stage time: place crashed with a bare IndexError
    model = StageCostModel(n_layers=n_layers, head_cost=1.0, layer_bytes=1.0, embedding_bytes=1.0,
                           tie_embeddings=True)
    with pytest.raises(SplitError, match="n_layers"):
        place(model, [Gpu("a", 0, math.inf, 1.0)])


def test_split_into_hundreds_of_stages_does_not_hit_the_recursion_limit() -> None:
    # min_max_cuts recursed one frame a stage: a bare RecursionError from about 500 stages (MAX_LAYERS 4096)
    model = StageCostModel(n_layers=1000, head_cost=8.0, layer_bytes=1.0, embedding_bytes=1.0,
                           tie_embeddings=True)
    stages = split(model, num_stages=999)
    assert len(stages) == 999 and sorted(len(s.layers) for s in stages) == [1] * 998 + [2]
    assert stages[-1].head and stages[-1].layers == (999,)  # the head costs 8: its layer stays alone


def test_min_max_cuts_keeps_its_tie_break_and_infeasible_answers() -> None:
    model = StageCostModel(n_layers=4, head_cost=0.0, layer_bytes=1.0, embedding_bytes=0.0,
                           tie_embeddings=True)
    assert min_max_cuts(model, 3) == (2, (1, 2, 4))  # equally good: the first stage ends earliest
    assert min_max_cuts(model, 5) == (math.inf, ())  # more stages than layers
    assert min_max_cuts(model, 1, capacity=3.0) == (math.inf, (4,))
    assert min_max_cuts(model, 2, capacity=1.0) == (math.inf, ())
    with pytest.raises(SplitError, match="num_stages=0"):  # the recursion ran off to a RecursionError
        min_max_cuts(model, 0)
