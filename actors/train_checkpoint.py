"""A `PipelineTrainer`'s state on disk: `save` / `resume` (weights, optimizer state, RNG, step count and
data position of every stage) and `export` (a Hugging Face folder, or a peft adapter)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from actors.train_stage import to_torch
from models import ConfigError
from models.loading import read_config


class TrainerCheckpoints:
    """`PipelineTrainer`'s checkpoint and export methods (it holds `grid`, `config`, `source`, `steps`,
    `speeds`, `data` and the step boundary `_boundary`; `resume` deploys through its `deploy`)."""

    grid: list[list[Any]]
    config: dict[str, Any]
    source: str
    steps: int
    speeds: Any
    data: dict[str, Any]
    _boundary: Any

    def save(self, folder: str) -> str:
        """Weights, optimizer state and RNG of every stage, the step count and fit's data position, to
        `folder` (`resume` reads it). Written beside it and swapped in: a crash mid-save leaves the
        previous checkpoint whole. The wire's key is never written (`resume` takes it again)."""
        import shutil
        from pathlib import Path

        out = Path(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = out.with_name(out.name + ".saving"), out.with_name(out.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self._write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that failed leaves nothing half-written behind
            raise
        if out.exists():  # else a save stopped between its renames: `old` stays the checkpoint until `tmp` lands
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return str(out)

    def _write(self, tmp: Any) -> None:
        import json

        import ray

        states, rngs = self._boundary
        for s, state in enumerate(ray.get(states)):
            torch.save(to_torch(state), tmp / f"stage-{s}.pt")
        torch.save([ray.get(row) for row in rngs], tmp / "rng.pt")  # [copy][stage]
        meta = {k: v for k, v in self.config.items() if k != "wire_options"}
        if meta.get("wire"):  # never the key: resume takes it from $MESHPIPE_KEY or its `wire` argument
            meta["wire"] = {k: v for k, v in meta["wire"].items() if k != "encryption_key"}
        (tmp / "trainer.json").write_text(json.dumps({**meta, "steps": self.steps, "speeds": self.speeds,
                                                      "data": self.data}, indent=2))

    @classmethod
    def resume(cls, folder: str, name: str | None = None, wire: dict[str, Any] | None = None) -> Any:
        """A trainer deployed as the saved one was, its stages at the saved weights, optimizer state and RNG.
        `wire`: options over the saved ones (the encryption key, which a save never holds; else $MESHPIPE_KEY)."""
        from pathlib import Path

        import ray

        src = Path(folder)
        old = src.with_name(src.name + ".old")
        if not (src / "trainer.json").is_file() and (old / "trainer.json").is_file():
            src = old  # a save stopped between its two renames
        if not (src / "trainer.json").is_file():
            raise ConfigError(f"{folder} holds no trainer checkpoint (trainer.json): give a folder `save` wrote")
        meta = _checkpoint_meta(src, set(inspect.signature(cls.deploy).parameters))
        steps, speeds, data = meta.pop("steps"), meta.pop("speeds"), meta.pop("data", {})
        if name is not None:
            meta["name"] = name
        if wire is not None:
            meta["wire"] = {**(meta.get("wire") or {}), **wire}
        tr = cls.deploy(meta.pop("source"), **meta)
        try:
            saved = [torch.load(src / f"stage-{s}.pt", weights_only=True) for s in range(len(tr.grid[0]))]
            rngs = torch.load(src / "rng.pt", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            tr.shutdown()
            raise ConfigError(f"{folder}: a checkpoint file is missing or unreadable ({type(e).__name__}): "
                              "give a folder `save` wrote") from None
        if not _rng_grid_ok(rngs, len(tr.grid), len(tr.grid[0])):
            tr.shutdown()
            raise ConfigError(f"{folder}/rng.pt does not hold one RNG state per copy and stage: give a folder `save` wrote")
        ray.get([a.restore.remote(saved[s], rngs[d][s]) for d, row in enumerate(tr.grid) for s, a in enumerate(row)])
        tr.steps, tr.speeds, tr.data = steps, speeds, data
        tr._boundary = tr._snapshot()
        return tr

    def export(self, folder: str, adapter: bool = False) -> str:
        """The trained model as a Hugging Face folder (config.json + safetensors in the training dtype,
        transformers' names; LoRA merged; the source's tokenizer): transformers and
        `Pipeline.deploy` load it. `adapter=True` (LoRA): a peft adapter folder instead."""
        import ray

        if adapter:
            if self.config["lora"] is None:
                raise ConfigError("export(adapter=True) needs a LoRA trainer: this one trains every weight")
            from models.lora import LoraConfig, save_peft_adapter

            tensors: dict[str, torch.Tensor] = {}
            for sd in ray.get([a.state_dict.remote(False) for a in self.grid[0]]):
                tensors.update(sd)
            return str(save_peft_adapter(folder, LoraConfig.from_dict(self.config["lora"]), tensors))
        from models.loading import save_hf
        from models.tokenizer import load_tokenizer

        out = save_hf(folder, read_config(self.source), self.state_dict())
        tokenizer = load_tokenizer(self.source)
        if tokenizer is not None:  # a GGUF's tokenizer too: the folder stands on its own
            tokenizer.save(out)
        return str(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters under the model's names, LoRA merged (a tied head as `output.weight` too)."""
        import ray

        out: dict[str, torch.Tensor] = {}
        for sd in ray.get([a.state_dict.remote() for a in self.grid[0]]):
            out.update(sd)
        return out


def _checkpoint_meta(src: Any, deploy_keys: set[str]) -> dict[str, Any]:
    """trainer.json of a checkpoint folder, its fields checked before anything is deployed from it."""
    import json

    path = src / "trainer.json"
    if path.stat().st_size > 1 << 20:
        raise ConfigError(f"{path} is over 1 MiB: not a trainer checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON: give a folder `save` wrote") from None
    own = {"steps", "speeds", "data"}
    if not isinstance(meta, dict) or not {"source", "steps", "speeds"} <= set(meta):
        raise ConfigError(f"{path} lacks source, steps or speeds: give a folder `save` wrote")
    unknown = sorted(set(meta) - deploy_keys - own)
    if unknown:
        raise ConfigError(f"{path} has fields deploy does not take: {unknown}; was it written by another release?")
    if not (type(meta["steps"]) is int and meta["steps"] >= 0 and isinstance(meta.get("data", {}), dict)
            and (meta["speeds"] is None or isinstance(meta["speeds"], list))):
        raise ConfigError(f"{path}: steps must be an int >= 0, speeds a list or null, data an object")
    return meta


def _rng_grid_ok(rngs: Any, copies: int, stages: int) -> bool:
    """`rngs` is [copy][stage] of RNG states: {"cpu": uint8 tensor, maybe "cuda": ...} (or, from older
    checkpoints, the CPU's uint8 tensor alone)."""
    def state_ok(st: Any) -> bool:
        st = {"cpu": st} if isinstance(st, torch.Tensor) else st
        return isinstance(st, dict) and "cpu" in st and set(st) <= {"cpu", "cuda"} and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in st.values())
    return (isinstance(rngs, list) and len(rngs) == copies
            and all(isinstance(row, list) and len(row) == stages and all(map(state_ok, row)) for row in rngs))
