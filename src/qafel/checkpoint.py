"""Checkpoints: the engine's complete state written atomically, and finding the run to resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qafel.errors import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
# Keys that may differ between a run and its resumption (where it is written, how it is shown and logged).
_IGNORED_ON_RESUME = ("resume", "paths", "tracking", "name")


def save_checkpoint(path: Path, engine_state: dict[str, Any], cfg: DictConfig) -> None:
    """Write ``{engine, config}`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"engine": engine_state, "config": OmegaConf.to_container(cfg)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (our own file: full unpickling)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def comparable(cfg: DictConfig | dict) -> dict[str, Any]:
    """The part of a config that must match for a checkpoint to belong to it."""
    data = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    data = {k: v for k, v in data.items() if k not in _IGNORED_ON_RESUME}
    data["run"] = {k: v for k, v in data.get("run", {}).items() if k != "progress"}
    return data


def find_resume_dir(resume: Any, cfg: DictConfig, output_dir: Path) -> Path:
    """The run directory to resume.

    ``resume`` is a path (that run directory) or ``true``: the current output directory if it holds a checkpoint,
    else the newest run directory beside it (Hydra's ``outputs/DATE/TIME``) whose checkpoint has this config.
    """
    if isinstance(resume, str) and resume.lower() not in ("true", "1", "yes"):
        run_dir = Path(resume)
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise ConfigError("resume", resume, f"no {CHECKPOINT_NAME} in that directory")
        return run_dir
    if (output_dir / CHECKPOINT_NAME).is_file():
        return output_dir
    want = comparable(cfg)
    root = output_dir.parent.parent
    candidates = sorted(root.glob(f"*/*/{CHECKPOINT_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in candidates:
        saved = OmegaConf.load(ckpt.parent / "config.yaml") if (ckpt.parent / "config.yaml").is_file() else None
        if saved is not None and comparable(saved) == want:
            return ckpt.parent
    raise ConfigError("resume", True, f"no checkpoint of a run with this config under {root}; pass resume=RUN_DIR")
