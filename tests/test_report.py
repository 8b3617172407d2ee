"""qafel-report: uploads to target (ALGORITHMS.md §7), seed aggregation, tables and plots from run records."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO, compose_cfg

from qafel.report import (
    build_report,
    find_run_dirs,
    main,
    natural_key,
    quantizer_label,
    uploads_to_target,
    write_report,
)
from qafel.report.paper import PAPER_CELEBA, bit_grid, celeba_comparison
from qafel.report.plots import PLOT_FILES, pareto_front

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quantizer(name: str, bits: int | None = None) -> dict:
    return {"name": name, "bits": bits, "levels": None, "fraction": None, "k": None}


def make_run(path: Path, *, algorithm: str = "qafel", seed: int = 0, K: int = 10, P: int = 5,
             client: dict | None = None, server: dict | None = None, accs=(0.1, 0.5, 0.8, 0.9),
             eval_every: int = 10, up_per_upload: int = 100, bc_per_step: int = 50, target: float | None = 0.8,
             data_root: str = "/data", staleness: dict | None = None, status: str = "completed") -> Path:
    """A hand-made run directory in the format run_experiment writes (only the keys the report reads)."""
    client = client or (quantizer("minmax", 4) if algorithm != "fedbuff" else quantizer("identity"))
    server = server or (quantizer("minmax", 4) if algorithm != "fedbuff" else quantizer("identity"))
    config = {"dataset": {"name": "digits", "num_clients": 50}, "model": {"name": "mlp", "hidden": [64]},
              "algorithm": {"name": algorithm, "buffer_size": K, "hidden_state_replicas": 0},
              "client_quantizer": client, "server_quantizer": server,
              "client": {"lr": 0.1, "local_steps": P, "local_epochs": None, "batch_size": 16},
              "run": {"server_steps": eval_every * (len(accs) - 1), "eval_every": eval_every,
                      "target_accuracy": target, "progress": False},
              "tracking": {"backend": "none"}, "paths": {"data_root": data_root}, "seed": seed, "device": "cpu"}
    records = []
    for i, acc in enumerate(accs):
        step = i * eval_every
        rec = {"server_step": step, "uploads": K * step, "sim_time": float(step), "accuracy": acc, "loss": 1 - acc,
               "bytes_up": K * step * up_per_upload, "bytes_broadcast": step * bc_per_step if algorithm != "naive"
               else 0, "bytes_down_naive": K * step * bc_per_step if algorithm == "naive" else 0,
               "mean_staleness": 1.0}
        if algorithm == "qafel":
            rec["hidden_state_error"] = 0.1 / (1 + step)
        records.append(rec)
    last = records[-1]
    hit = uploads_to_target(records, K, target)
    summary = {"status": status, "algorithm": algorithm, "final_accuracy": last["accuracy"],
               "final_loss": last["loss"], "server_steps": last["server_step"], "uploads": last["uploads"],
               "bytes_up": last["bytes_up"], "bytes_broadcast": last["bytes_broadcast"],
               "bytes_down_naive": last["bytes_down_naive"], "target_accuracy": target,
               "uploads_to_target": hit.uploads if hit else None,
               "staleness_histogram": staleness or {"0": 5, "1": 10, "2": 4}, "seed": seed}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    return {row["configuration"]: row for row in csv.DictReader(io.StringIO(path.read_text()))}


# ------------------------------------------------------------------------------------------- uploads to target
def test_uploads_to_target_is_K_times_server_steps_at_first_evaluation_reaching_it():
    K = 10
    metrics = [
        {"server_step": 0, "accuracy": 0.1, "bytes_up": 0, "bytes_broadcast": 0},
        {"server_step": 5, "accuracy": float("nan"), "bytes_up": 400, "bytes_broadcast": 40},
        {"server_step": 10, "accuracy": 0.79, "bytes_up": 1000, "bytes_broadcast": 100},
        {"server_step": 15, "accuracy": 0.80, "bytes_up": 1500, "bytes_broadcast": 150},  # exactly the target
        {"server_step": 20, "accuracy": 0.95, "bytes_up": 2000, "bytes_broadcast": 200},
        {"server_step": 25, "accuracy": 0.70, "bytes_up": 2500, "bytes_broadcast": 250},
    ]
    hit = uploads_to_target(metrics, K, 0.8)
    assert (hit.uploads, hit.server_step, hit.bytes_up, hit.bytes_broadcast) == (150, 15, 1500, 150)
    assert uploads_to_target(list(reversed(metrics)), K, 0.9).uploads == 200  # order of lines does not matter
    assert uploads_to_target(metrics, K, 0.99) is None
    assert uploads_to_target(metrics, K, None) is None
    naive = [{"server_step": 3, "accuracy": 0.9, "bytes_up": 30, "bytes_broadcast": 0, "bytes_down_naive": 77}]
    assert uploads_to_target(naive, 4, 0.5).bytes_broadcast == 77  # naive's downloads count as its downlink


def test_report_recomputes_uploads_to_target_from_metrics(tmp_path):
    run = make_run(tmp_path / "r", K=4, accs=(0.1, 0.6, 0.85, 0.95), eval_every=10, target=0.8)
    rows = read_csv(write_report([run], tmp_path / "a", plots=False).files[1])
    (row,) = rows.values()
    assert float(row["uploads_to_target_mean"]) == 4 * 20  # the run's own target 0.8: first reached at step 20
    assert float(row["mb_up_at_target_mean"]) == pytest.approx(4 * 20 * 100 / 1e6)
    assert float(row["mb_broadcast_at_target_mean"]) == pytest.approx(20 * 50 / 1e6)
    assert main([str(run), "--out", str(tmp_path / "b"), "--target-accuracy", "0.9", "--no-plots"]) == 0
    (row,) = read_csv(tmp_path / "b" / "table.csv").values()
    assert float(row["uploads_to_target_mean"]) == 4 * 30 and row["target_accuracy"] == "0.9"
    assert main([str(run), "--out", str(tmp_path / "c"), "--target-accuracy", "0.99", "--no-plots"]) == 0
    (row,) = read_csv(tmp_path / "c" / "table.csv").values()
    assert row["uploads_to_target_mean"] == "" and row["reached"] == "0/1"


# ---------------------------------------------------------------------------------------------- aggregation
def test_seeds_are_aggregated_into_one_row_with_mean_sd_and_values(tmp_path):
    sweep = tmp_path / "sweep"
    finals = {0: 0.90, 1: 0.92, 2: 0.97}
    reach = {0: (0.1, 0.85, 0.9), 1: (0.1, 0.5, 0.92), 2: (0.1, 0.2, 0.97)}  # target 0.8 at steps 10, 20, 20
    for seed in finals:
        # seeds differ in the data root too: a bookkeeping key, not a different configuration
        make_run(sweep / f"trial_{seed}" / "run", seed=seed, accs=reach[seed], data_root=f"/data{seed}")
    make_run(sweep / "other" / "run", seed=0, K=20, accs=(0.1, 0.85, 0.9))  # a different configuration (K)
    (sweep / "not_a_run").mkdir()
    (sweep / "not_a_run" / "summary.json").write_text("{}")  # no metrics.jsonl: ignored
    assert len(find_run_dirs([sweep])) == 4

    report = write_report([sweep], tmp_path / "out", plots=False)
    assert len(report.rows) == 2
    row = report.row("qafel minmax 4b/minmax 4b K=10")
    assert [r.seed for r in row.group.runs] == [0, 1, 2]
    acc = row.stats["final_accuracy"]
    assert acc.values == [0.90, 0.92, 0.97]
    assert acc.mean == pytest.approx(statistics.fmean(finals.values()))
    assert acc.sd == pytest.approx(statistics.stdev(finals.values()))
    up = row.stats["uploads_to_target"]
    assert up.values == [100, 200, 200] and up.mean == pytest.approx(500 / 3)
    assert report.row("qafel minmax 4b/minmax 4b K=20").stats["final_accuracy"].sd is None  # one seed

    csv_rows = read_csv(tmp_path / "out" / "table.csv")
    c = csv_rows["qafel minmax 4b/minmax 4b K=10"]
    assert c["n_seeds"] == "3" and c["seeds"] == "0;1;2"
    assert c["final_accuracy_values"] == "0.9;0.92;0.97"
    assert float(c["final_accuracy_sd"]) == pytest.approx(statistics.stdev(finals.values()))
    md = (tmp_path / "out" / "table.md").read_text()
    assert f"{acc.mean:.4f} ± {acc.sd:.4f}" in md
    assert "## Per-seed values" in md and md.count("| qafel minmax 4b/minmax 4b K=10 |") == 4  # 1 + 3 seeds


def test_unreached_seeds_are_counted_and_left_out_of_the_mean(tmp_path):
    make_run(tmp_path / "s0", seed=0, accs=(0.1, 0.9))
    make_run(tmp_path / "s1", seed=1, accs=(0.1, 0.5))
    (row,) = build_report([tmp_path]).rows
    assert row.reached == "1/2"
    assert row.stats["uploads_to_target"].values == [100, None]
    assert row.stats["uploads_to_target"].mean == 100


def test_ratios_to_fedbuff_at_target(tmp_path):
    make_run(tmp_path / "fb", algorithm="fedbuff", accs=(0.1, 0.5, 0.9, 0.95), up_per_upload=800, bc_per_step=8000)
    make_run(tmp_path / "q", algorithm="qafel", accs=(0.1, 0.5, 0.6, 0.9), up_per_upload=100, bc_per_step=1000)
    make_run(tmp_path / "n", algorithm="naive", accs=(0.1, 0.9, 0.9, 0.9), up_per_upload=100, bc_per_step=100)
    report = build_report([tmp_path])
    assert [r.group.label for r in report.rows] == ["fedbuff", "naive minmax 4b/minmax 4b",
                                                    "qafel minmax 4b/minmax 4b"]
    q = report.row("qafel minmax 4b/minmax 4b")
    assert q.reference.label == "fedbuff" and q.ratio_basis == "target"
    assert q.ratios["uploads_vs_fedbuff"] == pytest.approx(300 / 200)
    assert q.ratios["up_reduction"] == pytest.approx((200 * 800) / (300 * 100))
    assert q.ratios["broadcast_reduction"] == pytest.approx((20 * 8000) / (30 * 1000))
    n = report.row("naive minmax 4b/minmax 4b")
    assert n.stats["mb_broadcast_at_target"].mean == pytest.approx(100 * 100 / 1e6)  # per-job downloads


def test_simulated_time_to_target_and_its_ratio_to_fedbuff(tmp_path):
    """A run's own sim_time at the first evaluation at or above the target (timing=trace: seconds)."""
    fb = make_run(tmp_path / "fb", algorithm="fedbuff", accs=(0.1, 0.5, 0.9, 0.95))
    q = make_run(tmp_path / "q", algorithm="qafel", accs=(0.1, 0.5, 0.6, 0.9))
    for run, seconds_per_step in ((fb, 8.0), (q, 1.5)):  # slow fp32 uploads vs fast 4-bit ones
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for rec in lines:
            rec["sim_time"] = seconds_per_step * rec["server_step"]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = write_report([tmp_path], tmp_path / "out", plots=False)
    row = report.row("qafel minmax 4b/minmax 4b")
    assert row.stats["time_to_target"].values == [1.5 * 30]
    assert report.row("fedbuff").stats["time_to_target"].mean == 8.0 * 20
    assert row.ratios["time_vs_fedbuff"] == pytest.approx(45 / 160)
    assert "| MB broadcast at target | sim time to target |" in report.markdown
    assert "sim time ÷ FedBuff" in report.markdown and "0.28×" in report.markdown
    c = read_csv(tmp_path / "out" / "table.csv")["qafel minmax 4b/minmax 4b"]
    assert float(c["time_to_target_mean"]) == 45.0 and float(c["time_vs_fedbuff"]) == pytest.approx(45 / 160)


