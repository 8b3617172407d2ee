"""Run records -> tables: loading run directories, grouping runs into configurations, aggregating seeds,
and the markdown and CSV tables (the first half of ``qafel-report``; see ``qafel.report.build``).

Reads run directories (``config.yaml``, ``metrics.jsonl``, ``summary.json``) given directly or found anywhere
below the given paths (sweep directories), groups the runs into configurations (the resolved config without
the seed and bookkeeping keys), aggregates seeds and writes ``table.md``, ``table.csv`` and PNG plots.

Uploads to target follow ALGORITHMS.md §7: K × (server steps at the first evaluation whose accuracy ≥ target),
with the bytes uploaded and broadcast and the simulated time (``sim_time``) at that evaluation. They are always
recomputed from ``metrics.jsonl``; the target is ``--target-accuracy`` when given, else each run's own
``target_accuracy``.

A run directory that cannot be trusted is left out with a warning naming it and the problem, and the report
goes on: a damaged ``metrics.jsonl`` line before the last (a torn last line, from a killed run, is skipped), no
evaluation records, an unreadable ``summary.json`` or ``config.yaml``, or a summary and config from different
runs (``run_id``, seed, algorithm, dataset or model disagree).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MB = 1e6  # bytes per MB in every table and plot

# Flattened config keys (or key prefixes) that do not make a different configuration: the seed, bookkeeping,
# and implementation choices that produce the same numbers.
IGNORED_KEYS = ("seed", "name", "device", "resume", "run_id", "paths", "tracking", "hydra", "run.progress", "run.codec",
                "run.client_batch", "run.eval_every", "run.target_accuracy", "run.compute_optimum", "run.trainer",
                "run.checkpoint_every", "algorithm.hidden_state_replicas")
# Keys shown in their own columns (everything else that varies between configurations is shown as extra columns).
_DESCRIBED = ("dataset.name", "model.name", "algorithm.name", "algorithm.buffer_size", "client.local_steps",
              "client.local_epochs", "client_quantizer", "server_quantizer")


class ReportError(Exception):
    """A problem with the report's inputs (shown to the user in one line)."""


# ----------------------------------------------------------------------------------------------- run records
@dataclass
class RunRecord:
    """One run directory: its resolved config, summary and evaluation records."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def flat_config(self) -> dict[str, Any]:
        """The config as dotted keys."""
        return flatten(self.config)

    @property
    def seed(self) -> Any:
        """The run's seed."""
        return self.config.get("seed", self.summary.get("seed"))

    @property
    def algorithm(self) -> str:
        """fedbuff, qafel or naive."""
        return str(_get(self.config, "algorithm.name") or self.summary.get("algorithm", "?"))

    @property
    def buffer_size(self) -> int:
        """K, the client updates per server step."""
        k = _get(self.config, "algorithm.buffer_size")
        if k is None:
            raise ReportError(f"{self.path}: config.yaml has no algorithm.buffer_size")
        return int(k)

    @property
    def target_accuracy(self) -> float | None:
        """The run's own target accuracy (summary, else config)."""
        t = self.summary.get("target_accuracy", _get(self.config, "run.target_accuracy"))
        return None if t is None else float(t)


