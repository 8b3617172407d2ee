"""The paper's published numbers (Ortega & Jafarkhani, arXiv 2410.00242) and tables that put ours beside them.

Used by ``notebooks/paper_reproduction.ipynb``. Only numbers the paper publishes are here; nothing is
re-derived from figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qafel.report.build import Report
from qafel.report.tables import Row, fmt_stat

# CelebA, 3 seeds each, uploads to 90% test accuracy; min-max ("n-bit QSGD" in the paper) quantization.
PAPER_CELEBA: dict[str, dict[str, float]] = {
    "fedbuff": {"uploads_to_target": 26_057, "mb_up_at_target": 3_052, "mb_broadcast_at_target": 305},
    "qafel 4/4": {"uploads_to_target": 27_807, "mb_up_at_target": 428, "mb_broadcast_at_target": 43},
}
PAPER_CELEBA_TARGET = 0.90
PAPER_TWO_BIT_CLIENT_UPLOADS = (2.3, 3.5)  # 2-bit clients need 2.3-3.5x more uploads
# CIFAR-10 concurrency study (about 100, 500 and 1,000 concurrent clients), QAFeL 4/4 bits vs FedBuff.
PAPER_CIFAR_UPLOADS_VS_FEDBUFF = (0.98, 1.27)
PAPER_CIFAR_FEWER_MB_UP = (6.0, 7.7)
PAPER_CIFAR_CONCURRENCY = (100, 500, 1000)


def find_rows(report: Report, **columns: Any) -> list[Row]:
    """The report's rows whose descriptive columns equal the given values (e.g. algorithm="qafel", client_bits=4)."""
    return [r for r in report.rows if all(r.group.columns.get(k) == v for k, v in columns.items())]


def _one(rows: Sequence[Row]) -> Row | None:
    return rows[0] if len(rows) == 1 else None


def _range(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}×" if abs(hi - lo) < 5e-3 else f"{lo:.2f}–{hi:.2f}×"


def celeba_comparison(report: Report, quantizer: str = "minmax", stand_in: str = "digits") -> str:
    """Markdown: the paper's CelebA bit-grid numbers beside the same quantities from a bit-grid report."""
    fb = _one(find_rows(report, algorithm="fedbuff"))
    q44 = _one(find_rows(report, algorithm="qafel", client_bits=4, server_bits=4,
                         client_q=f"{quantizer} 4b", server_q=f"{quantizer} 4b"))
    two_bit = find_rows(report, algorithm="qafel", client_bits=2)
    targets = sorted({t for r in report.rows for t in r.targets if t is not None})
    ours_target = ", ".join(f"{t:g}" for t in targets) or "none"

    def stat(row: Row | None, q: str, kind: str) -> str:
        return "—" if row is None else fmt_stat(row.stats[q], kind)

    p_fb, p_q = PAPER_CELEBA["fedbuff"], PAPER_CELEBA["qafel 4/4"]
    lines = [f"| quantity | paper: CelebA, 3 seeds, target {PAPER_CELEBA_TARGET:g} | ours: {stand_in}, "
             f"{len(fb.group.runs) if fb else 0} seed(s), target {ours_target} |", "|---|---|---|"]
    for name, key, row, paper in (
            ("FedBuff uploads to target", "uploads_to_target", fb, p_fb),
            ("FedBuff MB up at target", "mb_up_at_target", fb, p_fb),
            ("FedBuff MB broadcast at target", "mb_broadcast_at_target", fb, p_fb),
            ("QAFeL 4/4 uploads to target", "uploads_to_target", q44, p_q),
            ("QAFeL 4/4 MB up at target", "mb_up_at_target", q44, p_q),
            ("QAFeL 4/4 MB broadcast at target", "mb_broadcast_at_target", q44, p_q)):
        kind = "int" if key == "uploads_to_target" else "mb"
        lines.append(f"| {name} | {paper[key]:,.0f} | {stat(row, key, kind)} |")
    ratios = q44.ratios if q44 is not None else {}
    lines += [
        f"| QAFeL 4/4 uploads ÷ FedBuff | {p_q['uploads_to_target'] / p_fb['uploads_to_target']:.2f}× | "
        f"{_range([ratios.get('uploads_vs_fedbuff')])} |",
        f"| QAFeL 4/4 × fewer MB up | {p_fb['mb_up_at_target'] / p_q['mb_up_at_target']:.1f}× | "
        f"{_range([ratios.get('up_reduction')])} |",
        f"| QAFeL 4/4 × fewer MB broadcast | {p_fb['mb_broadcast_at_target'] / p_q['mb_broadcast_at_target']:.1f}× | "
        f"{_range([ratios.get('broadcast_reduction')])} |",
        f"| QAFeL 2-bit clients: uploads ÷ FedBuff | {PAPER_TWO_BIT_CLIENT_UPLOADS[0]}–"
        f"{PAPER_TWO_BIT_CLIENT_UPLOADS[1]}× | {_range([r.ratios.get('uploads_vs_fedbuff') for r in two_bit])} |",
        f"| CIFAR-10, {'/'.join(map(str, PAPER_CIFAR_CONCURRENCY))} concurrent: QAFeL 4/4 uploads ÷ FedBuff | "
        f"{PAPER_CIFAR_UPLOADS_VS_FEDBUFF[0]}–{PAPER_CIFAR_UPLOADS_VS_FEDBUFF[1]}× | "
        f"{_range([ratios.get('uploads_vs_fedbuff')])} (one concurrency) |",
        f"| CIFAR-10: QAFeL 4/4 × fewer MB up | {PAPER_CIFAR_FEWER_MB_UP[0]}–{PAPER_CIFAR_FEWER_MB_UP[1]}× | "
        f"{_range([ratios.get('up_reduction')])} (one concurrency) |",
    ]
    return "\n".join(lines) + "\n"


def bit_grid(report: Report, quantity: str = "uploads_to_target", kind: str = "int",
             algorithm: str = "qafel") -> str:
    """Markdown pivot of one quantity: client bits down, server bits across (mean ± sd), FedBuff below."""
    rows = find_rows(report, algorithm=algorithm)
    cbits = sorted({r.group.columns["client_bits"] for r in rows if r.group.columns["client_bits"] is not None})
    sbits = sorted({r.group.columns["server_bits"] for r in rows if r.group.columns["server_bits"] is not None})
    lines = ["| client bits \\ server bits | " + " | ".join(f"{b:g}" for b in sbits) + " |",
             "|---|" + "---|" * len(sbits)]
    for cb in cbits:
        cells = []
        for sb in sbits:
            hit = [r for r in rows if r.group.columns["client_bits"] == cb and r.group.columns["server_bits"] == sb]
            if not hit:
                cells.append("")
                continue
            cell = fmt_stat(hit[0].stats[quantity], kind)
            done, n = hit[0].reached.split("/")
            if quantity.endswith("target") and done != n:
                cell += f" ({hit[0].reached} reached)"
            cells.append(cell)
        lines.append(f"| {cb:g} | " + " | ".join(cells) + " |")
    fb = find_rows(report, algorithm="fedbuff")
    if fb:
        lines.append(f"| FedBuff (fp32) | {fmt_stat(fb[0].stats[quantity], kind)} |" + " |" * (len(sbits) - 1))
    return "\n".join(lines) + "\n"