def test_labels_name_what_varies():
    assert quantizer_label({"name": "qsgd", "levels": 4, "bits": 4}) == ("qsgd s=4", 4)
    assert quantizer_label({"name": "qsgd", "levels": None, "bits": 2}) == ("qsgd 2b", 2)
    assert quantizer_label({"name": "topk", "fraction": 0.01, "k": None}) == ("topk 1%", None)
    assert quantizer_label({"name": "identity"}) == ("fp32", 32)
    assert sorted(["P=16", "P=2", "P=1"], key=natural_key) == ["P=1", "P=2", "P=16"]
    assert pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4)]) == [3, 0, 1]


# -------------------------------------------------------------------------------------------------- plots
def test_every_plot_file_is_written_and_non_empty(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / "runs" / f"fb{seed}", algorithm="fedbuff", seed=seed, up_per_upload=800,
                 bc_per_step=8000)
        make_run(tmp_path / "runs" / f"q{seed}", algorithm="qafel", seed=seed, accs=(0.1, 0.4 + 0.1 * seed, 0.9),
                 staleness={"0": 3, "1": 7, "4": 1})
    make_run(tmp_path / "runs" / "n", algorithm="naive", client=quantizer("minmax", 2))
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    names = {p.name for p in report.files}
    assert names == {"table.md", "table.csv", *PLOT_FILES}
    for name in PLOT_FILES:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_plots_are_written_without_qafel_or_targets(tmp_path):
    make_run(tmp_path / "fb", algorithm="fedbuff", target=None, staleness={})
    report = write_report([tmp_path / "fb"], tmp_path / "out")
    for name in PLOT_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 5_000, name
    assert "| uploads to target |" not in report.markdown


