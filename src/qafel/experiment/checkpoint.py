"""Checkpoints: the engine's complete state written atomically, read back safely, and finding the run to resume.

A checkpoint holds only tensors, numbers, strings, bytes, lists and dicts, and is read with
``torch.load(weights_only=True)``: a crafted ``checkpoint.pt`` cannot run code, it is refused.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from qafel.errors import CheckpointError, OutputError
from qafel.experiment.compose import override_key
from qafel.signals import deferred_signals

CHECKPOINT_NAME = "checkpoint.pt"
# Keys that may differ between a run and its resumption (where it is written, how it is shown and logged).
_IGNORED_ON_RESUME = ("resume", "paths", "tracking", "name", "run_id")
# Overrides that resume=RUN_DIR accepts beside itself (the rest of the config is the run's own).
RESUME_OVERRIDES = ("resume", "run.progress")


def tmp_path(path: Path) -> Path:
    """The temporary file ``save_checkpoint`` writes before renaming it to ``path``."""
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path: Path, engine_state: dict[str, Any], cfg: DictConfig) -> None:
    """Write ``{engine, config}`` to ``path`` via a temporary file and an atomic rename.

    If the write fails (an error, a full disk) the temporary file is removed and the previous checkpoint stays
    as it was; write errors become an OutputError. SIGTERM or Ctrl-C during the write take effect once it is
    done (``qafel.signals``).
    """
    path = Path(path)
    tmp = tmp_path(path)
    with deferred_signals():
        try:
            with open(tmp, "wb") as fh:  # a Python file: write errors arrive as OSError (ENOSPC, EACCES)
                torch.save({"engine": engine_state, "config": OmegaConf.to_container(cfg)}, fh)
            os.replace(tmp, path)
        except BaseException as exc:
            remove_quietly(tmp)
            cause = _os_error(exc)
            if cause is not None:
                raise OutputError(f"{path}: cannot write the checkpoint ({_one_line(cause)}); the previous "
                                  "checkpoint and the records so far are kept") from None
            raise


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind ``exc`` (torch reports a failed write in mid-file as a RuntimeError after it)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it is there; an error doing so is ignored (we are already handling one)."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` without executing anything from the file.

    A missing, truncated, corrupt or unsafe file (one that would need a class or function to be unpickled)
    raises a one-line CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with warnings.catch_warnings():  # torch warns about unfamiliar pickle protocols before refusing them
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: it holds more than tensors, numbers, strings, lists and dicts "
                              f"({_unpickler_reason(exc)}); nothing from it was run") from None
    except Exception as exc:  # noqa: BLE001 - every way a corrupt or truncated file fails is one answer
        raise CheckpointError(f"{path}: refused: corrupt or truncated checkpoint ({_one_line(exc)})") from None
    if not (isinstance(data, dict) and isinstance(data.get("engine"), dict) and isinstance(data.get("config"), dict)
            and "server_step" in data["engine"]):
        raise CheckpointError(f"{path}: refused: not a qafel checkpoint (no engine state and config)")
    return data


def _unpickler_reason(exc: BaseException) -> str:
    """The core of torch's long weights-only message, e.g. ``it would load posix.system``."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it would load {found.group(1)}"
    text = text.split("WeightsUnpickler error:", 1)[-1]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    parts = [p for p in (" ".join(p.split()) for p in text.split("\n\n")) if p and not p.startswith(boilerplate)]
    return _one_line(parts[0] if parts else text, 120)


def _one_line(exc: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def comparable(cfg: DictConfig | dict) -> dict[str, Any]:
    """The part of a config that must match for a checkpoint to belong to it."""
    data = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    data = {k: v for k, v in data.items() if k not in _IGNORED_ON_RESUME}
    if isinstance(data.get("run"), dict):
        data["run"] = {k: v for k, v in data["run"].items() if k != "progress"}
    return data


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (in ``a``'s order, then ``b``'s) whose values differ: ``(key, a's, b's)``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def check_config_matches(path: Path, checkpoint_config: dict[str, Any], cfg: DictConfig | dict,
                         what: str = "config.yaml") -> None:
    """Refuse to resume when ``cfg`` differs from the config saved inside the checkpoint (first key named)."""
    diff = first_difference(comparable(checkpoint_config), comparable(cfg))
    if diff is not None:
        key, saved, now = diff
        raise CheckpointError(f"{path}: refused: {what} differs from the config saved in the checkpoint at {key} "
                              f"({now!r} there, {saved!r} in the checkpoint); restore it or start a new run")


def load_run_config(run_dir: Path) -> DictConfig:
    """The saved ``config.yaml`` of a run directory to resume, checked against the config inside its checkpoint.

    ``config.yaml`` is written from the same validated config as the checkpoint, so any difference is an edit:
    CheckpointError names its first key (before validation, so that an edit to an unknown key or a bad value
    is reported the same way). A missing or unreadable file is a CheckpointError too.
    """
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: cannot resume without the run's config ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: cannot resume: not a YAML mapping")
    ckpt = Path(run_dir) / CHECKPOINT_NAME
    check_config_matches(ckpt, load_checkpoint(ckpt)["config"], data)
    return OmegaConf.create(data)


def resume_is_dir(resume: Any) -> bool:
    """True when ``resume`` names a run directory (not ``true``)."""
    return isinstance(resume, str) and resume.lower() not in ("true", "1", "yes")


def extra_resume_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides that resume=RUN_DIR cannot apply (all but ``RESUME_OVERRIDES``)."""
    return [o for o in overrides if override_key(o) not in RESUME_OVERRIDES]


def find_resume_dir(resume: Any, cfg: DictConfig, output_dir: Path) -> Path:
    """The run directory to resume.

    ``resume`` is a path (that run directory) or ``true``: the current output directory if it holds a checkpoint,
    else the newest run directory beside it (Hydra's ``outputs/DATE/TIME``) whose config matches this one.
    Directories owned by another user are never considered (their checkpoints are not this user's to load).
    """
    if resume_is_dir(resume):
        run_dir = Path(resume)
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"resume={resume}: no {CHECKPOINT_NAME} in that directory")
        return run_dir
    if (output_dir / CHECKPOINT_NAME).is_file():
        return output_dir
    want = comparable(cfg)
    root = output_dir.parent.parent
    uid = os.getuid() if hasattr(os, "getuid") else None
    candidates = []
    for ckpt in root.glob(f"*/*/{CHECKPOINT_NAME}"):
        try:
            st = ckpt.parent.stat()
            if uid is None or (st.st_uid == uid and ckpt.stat().st_uid == uid):
                candidates.append((ckpt.stat().st_mtime, ckpt))
        except OSError:
            continue
    for _, ckpt in sorted(candidates, key=lambda t: t[0], reverse=True):
        try:
            saved = yaml.safe_load((ckpt.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict) and comparable(saved) == want:
            return ckpt.parent
    raise CheckpointError(f"resume=True: no checkpoint of a run with this config under {root} (owned by you); "
                          "pass resume=RUN_DIR")
