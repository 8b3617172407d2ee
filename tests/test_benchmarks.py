"""The client-throughput benchmark runs and keeps its JSON interface (its timings are not judged here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO, need_data_file


def test_bench_clients_json_lists_every_workload_with_the_documented_keys():
    root = need_data_file("mushrooms.libsvm").parent
    env = {**os.environ, "QAFEL_DATA_ROOT": str(root)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_clients.py"), "--jobs", "3", "--repeat", "2",
           "--device", "cpu", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = json.loads(out.stdout)
    assert [r["workload"] for r in rows] == ["logreg_mushrooms_P10_fullbatch", "mlp_digits_P5_batch16",
                                             "paper_cnn_32x32_1epoch_batch32"]
    for r in rows:
        assert r["device"] == "cpu" and r["jobs"] == 3 and r["repeat"] == 2
        assert len(r["loop_round_s"]) == len(r["qafel_round_s"]) == 2
        assert r["loop_updates_per_s"] > 0 and r["batched_updates_per_s"] > 0
        assert abs(r["speedup"] - r["batched_updates_per_s"] / r["loop_updates_per_s"]) < 1e-9 * r["speedup"]
        assert r["same_updates"] is True, r
        # the whole-machine comparison: each side with its default threads, qafel's result unchanged
        assert r["all_cores_same_as_one_core"] is True, r
        assert len(r["loop_all_cores_round_s"]) == len(r["qafel_all_cores_round_s"]) == 2
        assert r["loop_all_cores_updates_per_s"] >= r["loop_updates_per_s"]  # the better of its thread counts
        assert abs(r["speedup_all_cores"] * r["loop_all_cores_updates_per_s"] - r["batched_all_cores_updates_per_s"]) \
            < 1e-9 * r["batched_all_cores_updates_per_s"]
    assert [r["qafel_trainer"] for r in rows] == ["batched", "batched", "loop"]
    assert [r["job_threads"] for r in rows] == [1, 1, rows[2]["cores"]]


def test_bench_shared_start_json_compares_three_ways_on_the_same_gradients():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_shared_start.py"), "--jobs", "2", "--batch", "4",
           "--repeat", "1", "--json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout)
    assert [r["model"] for r in rows] == ["paper_cnn_32x32", "mlp_64_hidden"]
    for r in rows:
        for side in ("shared_weights", "stacked_weights", "one_by_one"):
            assert r[f"{side}_ms_per_job"] > 0
            assert r[f"{side}_relative_difference"] < 1e-3, r  # CNN: max-pool near-ties, as in bench_clients
        assert r["shared_vs_stacked_speedup"] > 0


def test_bench_end_to_end_json_breaks_the_run_down_and_replays_the_trainer():
    root = need_data_file("mushrooms.libsvm").parent
    env = {**os.environ, "QAFEL_DATA_ROOT": str(root)}
    bench = [sys.executable, str(REPO / "benchmarks" / "bench_end_to_end.py"), "--steps", "4", "--concurrent", "2",
             "--set", "run.eval_every=2", "--json"]
    small = ["--set", "dataset.num_samples=600", "--set", "dataset.num_clients=50"]
    rows = [row for extra in (["--only", "paper_logreg"], ["--only", "cifar10", *small])
            for row in json.loads(subprocess.run([*bench, *extra], capture_output=True, text=True, env=env,
                                                 timeout=900, check=True).stdout)]
    assert [r["name"] for r in rows] == ["paper_logreg", "cifar10"]
    parts = ("training", "scheduling", "quantization", "evaluation", "bookkeeping", "data_setup")
    for r in rows:
        assert r["device"] == "cpu" and r["status"] == "completed" and r["server_steps"] == 4
        assert r["uploads"] == 40 and r["jobs_trained"] >= r["uploads"]  # K = 10; jobs in flight trained too
        assert abs(sum(r[f"{p}_fraction"] for p in parts) - 1) < 1e-9
        assert all(r[f"{p}_fraction"] >= 0 for p in parts if p != "bookkeeping")
        assert abs(r["efficiency"] - r["e2e_updates_per_s"] / r["trainer_updates_per_s"]) < 1e-9 * r["efficiency"]
        evaluation_s = r["evaluation_fraction"] * (r["loop_s"] + r["data_setup_s"])
        assert abs(r["efficiency_without_evaluation"] * (r["loop_s"] - evaluation_s)
                   - r["efficiency"] * r["loop_s"]) < 1e-9 * r["loop_s"]
        assert r["jobs_per_call"] == r["jobs_trained"] / r["trainer_calls"]
        assert r["concurrent"] == 2 and r["concurrent_updates_per_s"] > 0
        assert r["evaluations"] == 3  # steps 0, 2 and 4
    # the whole run each workload stands for: its experiment's server steps, an evaluation every 2 and at the end
    assert [(r["full_run_server_steps"], r["full_run_evaluations"], r["full_run_uploads"]) for r in rows] == [
        (10000, 5001, 100000), (25000, 12501, 250000)]


def test_full_run_projection_scales_evaluation_by_evaluations_and_the_rest_by_uploads():
    spec = importlib.util.spec_from_file_location("bench_end_to_end", REPO / "benchmarks" / "bench_end_to_end.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full_run_projection = bench.full_run_projection
    # 40 uploads (50 jobs trained: 10 still in flight at the end) in 10 s of loop, 4 s of it in 4 evaluations;
    # training alone 8 jobs/s
    row = {"uploads": 40, "jobs_trained": 50, "server_steps": 4, "loop_s": 10.0, "data_setup_s": 36.0,
           "trainer_updates_per_s": 8.0}
    out = full_run_projection(row, evaluations=4, eval_seconds=4.0, full_steps=100, eval_every=30)
    assert out["full_run_evaluations"] == 5  # steps 0, 30, 60, 90 and the last, 100
    assert out["full_run_uploads"] == 1000
    full_loop = 1000 * 6.0 / 50 + 5 * 1.0  # 0.12 s per job outside evaluation, 1 s per evaluation
    assert out["full_run_hours"] == (full_loop + 36.0) / 3600
    assert abs(out["full_run_efficiency"] - 1000 / full_loop / 8.0) < 1e-12


def test_bench_end_to_end_refuses_a_bad_setting_in_one_line_with_exit_2():
    root = need_data_file("mushrooms.libsvm").parent
    env = {**os.environ, "QAFEL_DATA_ROOT": str(root)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_end_to_end.py"), "--only", "paper_logreg", "--steps", "2",
           "--set", "client_quantizer.bits=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("bench_end_to_end.py: ") and out.stderr.count("\n") == 1
    assert "client_quantizer" in out.stderr