# -------------------------------------------------------------------------------------- paper comparison
def test_bit_grid_and_paper_comparison_tables(tmp_path):
    make_run(tmp_path / "fb", algorithm="fedbuff", accs=(0.1, 0.9), up_per_upload=800, bc_per_step=8000)
    for cb in (2, 4):
        for sb in (2, 4):
            make_run(tmp_path / f"q{cb}{sb}", client=quantizer("minmax", cb), server=quantizer("minmax", sb),
                     accs=(0.1, 0.5, 0.9) if cb == 2 else (0.1, 0.9), up_per_upload=25 * cb, bc_per_step=250 * sb)
    report = build_report([tmp_path])
    grid = bit_grid(report, "uploads_to_target", "int")
    assert grid.splitlines()[0] == "| client bits \\ server bits | 2 | 4 |"
    assert grid.splitlines()[2] == "| 2 | 200 | 200 |" and grid.splitlines()[3] == "| 4 | 100 | 100 |"
    assert grid.splitlines()[4].startswith("| FedBuff (fp32) | 100 |")
    comparison = celeba_comparison(report)
    assert f"{PAPER_CELEBA['fedbuff']['uploads_to_target']:,}" in comparison
    assert "| QAFeL 4/4 × fewer MB up | 7.1× | 8.00× |" in comparison
    assert "| QAFeL 2-bit clients: uploads ÷ FedBuff | 2.3–3.5× | 2.00× |" in comparison


