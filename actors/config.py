"""Every deployment option, declared once: `DeployConfig` and its sections.

Users pass flat keywords (`Pipeline.deploy(model, codec="int8", max_queued=16)`); `DeployConfig.of`
sorts them into sections, as torchtitan's JobConfig nests its options. Actors receive the typed
sections (`RouterOptions` for the router, `StageOptions` and `WireOptions` for the stages), never
dicts or positional lists.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr, ValidationError, field_validator, model_validator

from actors.wire import check_codec, check_compress
from models import ConfigError
from models.config import resolve_dtype
from topology.autoscaling import AutoscalingConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterOptions(_Section):
    """How the router admits, batches, routes and recovers."""

    max_active_sequences: int = Field(64, ge=1)  # sequences decoding at once
    max_queued: int = Field(256, ge=0)  # admitted requests waiting for a slot; beyond this -> BackPressureError
    prefill_chunk: int = Field(512, ge=1)  # prompt tokens per step: a long prompt shares steps with running decodes
    micro_batches: int | None = Field(None, ge=1)  # lanes in flight (None: one per GPU or CPU node in use)
    data_path: str = Field("ring", pattern="^(ring|calls)$")  # "ring": stages loop on their own over TCP; "calls": Ray calls
    hop_mode: str = Field("router", pattern="^(router|push)$")  # calls path: "router" chains ObjectRefs; "push": k calls k+1
    finished_kept: int = Field(1024, ge=0)  # finished requests remembered for late `result`/`stream_next` calls
    load_knee: float = Field(8.0, gt=0)  # sequences on a replica at which its queue wait counts as one step time
    route_threshold: float = Field(0.1, ge=0)  # re-plan when a replica's cost moves by this fraction
    probe_interval_s: float = Field(1.0, ge=0)  # how often idle replicas' inbound waits are probed (0 = never)
    message_bytes: int | None = Field(None, ge=1)  # typical activation message for transfer costs (None: the model's)
    topology_refresh_s: float = Field(30.0, ge=0)  # re-measure links between the stages' nodes (0 = never)
    restart_timeout_s: float = Field(60.0, gt=0)  # a step waits this long for a dead stage actor to come back
    replicate_every: int = Field(0, ge=0)  # copy new KV positions to a standby replica every N steps (0 = never)
    checkpoint_interval_s: float = Field(1.0, ge=0)  # journal generated tokens this often (0 = never)
    watch_interval_s: float = Field(0.05, ge=0)  # read replicas' states from Ray this often while steps run


class WireOptions(_Section):
    """How messages between actors are encoded (per link: actors.wire.choose_link)."""

    codec: str = "auto"  # auto (per link, lossless) or a registered codec (actors.wire.codec_names())
    compress: str | None = None  # lossless compression on top: a registered compressor (None: auto decides)
    encryption: str = Field("auto", pattern="^(auto|always|never)$")  # AES-GCM: untrusted links | all | none
    # 32 raw bytes, or as hex/base64; default: $MESHPIPE_KEY (never logged, never in an error or repr)
    encryption_key: SecretBytes | SecretStr | None = None
    int8_block: int = Field(64, ge=8, le=1 << 15)  # elements per int8 scale
    max_retransmits: int = Field(3, ge=0)  # resends a stage asks for a corrupted message before failing the step

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        return check_codec(v, "codec", auto=True)  # names the registered codecs

    @field_validator("compress")
    @classmethod
    def _compress(cls, v: str | None) -> str | None:
        return check_compress(v, "compress")


class StageOptions(_Section):
    """How each stage replica actor runs."""

    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on GPU) | "float32" | "bfloat16" | "float64"
    threads_per_stage: int | None = Field(None, ge=1)  # torch threads in each stage (None: chosen by device)
    # GOMP_SPINCOUNT in each stage process: how long an idle OpenMP worker spins before it sleeps. OpenMP's
    # default (300,000 rounds, milliseconds) keeps a stage's workers spinning into the next stage's turn on
    # shared cores; None: OpenMP's default, or whatever the environment sets
    omp_spin_count: int | None = Field(50_000, ge=0)
    max_restarts: int = Field(3, ge=0)  # Ray restarts a dead stage actor this often; the router rebuilds its caches
    stage_resources: dict[str, Any] | None = None  # e.g. {"num_gpus": 1, "num_cpus": 0.5}; None: one GPU each
    kv_block_size: int = Field(16, ge=1, le=1024)  # tokens per KV cache block
    # KV pool per stage replica, in tokens (None: 1 GiB on a CPU; on a GPU its share x 0.9 minus the weights)
    kv_cache_tokens: int | None = Field(None, ge=1)
    prefix_caching: bool = True  # full blocks of finished tokens are kept and shared by prompts that start alike
    # inference's q|k|v and gate|up projections as one matmul each (None: on accelerators only, where a step
    # is bound by kernel launches; CPU stages keep their zero-copy weights as loaded)
    fuse_linears: bool | None = None
    # decode steps replayed as CUDA graphs, one per (batch, blocks) bucket (None: on CUDA devices; True on a
    # CPU runs the same padded step uncaptured, for tests)
    cuda_graphs: bool | None = None
    # a small model with the same tokenizer (a name, .gguf or HF folder on every node): stage 0 drafts from it
    # for speculative requests (None: prompt-lookup drafts)
    draft_model: str | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        resolve_dtype(v)  # raises ConfigError naming the accepted values
        return v

    @field_validator("stage_resources")
    @classmethod
    def _resources(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        allowed = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "label_selector"}
        bad = sorted(set(v or {}) - allowed)
        if bad:
            raise ValueError(f"stage_resources keys {bad} are not Ray actor resources; use {sorted(allowed)} "
                             "(custom resources go in 'resources': {{name: amount}})")
        return v


SECTIONS: dict[str, type[_Section]] = {"router": RouterOptions, "wire": WireOptions, "stage": StageOptions}


class DeployConfig(BaseModel):
    """User-facing deployment options, validated at the edge (cross-field rules name both values)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str = "smollm2-135m"  # a known name, a .gguf path or a Hugging Face folder
    num_stages: int | None = Field(None, ge=1)  # stages; or layers_per_stage
    layers_per_stage: int | None = Field(None, ge=1)  # 1 = one actor per layer
    replicas_per_stage: int | list[int] = 1  # replicas of every stage, or one count per stage
    topology: Any = None  # a Topology, a YAML path or a dict: place stages on its GPUs (DP); None: measured
    # AutoscalingConfig fields (topology/autoscaling.py); None: fixed replicas
    autoscaling: dict[str, Any] | None = None
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")  # the deployment's name (actor names carry it)
    ready_timeout_s: float = Field(600.0, gt=0)  # stages not loaded by then: DeploymentError
    router: RouterOptions = RouterOptions()
    wire: WireOptions = WireOptions()
    stage: StageOptions = StageOptions()

    @classmethod
    def of(cls, model: str = "smollm2-135m", **options: Any) -> DeployConfig:
        """From `Pipeline.deploy`'s flat keywords; a ConfigError names any bad or unknown option."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in options.items():
            owner = next((name for name, sec in SECTIONS.items() if key in sec.model_fields), None)
            if owner is not None:
                sections[owner][key] = value
            elif key in cls.model_fields and key not in SECTIONS:
                top[key] = value
            else:
                raise ConfigError(f"unknown deploy option {key!r}; the options are {', '.join(flat_options())}")
        try:
            return cls(model=model, **top, **{name: SECTIONS[name](**kw) for name, kw in sections.items()})
        except ValidationError as e:
            raise ConfigError(_describe(e)) from None

    @model_validator(mode="after")
    def _cross(self) -> DeployConfig:
        if self.num_stages is not None and self.layers_per_stage is not None:
            raise ValueError(f"give num_stages ({self.num_stages}) or layers_per_stage "
                             f"({self.layers_per_stage}), not both")
        counts = self.replicas_per_stage if isinstance(self.replicas_per_stage, list) else [self.replicas_per_stage]
        if not counts or any(c < 1 for c in counts):
            raise ValueError(f"replicas_per_stage={self.replicas_per_stage!r}: every count must be at least 1")
        if isinstance(self.replicas_per_stage, list) and self.num_stages is not None \
                and len(counts) != self.num_stages:
            raise ValueError(f"replicas_per_stage has {len(counts)} counts but num_stages={self.num_stages}: "
                             "give one count per stage")
        if self.autoscaling is not None:
            AutoscalingConfig(**self.autoscaling)  # names the bad field
            if self.topology is not None:
                raise ValueError("autoscaling= adds replicas where Ray finds GPUs; with topology= placement "
                                 "give fixed replicas_per_stage instead")
        if self.topology is not None and self.layers_per_stage is not None:
            raise ValueError(f"topology= places layers by GPU speed and memory: give num_stages "
                             f"(or nothing), not layers_per_stage ({self.layers_per_stage})")
        return self


def flat_options() -> list[str]:
    """Every keyword `Pipeline.deploy` takes (besides `progress=`)."""
    top = [k for k in DeployConfig.model_fields if k not in SECTIONS and k != "model"]
    return top + [k for sec in SECTIONS.values() for k in sec.model_fields]


def _describe(e: ValidationError) -> str:
    """pydantic's message with each error located by its flat option name (never the input value of a secret)."""
    parts = []
    for err in e.errors(include_input=False, include_url=False):
        loc = [str(p) for p in err["loc"] if str(p) not in SECTIONS]
        parts.append(f"{'.'.join(loc) or 'deploy options'}: {err['msg']}")
    return "; ".join(parts)
