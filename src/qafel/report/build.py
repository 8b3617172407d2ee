"""The report as a whole: :func:`build_report` (load, group, aggregate), :func:`write_report` (table.md,
table.csv, the plots) and ``main``, the ``qafel-report`` command.

Imports one way: ``build`` -> ``plots`` -> ``tables`` (``paper`` -> ``build``, ``tables``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qafel.report.plots import plot_all
from qafel.report.tables import (
    ConfigGroup,
    ReportError,
    Row,
    RunRecord,
    aggregate,
    csv_table,
    group_runs,
    load_runs,
    markdown_table,
)


@dataclass
class Report:
    """What ``write_report`` produced."""

    runs: list[RunRecord]
    groups: list[ConfigGroup]
    rows: list[Row]
    markdown: str
    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # run directories left out, and why

    @property
    def main_table(self) -> str:
        """table.md without the per-seed section."""
        return markdown_table(self.rows, per_seed=False)

    def row(self, label: str) -> Row:
        """The row with this configuration label."""
        for r in self.rows:
            if r.group.label == label:
                return r
        raise KeyError(f"{label!r} not among {[r.group.label for r in self.rows]}")


def build_report(paths: Iterable[str | Path], target_accuracy: float | None = None) -> Report:
    """Load, group and aggregate the runs under ``paths`` (no files written)."""
    if target_accuracy is not None and not 0.0 <= target_accuracy <= 1.0:
        raise ReportError(f"--target-accuracy={target_accuracy}: must be in [0, 1]")
    skipped: list[tuple[Path, str]] = []
    runs = load_runs(list(paths), skipped)
    groups = group_runs(runs)
    rows = aggregate(groups, target_accuracy)
    markdown = markdown_table(rows)
    if skipped:
        markdown += "\n## Skipped run directories\n\n" + "".join(f"- `{d}`: {why}\n" for d, why in skipped)
    return Report(runs, groups, rows, markdown, [], skipped)


def write_report(paths: Iterable[str | Path], out_dir: str | Path = "report",
                 target_accuracy: float | None = None, plots: bool = True) -> Report:
    """Write table.md, table.csv and the PNG plots for the runs under ``paths`` into ``out_dir``."""
    report = build_report(paths, target_accuracy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report.markdown)
    (out / "table.csv").write_text(csv_table(report.rows))
    report.files = [out / "table.md", out / "table.csv"]
    if plots:
        report.files += plot_all(report.rows, out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The ``qafel-report`` command."""
    parser = argparse.ArgumentParser(
        prog="qafel-report",
        description="Tables (table.md, table.csv) and PNG plots from qafel run records. PATHs are run directories "
                    "or directories holding them anywhere below (sweeps, multiruns).")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run or sweep directories")
    parser.add_argument("--out", default="report", metavar="DIR", help="output directory (default: ./report)")
    parser.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                        help="recompute uploads to target for this accuracy (default: each run's own target)")
    parser.add_argument("--no-plots", action="store_true", help="write only table.md and table.csv")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.paths, args.out, target_accuracy=args.target_accuracy, plots=not args.no_plots)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for _, why in report.skipped:
        print(f"warning: run left out of the report: {why}", file=sys.stderr)
    print(report.markdown)
    print(f"wrote {len(report.files)} files to {Path(args.out)}: " + ", ".join(p.name for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