# ------------------------------------------------------------------------------------------ real run records
@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is several times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_report_on_real_runs_in_a_sweep_directory(tmp_path, capsys, one_thread):
    from qafel.experiment.runner import run_experiment

    tiny = (*FAST, "run.server_steps=10", "run.eval_every=5", "run.target_accuracy=0.2")
    summaries = {}
    for name, extra in (("fedbuff", ("algorithm=fedbuff",)),
                        ("qafel", ("client_quantizer=minmax", "server_quantizer=minmax"))):
        summaries[name] = run_experiment(compose_cfg(*tiny, *extra), tmp_path / "sweep" / name / "0" / "run")
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "qafel report: 2 runs, 2 configurations" in out
    rows = read_csv(tmp_path / "report" / "table.csv")
    assert set(rows) == {"fedbuff", "qafel minmax 4b/minmax 4b"}
    for name, label in (("fedbuff", "fedbuff"), ("qafel", "qafel minmax 4b/minmax 4b")):
        s, row = summaries[name], rows[label]
        expected = s["uploads_to_target"]
        assert (float(row["uploads_to_target_mean"]) if row["uploads_to_target_mean"] else None) == expected
        assert float(row["mb_up_mean"]) == pytest.approx(s["bytes_up"] / 1e6)
        assert float(row["final_accuracy_mean"]) == pytest.approx(s["final_accuracy"])
    q = rows["qafel minmax 4b/minmax 4b"]
    assert float(q["up_reduction"]) > 4 and q["fedbuff_reference"] == "fedbuff"
    for name in PLOT_FILES:
        assert (tmp_path / "report" / name).stat().st_size > 5_000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no run directories" in capsys.readouterr().err
    make_run(tmp_path / "r")
    assert main([str(tmp_path / "r"), "--target-accuracy", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--target-accuracy=1.5" in capsys.readouterr().err


def test_torn_last_metrics_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "r", accs=(0.1, 0.9))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"server_step": 30, "accur')
    (row,) = build_report([run]).rows
    assert row.stats["uploads_to_target"].values == [100]
    assert not math.isnan(row.stats["final_accuracy"].mean)


def _damage_middle_line(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage, problem", [
    (_damage_middle_line, "metrics.jsonl:2: damaged record before the last line"),
    (lambda run: (run / "metrics.jsonl").write_text(""), "metrics.jsonl: no evaluation records"),
    (lambda run: (run / "summary.json").write_text('{"status": "compl'), "summary.json: cannot read"),
    (lambda run: (run / "config.yaml").write_text("a: [b"), "config.yaml: cannot read"),
])
def test_a_damaged_run_is_left_out_with_a_warning_and_the_report_goes_on(tmp_path, capsys, damage, problem):
    good = make_run(tmp_path / "runs" / "good", seed=0)
    bad = make_run(tmp_path / "runs" / "bad", seed=1)
    damage(bad)
    report = build_report([tmp_path / "runs"])
    assert [r.path for r in report.runs] == [good.resolve()]
    assert [(d, why.startswith(f"{bad.resolve()}/{problem}")) for d, why in report.skipped] == [(bad.resolve(), True)]
    assert "## Skipped run directories" in report.markdown and problem in report.markdown
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: run left out of the report: {bad.resolve()}/{problem}")


