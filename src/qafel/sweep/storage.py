"""The Optuna storage and study: URLs (SQLite, journal, PostgreSQL), opening them, and the checks that keep one
sweep directory to one study (``sweep.json``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from qafel.experiment.checkpoint import first_difference
from qafel.experiment.tracking import hide_passwords, read_json, write_json
from qafel.sweep.runtime import (
    GRACE_S,
    HEARTBEAT_S,
)
from qafel.sweep.spec import (
    OWNER_FILE,
    SPEC_FILE,
    SweepError,
    SweepPlan,
    SweepRefused,
    make_pruner,
    make_sampler,
    spec_fingerprint,
)


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The storage URL: default a SQLite file in the sweep directory; a bare ``.db`` path is SQLite,
    a bare ``.log``/``.jsonl`` path is an Optuna journal file (``journal:PATH`` too)."""
    if not storage:
        return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    if "://" in storage or storage.startswith("journal:"):
        return storage
    path = Path(storage).resolve()
    if path.suffix in (".log", ".jsonl", ".journal"):
        return f"journal:{path}"
    return f"sqlite:///{path}"


def _with_driver(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy 2.1 defaults to psycopg 3, qafel ships psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL: RDB (SQLite, PostgreSQL, MySQL) with heartbeats, or a journal file."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # heartbeats: a trial whose process died (killed machine) is failed after grace_period and rerun once
            return optuna.storages.RDBStorage(
                _with_driver(url), engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as exc:
        raise SweepError(f"storage {redact(url)}: the database driver is missing ({exc}); for PostgreSQL: "
                         "pip install psycopg2-binary") from None
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a driver traceback
        raise SweepError(f"cannot open storage {redact(url)}: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def redact(url: str) -> str:
    """The storage URL with any password hidden."""
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("://", 1)[0] + "://***"


def _check_same_sweep(study: optuna.study.FrozenStudy, plan: SweepPlan) -> None:
    """Refuse a study that was created from another sweep spec or with other objectives' directions."""
    where = f"study {plan.study_name!r} in {redact(plan.storage)}"
    theirs = [d.name.lower() for d in study.directions]
    ours = [o.direction for o in plan.spec.objectives]
    if theirs != ours:
        raise SweepRefused(f"{where} has directions {theirs}, this sweep {ours}: use another --study-name")
    saved = study.user_attrs.get("spec")
    mine = spec_fingerprint(plan.spec, plan.fixed)
    if saved is not None and "config" in saved and "config" in mine:
        diff = first_difference(saved["config"], mine["config"])
        if diff is not None:
            key, theirs_value, ours_value = diff
            raise SweepRefused(f"{where} ran its trials with {key}={theirs_value!r}, this command with "
                               f"{key}={ours_value!r} (its overrides or config differ): use another --study-name, "
                               "or the study's own overrides")
    if saved is not None:  # studies made before the shared config was recorded: compare what they hold
        saved, mine = ({k: v for k, v in d.items() if k != "config"} for d in (saved, mine))
    if saved is not None and saved != mine:
        diff = ", ".join(k for k in mine if saved.get(k) != mine[k])
        raise SweepRefused(f"{where} was made from another sweep ({study.user_attrs.get('sweep')}; this one, "
                           f"{plan.spec.source}, differs in {diff}): use another --study-name")


def _owner_record(plan: SweepPlan) -> dict[str, Any]:
    default = plan.storage == storage_url(None, plan.sweep_dir)
    return {"study": plan.study_name, "storage": None if default else redact(plan.storage),
            "sweep": plan.spec.source}


def check_sweep_dir(plan: SweepPlan, count_trials: Callable[[], int]) -> None:
    """Refuse a sweep directory that holds another study's records: its ``sweep.json`` names another study
    (or storage), or ``trials/`` holds a folder with a number this study has not reached."""
    owner = plan.sweep_dir / OWNER_FILE
    mine = _owner_record(plan)
    if owner.is_file():
        try:
            theirs = json.loads(owner.read_text())
        except (OSError, ValueError):
            raise SweepRefused(f"{owner} is not a qafel sweep record (unreadable JSON): use another "
                               "--sweep-dir") from None
        if (theirs.get("study"), theirs.get("storage")) != (mine["study"], mine["storage"]):
            store = f" in {theirs['storage']}" if theirs.get("storage") else ""
            raise SweepRefused(f"{plan.sweep_dir} holds study {theirs.get('study')!r}{store}: use another --sweep-dir "
                               f"for study {plan.study_name!r}, or --study-name {theirs.get('study')} (with its "
                               "storage) to resume that one")
    # listed before the study's trials are counted: a live worker may add a trial and its folder meanwhile
    folders = sorted(d for d in (plan.sweep_dir / "trials").glob("*") if d.is_dir())
    if folders:
        n = count_trials()
        for d in folders:
            if not (d.name.isdigit() and int(d.name) < n) and any(d.iterdir()):
                raise SweepRefused(f"{d} holds records that study {plan.study_name!r} did not write (it has {n} "
                                   "trials): use another --sweep-dir")


def _write_owner(plan: SweepPlan) -> None:
    owner = plan.sweep_dir / OWNER_FILE
    if not owner.exists():
        tmp = owner.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_owner_record(plan), indent=2) + "\n")
        os.replace(tmp, owner)


def create_or_load_study(plan: SweepPlan) -> optuna.Study:
    """Create the study in its storage, or load it to resume; refuse (SweepRefused, before writing anything) a
    study made from another sweep spec, and a sweep directory that holds another study's records."""
    storage = open_storage(plan.storage)
    existing = next((s for s in storage.get_all_studies() if s.study_name == plan.study_name), None)
    if existing is not None:
        _check_same_sweep(existing, plan)

    def count_trials() -> int:
        if existing is None:
            return 0
        return len(optuna.load_study(study_name=plan.study_name, storage=storage).get_trials(deepcopy=False))

    check_sweep_dir(plan, count_trials)
    directions = [o.direction for o in plan.spec.objectives]
    study = optuna.create_study(storage=storage, study_name=plan.study_name, directions=directions,
                                load_if_exists=True, sampler=make_sampler(plan.spec), pruner=make_pruner(plan.spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in plan.spec.objectives])
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", plan.spec.source)
        study.set_user_attr("objectives", [{"name": o.name, "metrics": o.metrics, "direction": o.direction}
                                           for o in plan.spec.objectives])
    if "spec" not in study.user_attrs:
        study.set_user_attr("spec", spec_fingerprint(plan.spec, plan.fixed))
    _write_owner(plan)
    write_spec_record(plan)
    return study


def _is_grid(plan: SweepPlan) -> bool:
    return plan.spec.sampler["name"] == "grid"


def write_spec_record(plan: SweepPlan) -> None:
    """``spec.json`` in the sweep directory: the study, its spec (base overrides, search space, objectives and
    directions, sampler, pruner), the overrides, the tracking settings and the summary run's W&B id, so that
    ``qafel-wandb`` rebuilds the summary run from the sweep's records alone."""
    from qafel.experiment.wandb_runs import sweep_summary_id

    path = plan.sweep_dir / SPEC_FILE
    old = read_json(path) or {}
    write_json(path, {
        "study": plan.study_name,
        "wandb_id": old.get("wandb_id") or sweep_summary_id(plan.study_name, redact(plan.storage)),
        "sweep": plan.spec.source, "storage": _owner_record(plan)["storage"],
        "overrides": [hide_passwords(o) for o in plan.overrides],
        **spec_fingerprint(plan.spec),
        "tracking": {k: plan.tracking.get(k) for k in ("backend", "project", "entity", "mode")}
        | {"tags": list(plan.tracking.get("tags") or [])},
    })