@dataclass
class TargetHit:
    """The first evaluation whose accuracy reached the target."""

    uploads: int
    server_step: int
    bytes_up: int
    bytes_broadcast: int  # broadcast bytes plus naive's per-job model downloads
    record: dict[str, Any]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (lists are kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_run_dir(path: Path) -> bool:
    """A run directory holds both summary.json and metrics.jsonl."""
    return (path / "summary.json").is_file() and (path / "metrics.jsonl").is_file()


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories given directly or found recursively below the given paths (sweep directories)."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or directory")
        if p.is_file():
            p = p.parent
        if is_run_dir(p):
            found[p.resolve()] = None
            continue
        for summary in sorted(p.rglob("summary.json")):
            if is_run_dir(summary.parent):
                found[summary.parent.resolve()] = None
    return list(found)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Evaluation records from metrics.jsonl.

    A torn last line (a killed run) is skipped; a damaged line before it, or a file without any record, raises
    ReportError: those records cannot be trusted (uploads to target would silently move).
    """
    try:
        lines = [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read ({exc})") from None
    records = []
    for n, (line_no, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                continue
            raise ReportError(f"{path}:{line_no}: damaged record before the last line") from None
        if not isinstance(record, dict) or not isinstance(record.get("server_step"), int):
            raise ReportError(f"{path}:{line_no}: not an evaluation record (no integer server_step)")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: no evaluation records")
    records.sort(key=lambda r: r["server_step"])
    return records


# (summary.json key, config key) pairs that must agree when both are recorded.
_IDENTITY = (("run_id", "run_id"), ("seed", "seed"), ("algorithm", "algorithm.name"), ("dataset", "dataset.name"),
             ("model", "model.name"))


def load_run(path: str | Path) -> RunRecord:
    """Read one run directory (config from config.yaml, else Hydra's .hydra/config.yaml).

    Raises ReportError when a file is unreadable or damaged, or when summary.json and config.yaml come from
    different runs (their ``run_id``, seed, algorithm, dataset or model differ; ``run_id`` must be in both or
    neither, so records written before it existed still load).
    """
    path = Path(path)
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path / 'summary.json'}: cannot read ({exc})") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path / 'summary.json'}: not a JSON object")
    config: dict[str, Any] = {}
    source = None
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            try:
                config = yaml.safe_load(candidate.read_text()) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ReportError(f"{candidate}: cannot read ({' '.join(str(exc).split())})") from None
            source = candidate
            break
    if not isinstance(config, dict) or not config:
        raise ReportError(f"{path}: no config.yaml (needed for the configuration and K)")
    for s_key, c_key in _IDENTITY:
        if s_key == "run_id" and source is not None and source.parent != path:
            continue  # Hydra's copy is written before the run has an id
        a, b = summary.get(s_key), _get(config, c_key)
        if (a is None and b is None) or (s_key != "run_id" and (a is None or b is None)):
            continue
        if a != b:
            raise ReportError(f"{path}: summary.json and {source.name} come from different runs ({s_key} {a!r} in "
                              f"summary.json, {c_key} {b!r} in {source.name})")
    run = RunRecord(path, config, summary, read_metrics(path / "metrics.jsonl"))
    run.buffer_size  # noqa: B018 - fails here (and the run is skipped) rather than in the middle of a table
    return run


def load_runs(paths: Iterable[str | Path], skipped: list[tuple[Path, str]] | None = None) -> list[RunRecord]:
    """All run records under the given paths.

    A run directory that cannot be used is left out; with ``skipped`` given, it is appended there as
    ``(directory, problem)``, otherwise the ReportError is raised.
    """
    dirs = find_run_dirs(paths)
    if not dirs:
        raise ReportError("no run directories (summary.json + metrics.jsonl) under " + ", ".join(map(str, paths)))
    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except ReportError as exc:
            if skipped is None:
                raise
            skipped.append((d, str(exc)))
    if not runs:
        raise ReportError(f"no usable run directory: {len(skipped or [])} skipped, the first: "
                          f"{(skipped or [(None, '')])[0][1]}")
    return runs


def down_bytes(record: dict[str, Any]) -> int:
    """Server-to-client bytes: broadcasts, plus naive's per-job model downloads."""
    return int(record.get("bytes_broadcast") or 0) + int(record.get("bytes_down_naive") or 0)


def uploads_to_target(metrics: Sequence[dict[str, Any]], buffer_size: int, target: float | None) -> TargetHit | None:
    """Uploads received up to the first evaluation with accuracy ≥ target (None if never): the record's
    ``uploads`` (stale uploads dropped by ``server.max_staleness`` included, as ``bytes_up`` counts them), which is
    K × server steps (ALGORITHMS.md §7) when none is dropped; K × server steps for records without ``uploads``."""
    if target is None:
        return None
    for rec in sorted(metrics, key=lambda r: r.get("server_step", 0)):
        acc = rec.get("accuracy")
        if acc is not None and not (isinstance(acc, float) and math.isnan(acc)) and acc >= target:
            step = int(rec["server_step"])
            uploads = int(rec["uploads"]) if rec.get("uploads") is not None else buffer_size * step
            return TargetHit(uploads, step, int(rec.get("bytes_up") or 0), down_bytes(rec), rec)
    return None


# ----------------------------------------------------------------------------------------- configurations
def quantizer_label(q: dict[str, Any] | None) -> tuple[str, float | None]:
    """A short label and the bits per coordinate (None where that is not a fixed number) for a quantizer node."""
    if not q:
        return "fp32", 32
    name = q.get("name", "?")
    if name == "identity":
        return "fp32", 32
    if name == "qsgd":
        if q.get("levels") is not None:
            s = int(q["levels"])
            return f"qsgd s={s}", math.ceil(math.log2(2 * s + 1))
        return f"qsgd {q.get('bits')}b", q.get("bits")
    if name == "minmax":
        return f"minmax {q.get('bits')}b", q.get("bits")
    if name in ("topk", "randk"):
        if q.get("k") is not None:
            return f"{name} k={q['k']}", None
        return f"{name} {100 * float(q.get('fraction') or 0):g}%", None
    if name == "sign":
        return "sign", 1
    if name in ("fp16", "bf16"):
        return name, 16
    return str(name), q.get("bits")


def config_key(run: RunRecord) -> tuple[tuple[str, str], ...]:
    """What makes a configuration: every config key but the ignored ones (values as JSON for hashing)."""
    items = []
    for key, value in sorted(run.flat_config.items()):
        if any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS):
            continue
        items.append((key, json.dumps(value, sort_keys=True)))
    return tuple(items)