def test_a_summary_and_a_config_from_different_runs_are_not_mixed(tmp_path):
    a, b = make_run(tmp_path / "a", seed=0), make_run(tmp_path / "b", seed=0)
    for run, run_id in ((a, "aaa"), (b, "bbb")):
        summary = json.loads((run / "summary.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        summary["run_id"] = config["run_id"] = run_id
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert len(build_report([a, b]).runs) == 2
    (a / "summary.json").write_bytes((b / "summary.json").read_bytes())
    report = build_report([a, b])
    assert [r.path for r in report.runs] == [b.resolve()]
    assert "come from different runs (run_id 'bbb' in summary.json, run_id 'aaa' in config.yaml)" in \
        report.skipped[0][1]
    old = make_run(tmp_path / "old", seed=3)  # written before run_id existed: the seed still has to agree
    (old / "config.yaml").write_text((old / "config.yaml").read_text().replace("seed: 3", "seed: 4"))
    assert "(seed 3 in summary.json, seed 4 in config.yaml)" in build_report([old, b]).skipped[0][1]


def test_a_real_run_records_one_run_id_and_reports(tmp_path):
    from qafel.experiment.runner import run_experiment

    summary = run_experiment(compose_cfg(*FAST, "run.server_steps=10", "run.eval_every=5"), tmp_path / "r")
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["run_id"] == summary["run_id"]
    report = build_report([tmp_path / "r"])
    assert not report.skipped and "run_id" not in report.rows[0].group.columns


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'qafel-report = "qafel.report:main"' in text
