"""The report's PNG plots (matplotlib's object API, no pyplot state: safe in scripts, tests and notebooks).

Curves are averaged over a configuration's seeds at the server steps every seed evaluated; the shaded band is
the range over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qafel.report.tables import MB, Row, down_bytes

PLOT_FILES = ("accuracy_vs_uploads.png", "accuracy_vs_sim_time.png", "accuracy_vs_mb.png", "pareto.png",
              "loss_vs_steps.png", "staleness.png", "hidden_state_error.png")

_STYLE = {"fedbuff": "--", "naive": ":", "qafel": "-"}


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def mean_curve(row: Row, x: Callable[[dict[str, Any]], float | None], y: Callable[[dict[str, Any]], float | None]
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean y, min y, max y) over the configuration's seeds, at the server steps all seeds evaluated."""
    per_run = []
    for run in row.group.runs:
        pts = {}
        for rec in run.metrics:
            xv, yv = x(rec), y(rec)
            if xv is not None and yv is not None and math.isfinite(xv) and math.isfinite(yv):
                pts[rec.get("server_step")] = (xv, yv)
        per_run.append(pts)
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    xs, ys, lo, hi = [], [], [], []
    for s in steps:
        vals = [p[s] for p in per_run]
        xs.append(sum(v[0] for v in vals) / len(vals))
        yv = [v[1] for v in vals]
        ys.append(sum(yv) / len(yv))
        lo.append(min(yv))
        hi.append(max(yv))
    return xs, ys, lo, hi


def _curves(ax: Axes, rows: Sequence[Row], x: Callable, y: Callable, positive: bool = False,
            colors: Sequence[Any] | None = None) -> bool:
    drew = False
    for row, color in zip(rows, colors or _colors(len(rows)), strict=True):
        xs, ys, lo, hi = mean_curve(row, x, y)
        if positive:
            keep = [i for i, v in enumerate(lo) if v > 0]
            xs, ys, lo, hi = ([seq[i] for i in keep] for seq in (xs, ys, lo, hi))
        if not xs:
            continue
        drew = True
        label = row.group.label + (f" ({len(row.group.runs)} seeds)" if len(row.group.runs) > 1 else "")
        ax.plot(xs, ys, _STYLE.get(row.group.algorithm, "-"), color=color, label=label, lw=1.6)
        if len(row.group.runs) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
    return drew