@dataclass
class ConfigGroup:
    """The runs (seeds) of one configuration."""

    key: tuple[tuple[str, str], ...]
    runs: list[RunRecord]
    columns: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def algorithm(self) -> str:
        """The algorithm of this configuration."""
        return self.runs[0].algorithm

    @property
    def flat(self) -> dict[str, Any]:
        """The configuration's keys and values."""
        return {k: json.loads(v) for k, v in self.key}


def _local_steps(flat: dict[str, Any]) -> str:
    if flat.get("client.local_steps") is not None:
        return str(flat["client.local_steps"])
    if flat.get("client.local_epochs") is not None:
        return f"{flat['client.local_epochs']} ep"
    return "?"


def group_runs(runs: Sequence[RunRecord]) -> list[ConfigGroup]:
    """Runs grouped by configuration (seeds together), with descriptive columns and short labels."""
    groups: dict[tuple, ConfigGroup] = {}
    for run in runs:
        key = config_key(run)
        groups.setdefault(key, ConfigGroup(key, [])).runs.append(run)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: (str(r.seed), str(r.path)))
    flats = [g.flat for g in out]
    # Keys that vary between configurations on the same dataset and model (what differs between datasets is
    # implied by the dataset).
    parts_of: dict[tuple, list[int]] = {}
    for i, f in enumerate(flats):
        parts_of.setdefault((f.get("dataset.name"), f.get("model.name")), []).append(i)

    def varying_in(idx: list[int], keys: Iterable[str]) -> set[str]:
        return {k for k in keys if len({json.dumps(flats[i].get(k), sort_keys=True) for i in idx}) > 1}

    all_keys = {k for f in flats for k in f if not any(k == d or k.startswith(d + ".") for d in _DESCRIBED)}
    local_vary = {i: varying_in(idx, all_keys) for idx in parts_of.values() for i in idx}
    extra = sorted(set().union(*local_vary.values())) if local_vary else []
    for g, flat in zip(out, flats, strict=True):
        cq, cbits = quantizer_label(g.runs[0].config.get("client_quantizer"))
        sq, sbits = quantizer_label(g.runs[0].config.get("server_quantizer"))
        g.columns = {"dataset": flat.get("dataset.name"), "model": flat.get("model.name"),
                     "algorithm": g.algorithm, "client_q": cq, "client_bits": cbits, "server_q": sq,
                     "server_bits": sbits, "K": flat.get("algorithm.buffer_size"), "P": _local_steps(flat)}
        g.columns.update({k: flat.get(k) for k in extra})
    data_varies = len(parts_of) > 1
    for idx in parts_of.values():
        kp_vary = {c for c in ("K", "P") if len({str(out[i].columns[c]) for i in idx}) > 1}
        for i in idx:
            g = out[i]
            parts = [g.algorithm]
            if g.algorithm != "fedbuff":
                parts.append(f"{g.columns['client_q']}/{g.columns['server_q']}")
            parts += [f"{c}={g.columns[c]}" for c in ("K", "P") if c in kp_vary]
            parts += [f"{c.split('.')[-1]}={g.columns[c]}" for c in extra if c in local_vary[i]]
            if data_varies:
                parts.append(f"[{g.columns['dataset']}/{g.columns['model']}]")
            g.label = " ".join(parts)
    _disambiguate(out, flats)
    order = {"fedbuff": 0, "naive": 1, "qafel": 2}
    out.sort(key=lambda g: (str(g.columns["dataset"]), order.get(g.algorithm, 3), natural_key(g.label)))
    return out


