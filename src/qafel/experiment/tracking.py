"""Run records: metrics.jsonl, summary.json and run.json in the run directory, plus W&B (offline by default).

``run.json`` (beside ``config.yaml``) records how a run came to be: its W&B id, name, group, tags and job type,
Hydra's group choices, the overrides and the command that reruns it, and for sweep trials the trial and its
outcome. W&B runs are built from these records (``qafel.experiment.wandb_runs``), live or afterwards with
``qafel-wandb``.

Tracking never stops a run: if W&B is missing or fails, we warn and keep the local records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qafel.errors import OutputError
from qafel.experiment.checkpoint import remove_quietly
from qafel.signals import deferred_signals

if TYPE_CHECKING:
    from qafel.experiment.wandb_runs import WandbTracker

#: The origin record of a run, beside config.yaml.
ORIGIN_FILE = "run.json"
#: Overrides left out of the rerun command: they point at this run's directory or identity.
_NOT_RERUN = ("paths.output_dir", "resume", "run_id")

# scheme://user:PASSWORD@host and libpq's password=PASSWORD
_PASSWORDS = re.compile(r"(?P<head>\b[A-Za-z][\w+.-]*://[^/\s:@]*:)[^@\s]+@|(?P<kv>\bpassword=)[^\s&;]+")


def hide_passwords(text: str) -> str:
    """The text with the password of every URL (``postgresql://user:***@host``) and ``password=`` hidden."""
    return _PASSWORDS.sub(lambda m: f"{m['head']}***@" if m["head"] else f"{m['kv']}***", text)


def hide_passwords_in(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every string's passwords hidden."""
    if isinstance(value, str):
        return hide_passwords(value)
    if isinstance(value, Mapping):
        return {k: hide_passwords_in(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [hide_passwords_in(v) for v in value]
    return value


@contextmanager
def redacted_argv() -> Iterator[None]:
    """``sys.argv`` with passwords hidden while the block runs: ``wandb.init`` records the command line as the
    run's ``args`` (its metadata), and a ``--storage`` URL may hold one."""
    saved = list(sys.argv)
    sys.argv[:] = [hide_passwords(a) for a in saved]
    try:
        yield
    finally:
        sys.argv[:] = saved


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class RunRecorder:
    """Writes one JSON line per evaluation to ``metrics.jsonl`` and the final ``summary.json``.

    A write that fails (directory not writable, disk full) raises an OutputError naming the file; the lines
    written before it stay in the file.
    """

    def __init__(self, run_dir: Path, history: list[Mapping[str, Any]] | None = None) -> None:
        """Start ``metrics.jsonl`` afresh, with ``history`` (a resumed run's records so far) written first."""
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        with _writing(self.metrics_path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.metrics_path, "w")  # noqa: SIM115 - kept open for the run's lifetime
        for record in history or []:
            self.log(record)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record (flushed at once, so a killed run keeps what it logged)."""
        with _writing(self.metrics_path):
            self._fh.write(json.dumps(_jsonable(dict(record))) + "\n")
            self._fh.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically (a failed write leaves no temporary file behind)."""
        write_json(self.summary_path, dict(summary))

    def close(self) -> None:
        """Close the metrics file (a failing final flush is ignored: every line was flushed when logged)."""
        with suppress(OSError):
            self._fh.close()


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a one-line OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); the records written so far are kept") \
            from None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path), deferred_signals():
        try:
            tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise


def read_json(path: Path) -> Any:
    """The JSON in ``path``; None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------- names, tags, origin
def quantizer_label(q: Mapping[str, Any]) -> str:
    """A quantizer in a few characters: ``fp32`` (identity), ``qsgd4b`` (4 bits), ``qsgd4`` (QSGD s = 4 levels),
    ``topk0.01`` (fraction), ``topk_k100`` (k), else its name (``fp16``, ``bf16``, ``sign``)."""
    name = str(q.get("name") or "none")
    if name == "identity":
        return "fp32"
    for key, fmt in (("bits", "{}{}b"), ("levels", "{}{}"), ("fraction", "{}{}"), ("k", "{}_k{}")):
        value = q.get(key)
        if value is not None:
            return fmt.format(name, f"{value:g}" if isinstance(value, float) else value)
    return name


def default_run_name(cfg: Mapping[str, Any]) -> str:
    """``ALGORITHM-CLIENT-SERVER-K<buffer size>-P<local steps>|E<local epochs>-s<seed>`` with the quantizers as
    ``quantizer_label`` writes them, e.g. ``qafel-qsgd4b-qsgd4b-K10-P5-s0`` (the default run) or
    ``qafel-qsgd4-qsgd8-K10-P10-s0`` (experiment=paper_logreg: QSGD s = 4 up, s = 8 down)."""
    client = cfg.get("client") or {}
    local = f"P{client.get('local_steps')}" if client.get("local_steps") is not None else \
        f"E{client.get('local_epochs')}"
    algorithm = cfg.get("algorithm") or {}
    return "-".join([str(algorithm.get("name")), quantizer_label(cfg.get("client_quantizer") or {}),
                     quantizer_label(cfg.get("server_quantizer") or {}), f"K{algorithm.get('buffer_size')}", local,
                     f"s{cfg.get('seed')}"])


def run_tags(cfg: Mapping[str, Any], choices: Mapping[str, Any] | None = None,
             extra: Sequence[str] = ()) -> list[str]:
    """``algorithm:``, ``client:`` and ``server:`` (quantizer labels), ``experiment:`` (when one was chosen),
    ``dataset:`` and ``model:`` tags, then ``tracking.tags`` and ``extra``, each once (those the config lacks
    are left out)."""
    def name(node: str) -> Any:
        return (cfg.get(node) or {}).get("name")

    tags = [f"algorithm:{name('algorithm')}" if name("algorithm") else None]
    for side, node in (("client", "client_quantizer"), ("server", "server_quantizer")):
        tags.append(f"{side}:{quantizer_label(cfg[node])}" if cfg.get(node) else None)
    tags.append(f"experiment:{choices['experiment']}" if choices and choices.get("experiment") else None)
    tags += [f"{node}:{name(node)}" if name(node) else None for node in ("dataset", "model")]
    tags += [str(t) for t in ((cfg.get("tracking") or {}).get("tags") or [])] + list(extra)
    return [t[:64] for t in dict.fromkeys(tags) if t]  # W&B tags hold at most 64 characters


def rerun_command(overrides: Sequence[str] | None) -> str | None:
    """``python run.py OVERRIDES`` (without those naming this run's directory or id); None when unknown."""
    if overrides is None:
        return None
    from qafel.experiment.compose import override_key

    kept = [hide_passwords(o) for o in overrides if override_key(o) not in _NOT_RERUN]
    return shlex.join(["python", "run.py", *kept])


def wandb_run_id(run_id: str) -> str:
    """The W&B run id of a run: its ``run_id`` when W&B accepts it as an id, else a hash of it."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        return run_id
    return hashlib.sha1(run_id.encode()).hexdigest()[:32]


def multirun_group(sweep_dir: str | Path) -> str:
    """A multirun's W&B group: its sweep directory's name (``DATE_TIME`` for Hydra's ``multirun/DATE/TIME``)."""
    path = Path(sweep_dir)
    if re.fullmatch(r"\d{2}-\d{2}-\d{2}", path.name) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name):
        return f"{path.parent.name}_{path.name}"
    return path.name


@dataclass
class RunOrigin:
    """What the caller of a run knows about where it comes from (run.py: Hydra; sweeps: the trial).

    ``wandb_dir`` is the folder, relative to the run directory, whose ``wandb/`` holds the run's offline W&B
    logs: the run directory itself, or the multirun's or sweep's directory, so that one ``wandb sync`` finds
    every run of a multirun or sweep.
    """

    job_type: str = "run"
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    choices: dict[str, Any] | None = None
    overrides: list[str] | None = None
    wandb_dir: str = "."
    trial: dict[str, Any] | None = None


def origin_record(cfg: Mapping[str, Any], origin: RunOrigin | None = None) -> dict[str, Any]:
    """What run.json holds for a run of ``cfg`` (its ``run_id`` set): the origin with the W&B id, name
    (``origin.name``, else ``tracking.name``, else ``name``, else ``default_run_name``), group (``tracking.group``,
    else ``origin.group``) and tags filled in, and the rerun command."""
    origin = origin or RunOrigin()
    tracking = cfg.get("tracking") or {}
    choices = {k: v for k, v in (origin.choices or {}).items() if not k.startswith("hydra")} or None
    record = asdict(origin)
    record.update({
        "name": origin.name or tracking.get("name") or cfg.get("name") or default_run_name(cfg),
        "group": tracking.get("group") or origin.group,
        "tags": run_tags(cfg, choices, origin.tags),
        "choices": choices,
        "overrides": None if origin.overrides is None else [hide_passwords(o) for o in origin.overrides],
        "command": rerun_command(origin.overrides),
        "outcome": None,
    })
    run_id = str(cfg.get("run_id"))
    return {"run_id": run_id, "wandb_id": wandb_run_id(run_id), **record}


def read_origin(run_dir: Path) -> dict[str, Any] | None:
    """The run's run.json, or None when it has none (runs made before it existed)."""
    data = read_json(Path(run_dir) / ORIGIN_FILE)
    return data if isinstance(data, dict) else None


def write_origin(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Write run.json atomically."""
    write_json(Path(run_dir) / ORIGIN_FILE, dict(record))


def offline_runs(root: Path, wandb_id: str | None = None) -> list[Path]:
    """The offline W&B run folders in ``root/wandb`` (those of one W&B run id, if given), oldest first."""
    pattern = f"run-{wandb_id}.wandb" if wandb_id else "run-*.wandb"
    return [p for p in sorted((Path(root) / "wandb").glob("offline-run-*"))
            if p.is_dir() and not p.is_symlink() and any(p.glob(pattern))]


def sync_hint(run_dir: Path) -> str | None:
    """``wandb sync DIR`` for the folder holding this run's offline W&B log (with those of its multirun or
    sweep), or None when the run has none."""
    origin = read_origin(run_dir)
    if not origin or not origin.get("wandb_id"):
        return None
    root = Path(run_dir) / origin.get("wandb_dir", ".")
    if not offline_runs(root, origin["wandb_id"]):
        return None
    return shlex.join(["wandb", "sync", os.path.normpath(root / "wandb")])


def make_tracker(cfg: Mapping[str, Any], run_dir: Path, origin: Mapping[str, Any]) -> WandbTracker | None:
    """The W&B tracker for ``tracking`` node ``cfg`` (None for ``tracking=none`` or mode disabled)."""
    if cfg.get("backend", "none") != "wandb" or cfg.get("mode") == "disabled":
        return None
    from qafel.experiment.wandb_runs import WandbTracker

    return WandbTracker(cfg, run_dir, origin)