def _legend(ax: Axes, n: int) -> None:
    ax.legend(fontsize="x-small" if n > 6 else "small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _target_line(ax: Axes, rows: Sequence[Row]) -> None:
    targets = sorted({t for r in rows for t in r.targets if t is not None})
    for t in targets:
        ax.axhline(t, color="0.5", lw=0.8, ls=(0, (4, 3)))
        ax.annotate(f"target {t:g}", (0, t), xycoords=("axes fraction", "data"), fontsize="x-small", color="0.4",
                    va="bottom")


def _acc(rec: dict[str, Any]) -> float | None:
    return rec.get("accuracy")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _wide(n: int) -> float:
    return 9.6 if n > 6 else 8.8


def plot_accuracy_vs_uploads(rows: Sequence[Row], path: Path) -> Path:
    """Test accuracy against client uploads."""
    fig = Figure(figsize=(_wide(len(rows)), 4.2))
    ax = fig.add_subplot()
    if _curves(ax, rows, lambda r: r.get("uploads"), _acc):
        _target_line(ax, rows)
        _legend(ax, len(rows))
    ax.set_xlabel("client uploads")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs uploads")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_sim_time(rows: Sequence[Row], path: Path) -> Path:
    """Test accuracy against simulated time (seconds under timing=trace; the timing's units otherwise)."""
    fig = Figure(figsize=(_wide(len(rows)), 4.2))
    ax = fig.add_subplot()
    if _curves(ax, rows, lambda r: r.get("sim_time"), _acc):
        _target_line(ax, rows)
        _legend(ax, len(rows))
    ax.set_xlabel("simulated time")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs simulated time")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_mb(rows: Sequence[Row], path: Path) -> Path:
    """Test accuracy against MB uploaded, MB broadcast and MB in total (log x)."""
    fig = Figure(figsize=(18, 4.2))
    axes = fig.subplots(1, 3, sharey=True)
    xs: list[tuple[str, Callable]] = [
        ("MB uploaded", lambda r: (r.get("bytes_up") or 0) / MB or None),
        ("MB broadcast", lambda r: down_bytes(r) / MB or None),
        ("MB total", lambda r: ((r.get("bytes_up") or 0) + down_bytes(r)) / MB or None),
    ]
    for ax, (name, fx) in zip(axes, xs, strict=True):
        if _curves(ax, rows, fx, _acc):
            ax.set_xscale("log")
            _target_line(ax, rows)
        ax.set_xlabel(name + " (log)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("Accuracy vs MB communicated")
    if any(ax.lines for ax in axes):
        _legend(axes[-1], len(rows))
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (minimise MB, maximise accuracy), sorted by MB."""
    front = []
    for i, (mb, acc) in enumerate(points):
        dominated = any((m <= mb and a >= acc) and (m < mb or a > acc) for j, (m, a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: Sequence[Row], path: Path) -> Path:
    """Final accuracy against total MB per configuration (mean ± sd over seeds), Pareto front highlighted."""
    fig = Figure(figsize=(_wide(len(rows)), 4.6))
    ax = fig.add_subplot()
    pts, idx = [], []
    for i, row in enumerate(rows):
        mb, acc = row.stats["mb_total"], row.stats["final_accuracy"]
        if mb.mean is not None and acc.mean is not None and mb.mean > 0:
            pts.append((mb.mean, acc.mean))
            idx.append(i)
    if not pts:
        _empty(ax, "no runs with a final accuracy")
    else:
        colors = _colors(len(rows))
        front = pareto_front(pts)
        for k, i in enumerate(idx):
            row = rows[i]
            mb, acc = row.stats["mb_total"], row.stats["final_accuracy"]
            marker = {"fedbuff": "s", "naive": "^"}.get(row.group.algorithm, "o")
            ax.errorbar(mb.mean, acc.mean, xerr=mb.sd, yerr=acc.sd, fmt=marker, color=colors[i], ms=7,
                        mec="black" if k in front else colors[i], label=row.group.label, capsize=2)
        fx, fy = [pts[k][0] for k in front], [pts[k][1] for k in front]
        ax.step(fx, fy, where="post", color="black", lw=1, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
        _legend(ax, len(rows))
    ax.set_xlabel("total MB communicated (up + broadcast, log)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Final accuracy vs total MB")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_loss_vs_steps(rows: Sequence[Row], path: Path) -> Path:
    """f(x) − f* (convex models) or test loss against server steps and against total MB, log y."""
    subopt = any(rec.get("suboptimality") is not None for row in rows for run in row.group.runs
                 for rec in run.metrics)
    key, name = ("suboptimality", "f(x) − f*") if subopt else ("loss", "test loss")
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    drew = _curves(axes[0], rows, lambda r: r.get("server_step"), lambda r: r.get(key), positive=True)
    _curves(axes[1], rows, lambda r: ((r.get("bytes_up") or 0) + down_bytes(r)) / MB or None,
            lambda r: r.get(key), positive=True)
    axes[0].set_xlabel("server steps")
    axes[1].set_xlabel("total MB communicated (log)")
    axes[0].set_ylabel(name + " (log)")
    if drew:
        for ax in axes:
            ax.set_yscale("log")
        axes[1].set_xscale("log")
        _legend(axes[1], len(rows))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{name} vs server steps and MB")
    return _save(fig, path)


def plot_staleness(rows: Sequence[Row], path: Path) -> Path:
    """Staleness τ of the applied updates: fraction per τ, summed over seeds."""
    fig = Figure(figsize=(_wide(len(rows)), 4.2))
    ax = fig.add_subplot()
    drew = False
    for row, color in zip(rows, _colors(len(rows)), strict=True):
        hist: dict[int, int] = {}
        for run in row.group.runs:
            for tau, n in (run.summary.get("staleness_histogram") or {}).items():
                hist[int(tau)] = hist.get(int(tau), 0) + int(n)
        total = sum(hist.values())
        if not total:
            continue
        drew = True
        taus = sorted(hist)
        ax.plot(taus, [hist[t] / total for t in taus], _STYLE.get(row.group.algorithm, "-"), marker="o", ms=3,
                color=color, label=f"{row.group.label} (mean τ {sum(t * hist[t] for t in taus) / total:.2f})")
    if drew:
        _legend(ax, len(rows))
    else:
        _empty(ax, "no staleness histograms in these runs")
    ax.set_xlabel("staleness τ (server steps between a job's start and its update being applied)")
    ax.set_ylabel("fraction of updates")
    ax.set_title("Staleness histogram")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_hidden_state_error(rows: Sequence[Row], path: Path) -> Path:
    """QAFeL's ‖x − x̂‖ against server steps (log y)."""
    colors = [c for r, c in zip(rows, _colors(len(rows)), strict=True) if r.group.algorithm == "qafel"]
    qrows = [r for r in rows if r.group.algorithm == "qafel"]
    fig = Figure(figsize=(_wide(len(qrows)), 4.2))
    ax = fig.add_subplot()
    if _curves(ax, qrows, lambda r: r.get("server_step"), lambda r: r.get("hidden_state_error"), positive=True,
               colors=colors):
        ax.set_yscale("log")
        _legend(ax, len(qrows))
    else:
        _empty(ax, "no QAFeL runs with a nonzero ‖x − x̂‖ in this report")
    ax.set_xlabel("server steps")
    ax.set_ylabel("‖x − x̂‖ (log)")
    ax.set_title("QAFeL hidden-state error")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_all(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Every plot of the report, as PNG files in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fns = (plot_accuracy_vs_uploads, plot_accuracy_vs_sim_time, plot_accuracy_vs_mb, plot_pareto, plot_loss_vs_steps,
           plot_staleness, plot_hidden_state_error)
    return [fn(rows, out / name) for fn, name in zip(fns, PLOT_FILES, strict=True)]