def natural_key(text: str) -> list[tuple[int, float, str]]:
    """Sort key that orders embedded numbers numerically (P=2 before P=16)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)]


def _disambiguate(groups: Sequence[ConfigGroup], flats: Sequence[dict[str, Any]]) -> None:
    """Append the differing keys to labels that two configurations share (e.g. a QSGD bucket size)."""
    by_label: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_label.setdefault(g.label, []).append(i)
    for idx in by_label.values():
        if len(idx) < 2:
            continue
        keys = sorted({k for i in idx for k in flats[i]}
                      - {k for k in flats[idx[0]] if all(flats[i].get(k) == flats[idx[0]].get(k) for i in idx)})
        for i in idx:
            groups[i].label += " " + " ".join(f"{'.'.join(k.split('.')[-2:])}={flats[i].get(k)}" for k in keys)


# --------------------------------------------------------------------------------------------- aggregation
@dataclass
class Stat:
    """Per-seed values of one quantity (None where a seed has no value, e.g. target not reached)."""

    values: list[float | None]

    @property
    def present(self) -> list[float]:
        """The values that exist and are finite."""
        return [float(v) for v in self.values if v is not None and math.isfinite(float(v))]

    @property
    def mean(self) -> float | None:
        """Mean over the seeds that have a value."""
        return statistics.fmean(self.present) if self.present else None

    @property
    def sd(self) -> float | None:
        """Sample standard deviation (None with fewer than two values)."""
        return statistics.stdev(self.present) if len(self.present) >= 2 else None


# The per-run quantities aggregated over seeds: name -> header in table.md.
QUANTITIES = {
    "uploads_to_target": "uploads to target",
    "mb_up_at_target": "MB up at target",
    "mb_broadcast_at_target": "MB broadcast at target",
    "time_to_target": "sim time to target",
    "final_accuracy": "final accuracy",
    "final_loss": "final loss",
    "suboptimality": "f − f*",
    "mb_up": "MB up (run)",
    "mb_broadcast": "MB broadcast (run)",
    "mb_total": "MB total (run)",
    "wall_time_s": "wall time (s)",
    "server_steps": "server steps",
}


def run_quantities(run: RunRecord, target: float | None) -> dict[str, float | None]:
    """One run's numbers for the table (uploads to target recomputed from its metrics)."""
    last = run.metrics[-1] if run.metrics else {}
    s = run.summary
    hit = uploads_to_target(run.metrics, run.buffer_size, target)
    up = s.get("bytes_up", last.get("bytes_up"))
    down = down_bytes(s) if "bytes_broadcast" in s else down_bytes(last)
    return {
        "uploads_to_target": hit.uploads if hit else None,
        "mb_up_at_target": hit.bytes_up / MB if hit else None,
        "mb_broadcast_at_target": hit.bytes_broadcast / MB if hit else None,
        "time_to_target": hit.record.get("sim_time") if hit else None,
        "final_accuracy": s.get("final_accuracy", last.get("accuracy")),
        "final_loss": s.get("final_loss", last.get("loss")),
        "suboptimality": s.get("suboptimality", last.get("suboptimality")),
        "mb_up": None if up is None else up / MB,
        "mb_broadcast": down / MB,
        "mb_total": None if up is None else (up + down) / MB,
        "wall_time_s": s.get("wall_time_s", last.get("wall_time_s")),
        "server_steps": s.get("server_steps", last.get("server_step")),
    }


