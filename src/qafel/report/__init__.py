"""Reports from run records (never re-runs training): ``tables`` (loading, grouping, aggregating, table.md and
table.csv), ``plots`` (the PNG plots), ``build`` (``write_report`` and the ``qafel-report`` command) and ``paper``
(the paper's published numbers beside ours).

Imports one way inside: build -> plots -> tables; paper -> build, tables. May import ``qafel.errors`` only; run
records are read from files, so nothing of ``qafel.experiment`` or ``qafel.sim`` is needed.
"""

from qafel.report.build import Report, build_report, main, write_report
from qafel.report.tables import (
    MB,
    ConfigGroup,
    ReportError,
    Row,
    RunRecord,
    Stat,
    TargetHit,
    aggregate,
    csv_table,
    down_bytes,
    find_run_dirs,
    fmt_stat,
    group_runs,
    load_run,
    load_runs,
    markdown_table,
    natural_key,
    quantizer_label,
    read_metrics,
    uploads_to_target,
)

__all__ = [
    "MB", "ConfigGroup", "Report", "ReportError", "Row", "RunRecord", "Stat", "TargetHit", "aggregate",
    "build_report", "csv_table", "down_bytes", "find_run_dirs", "fmt_stat", "group_runs", "load_run", "load_runs",
    "main", "markdown_table", "natural_key", "quantizer_label", "read_metrics", "uploads_to_target", "write_report",
]
