"""What an actor is built from: typed, picklable specs instead of positional argument lists.

`Pipeline.deploy` fills them from a `DeployConfig`; Ray pickles them into the actors. Keys are
left out of every repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.config import RouterOptions, StageOptions, WireOptions


@dataclass(frozen=True)
class StageSetup:
    """Everything a stage replica of one deployment shares with its siblings."""

    deployment: str  # the deployment's name
    source: str  # the model: a .gguf path or a Hugging Face folder
    model: dict  # ModelConfig.to_dict()
    num_stages: int  # stages in the pipeline (for the default torch threads)
    stage: StageOptions  # dtype, threads, restarts, resources
    wire: WireOptions  # codecs and retransmits
    weights: Any = None  # the deployment's WeightsActor handle (None: each stage reads its file)
    key: bytes | None = field(default=None, repr=False)  # AES-GCM key (None: $MESHPIPE_KEY on the stage's node)
    max_sequences: int = 64  # the router's max_active_sequences: a default KV pool holds no more than they can use


@dataclass(frozen=True)
class RouterSpec:
    """What the router of one deployment is built from."""

    deployment: str  # the deployment's name
    source: str  # the model (the router reads its tokenizer)
    model: dict  # ModelConfig.to_dict()
    options: RouterOptions  # admission, lanes, routing, recovery (micro_batches and message_bytes resolved)
    wire: WireOptions  # how each hop encodes
    topology: dict | None = None  # the user's topology with Ray node ids as hosts (None: measured)
    key: bytes | None = field(default=None, repr=False)  # AES-GCM key for the first hop