@dataclass
class Row:
    """One configuration's aggregated numbers."""

    group: ConfigGroup
    stats: dict[str, Stat]
    targets: list[float | None]
    reference: ConfigGroup | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    ratio_basis: str | None = None

    @property
    def reached(self) -> str:
        """How many seeds reached the target, e.g. 2/3."""
        return f"{len(self.stats['uploads_to_target'].present)}/{len(self.targets)}"

    @property
    def status(self) -> str:
        """completed, or the count of each status."""
        counts: dict[str, int] = {}
        for run in self.group.runs:
            st = str(run.summary.get("status", "?"))
            counts[st] = counts.get(st, 0) + 1
        return "completed" if set(counts) == {"completed"} else ", ".join(f"{n} {k}" for k, n in counts.items())


def aggregate(groups: Sequence[ConfigGroup], target_accuracy: float | None = None) -> list[Row]:
    """Seed-aggregated rows, with ratios to the matching FedBuff configuration of the same report."""
    rows = []
    for g in groups:
        targets = [target_accuracy if target_accuracy is not None else r.target_accuracy for r in g.runs]
        per_run = [run_quantities(r, t) for r, t in zip(g.runs, targets, strict=True)]
        stats = {q: Stat([p[q] for p in per_run]) for q in QUANTITIES}
        rows.append(Row(g, stats, targets))
    for row in rows:
        ref = fedbuff_reference(row.group, [r.group for r in rows])
        if ref is not None:
            _set_ratios(row, next(r for r in rows if r.group is ref))
    return rows


def _context(group: ConfigGroup) -> dict[str, Any]:
    return {k: v for k, v in group.flat.items()
            if not (k == "algorithm.name" or k.startswith(("client_quantizer.", "server_quantizer.")))}


def fedbuff_reference(group: ConfigGroup, groups: Sequence[ConfigGroup]) -> ConfigGroup | None:
    """The FedBuff configuration to compare with: same everything but algorithm and quantizers, else the only
    FedBuff configuration on the same dataset and model."""
    fedbuffs = [g for g in groups if g.algorithm == "fedbuff"]
    ctx = _context(group)
    exact = [g for g in fedbuffs if _context(g) == ctx]
    if exact:
        return exact[0]
    same_data = [g for g in fedbuffs if g.columns["dataset"] == group.columns["dataset"]
                 and g.columns["model"] == group.columns["model"]]
    return same_data[0] if len(same_data) == 1 else None


#: The ratios to the FedBuff reference, in the order of the table's columns.
RATIOS = ("uploads_vs_fedbuff", "time_vs_fedbuff", "up_reduction", "broadcast_reduction")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _set_ratios(row: Row, ref: Row) -> None:
    """Uploads and simulated time to target relative to FedBuff, and how many times fewer MB up / broadcast: at
    the target when both reach the same target, else per server step over the whole run."""
    row.reference = ref.group
    s, r = row.stats, ref.stats
    same_target = len(set(row.targets) | set(ref.targets)) == 1 and row.targets[0] is not None
    if same_target and s["uploads_to_target"].mean is not None and r["uploads_to_target"].mean is not None:
        row.ratio_basis = "target"
        row.ratios = {"uploads_vs_fedbuff": _ratio(s["uploads_to_target"].mean, r["uploads_to_target"].mean),
                      "time_vs_fedbuff": _ratio(s["time_to_target"].mean, r["time_to_target"].mean),
                      "up_reduction": _ratio(r["mb_up_at_target"].mean, s["mb_up_at_target"].mean),
                      "broadcast_reduction": _ratio(r["mb_broadcast_at_target"].mean,
                                                    s["mb_broadcast_at_target"].mean)}
        return

    def per_step(stats: dict[str, Stat], q: str) -> float | None:
        return _ratio(stats[q].mean, stats["server_steps"].mean)

    row.ratio_basis = "per server step"
    row.ratios = {"uploads_vs_fedbuff": None, "time_vs_fedbuff": None,
                  "up_reduction": _ratio(per_step(r, "mb_up"), per_step(s, "mb_up")),
                  "broadcast_reduction": _ratio(per_step(r, "mb_broadcast"), per_step(s, "mb_broadcast"))}


# -------------------------------------------------------------------------------------------------- tables
def _num(v: float | None, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "acc":
        return f"{v:.4f}"
    if kind == "sci":
        return f"{v:.3e}"
    if kind == "x":
        return f"{v:.2f}×"
    return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"


_KIND = {"uploads_to_target": "int", "final_accuracy": "acc", "final_loss": "sci", "suboptimality": "sci",
         "server_steps": "int"}


def fmt_stat(stat: Stat, kind: str) -> str:
    """mean ± sd (sd only with two or more values)."""
    if stat.mean is None:
        return "—"
    text = _num(stat.mean, kind)
    return text if stat.sd is None else f"{text} ± {_num(stat.sd, kind)}"


def _shown_quantities(rows: Sequence[Row]) -> list[str]:
    qs = []
    any_target = any(t is not None for row in rows for t in row.targets)
    for q in QUANTITIES:
        if q.endswith("at_target") or q in ("uploads_to_target", "time_to_target"):
            if any_target:
                qs.append(q)
        elif q == "final_loss":
            if not any(row.stats["suboptimality"].present for row in rows):
                qs.append(q)
        elif q == "server_steps":
            continue
        elif any(row.stats[q].present for row in rows):
            qs.append(q)
    return qs


def _describe_targets(rows: Sequence[Row]) -> str:
    targets = sorted({t for row in rows for t in row.targets if t is not None})
    if not targets:
        return "no target accuracy (uploads to target not computed)"
    return "target accuracy " + ", ".join(f"{t:g}" for t in targets)


def markdown_table(rows: Sequence[Row], per_seed: bool = True) -> str:
    """table.md: one row per configuration (mean ± sd over seeds), then (``per_seed``) every run's own values."""
    if not rows:
        return "No runs.\n"
    cols = list(rows[0].group.columns)
    const = {c: rows[0].group.columns[c] for c in cols
             if len({str(r.group.columns[c]) for r in rows}) == 1 and c in ("dataset", "model")}
    desc_cols = [c for c in cols if c not in const and c not in ("client_bits", "server_bits")]
    qs = _shown_quantities(rows)
    n_runs = sum(len(r.group.runs) for r in rows)
    lines = [f"# qafel report: {n_runs} runs, {len(rows)} configurations", ""]
    if const:
        lines.append(" · ".join(f"{k} **{v}**" for k, v in const.items()) + " · " + _describe_targets(rows))
    else:
        lines.append(_describe_targets(rows))
    lines.append("")
    header = ["configuration", *[_COLUMN_NAMES.get(c, c) for c in desc_cols], "seeds", "status"]
    header += [QUANTITIES[q] for q in qs]
    if any(t is not None for row in rows for t in row.targets):
        header.insert(header.index("uploads to target") + 1, "reached")
    has_ref = any(r.reference is not None for r in rows)
    if has_ref:
        header += ["uploads ÷ FedBuff", "sim time ÷ FedBuff", "× fewer MB up", "× fewer MB broadcast", "basis"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        g = row.group
        cells = [g.label, *[str(g.columns[c]) for c in desc_cols], str(len(g.runs)), row.status]
        for q in qs:
            cells.append(fmt_stat(row.stats[q], _KIND.get(q, "mb")))
            if q == "uploads_to_target":
                cells.append(row.reached)
        if has_ref:
            cells += [_num(row.ratios.get(k), "x") for k in RATIOS]
            cells.append(row.ratio_basis or "—")
        lines.append("| " + " | ".join(cells) + " |")
    note = "MB = 10^6 bytes. Broadcast bytes include naive's per-job model downloads."
    if has_ref:
        note += (" Ratios compare each configuration with the FedBuff configuration of this report that differs "
                 "only in algorithm and quantizers (basis: at the target when both reach it, else bytes per server "
                 "step over the run).")
    lines += ["", note]
    if not per_seed:
        return "\n".join(lines) + "\n"
    lines += ["", "## Per-seed values", ""]
    seed_qs = [q for q in qs if q in ("uploads_to_target", "mb_up_at_target", "mb_broadcast_at_target",
                                       "time_to_target", "final_accuracy", "suboptimality", "final_loss", "mb_total")]
    lines += ["| configuration | seed | status | " + " | ".join(QUANTITIES[q] for q in seed_qs) + " | run |",
              "|" + "---|" * (len(seed_qs) + 4)]
    for row in rows:
        for i, run in enumerate(row.group.runs):
            vals = [_num(row.stats[q].values[i], _KIND.get(q, "mb")) for q in seed_qs]
            lines.append(f"| {row.group.label} | {run.seed} | {run.summary.get('status', '?')} | "
                         + " | ".join(vals) + f" | `{run.path}` |")
    return "\n".join(lines) + "\n"


_COLUMN_NAMES = {"client_q": "client", "server_q": "server"}


def csv_table(rows: Sequence[Row]) -> str:
    """table.csv: one row per configuration; for each quantity its mean, sd and per-seed values (;-separated)."""
    buf = io.StringIO()
    if not rows:
        return ""
    cols = list(rows[0].group.columns)
    header = ["configuration", *cols, "seeds", "n_seeds", "status", "target_accuracy", "reached"]
    for q in QUANTITIES:
        header += [f"{q}_mean", f"{q}_sd", f"{q}_values"]
    header += ["fedbuff_reference", *RATIOS, "ratio_basis", "run_dirs"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        g = row.group
        targets = sorted({t for t in row.targets if t is not None})
        out: list[Any] = [g.label, *[g.columns[c] for c in cols], ";".join(str(r.seed) for r in g.runs),
                          len(g.runs), row.status, ";".join(f"{t:g}" for t in targets), row.reached]
        for q in QUANTITIES:
            st = row.stats[q]
            out += [_csv(st.mean), _csv(st.sd), ";".join(_csv(v) for v in st.values)]
        out += [row.reference.label if row.reference else "",
                *[_csv(row.ratios.get(k)) for k in RATIOS],
                row.ratio_basis or "", ";".join(str(r.path) for r in g.runs)]
        w.writerow(out)
    return buf.getvalue()


def _csv(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.10g}"
    return str(v)
