"""timing=trace (docs/traces.md): exact job durations from bytes and device speeds, availability (no start on an
offline client, drops when a client leaves), Little's law and staleness, determinism, and the engine under every
algorithm."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, REPO, compose_cfg

from qafel.errors import ConfigError
from qafel.experiment.config import validate
from qafel.experiment.runner import make_engine, run_experiment, setup_run, trace_workload
from qafel.sim.clients import job_seed
from qafel.sim.engine import STREAM_CLIENT_TRAIN, TRACE_SUMMARY_KEYS
from qafel.sim.timing import Schedule, little_law_concurrency
from qafel.sim.trace_timing import Workload
from qafel.sim.traces import Device, save_trace


def workload(n: int, *, up: int = 5000, server: int = 1000, model: int = 8000, download: str = "catch_up", K: int = 2,
             samples: int = 4, steps: int = 2, max_staleness: int | None = None) -> Workload:
    return Workload(upload_bytes=up, server_bytes=server, model_bytes=model, download=download, buffer_size=K,
                    max_staleness=max_staleness, samples=(samples,) * n, steps=(steps,) * n)


def closed(**kw):
    return {"name": "trace", "loop": "closed_loop", "concurrency": 4, "restart": "random_idle", **kw}


def opened(**kw):
    return {"name": "trace", "loop": "open_loop", "arrival": "poisson", "rate": 2.0, "sample_busy_clients": False,
            **kw}


def from_file(tmp_path: Path, devices, name="t.json", **kw):
    path = save_trace(devices, tmp_path / name)
    return {"trace": "file", "trace_file": str(path), **kw}


def take(sched, n):
    return list(itertools.islice(sched, n))


def integer_trace(n: int, seed: int, period: int = 100) -> list[Device]:
    """Devices with integer windows (exact float arithmetic at every boundary), some wrapping the period's end."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cuts = sorted(rng.choice(np.arange(1, period), size=4, replace=False).tolist())
        kind = i % 4
        online = {0: ((cuts[0], cuts[1]), (cuts[2], cuts[3])), 1: ((0, cuts[0]), (cuts[2], period)),
                  2: ((cuts[1], cuts[3]),), 3: None}[kind]
        out.append(Device(uplink_kbps=float(rng.choice([8, 16, 40])), downlink_kbps=float(rng.choice([8, 80])),
                          s_per_sample=float(rng.choice([0.25, 0.5, 2.0])), online=online,
                          period=float(period) if online is not None else None))
    return out


def online_at(d: Device, t: float) -> bool:
    """Oracle: the device's windows, read directly."""
    if d.online is None:
        return True
    phase = t % d.period if d.period is not None else t
    return any(a <= phase < b for a, b in d.online)


def offline_after(d: Device, t: float) -> float:
    """Oracle: when a device online at t next goes offline (inf if never)."""
    if d.online is None:
        return math.inf
    assert online_at(d, t)
    end = t
    for _ in range(10):
        k = math.floor(end / d.period) if d.period is not None else 0
        base = k * d.period if d.period is not None else 0.0
        phase = end - base
        window = next((w for w in d.online if w[0] <= phase < w[1]), None)
        if window is None:
            return end
        end = base + window[1]
    return math.inf


# ------------------------------------------------------------------------------------------ durations
def test_a_jobs_duration_is_download_plus_compute_plus_bytes_over_bandwidth_exactly(tmp_path):
    """Binary-exact speeds: every job's phases and end are checked against an independent replay of the server
    steps (K = 2) and of each client's last download (FedBuff/QAFeL catch-up, capped at the full model)."""
    devices = [Device(uplink_kbps=8.0, downlink_kbps=16.0, s_per_sample=0.25),   # 1,000 / 2,000 bytes per second
               Device(uplink_kbps=16.0, downlink_kbps=8.0, s_per_step=0.5)]
    n = 3  # client 2 uses row 0 again
    w = workload(n, up=5000, server=1000, model=3000, samples=4, steps=2)
    sched = Schedule(opened(**from_file(tmp_path, devices), arrival="constant", rate=0.5, sample_busy_clients=True),
                     n, 0, workload=w)
    steps = k = 0
    last = [-1] * n
    start_step = {}
    seen = Counter()
    for e in take(sched, 3000):
        if e.kind == "arrival":
            k += 1
            if k == 2:  # K
                steps, k = steps + 1, 0
            continue
        assert e.kind in ("start", "online")
        if e.kind == "online":
            continue
        j, d = e.job, devices[e.job.client % 2]
        want = 3000 if last[j.client] < 0 else min((steps - last[j.client]) * 1000, 3000)
        seen[want] += 1
        last[j.client] = steps
        start_step[j.job_id] = steps
        assert j.bytes_down == want
        assert j.download == want / (d.downlink_kbps * 125.0)
        assert j.upload == 5000 / (d.uplink_kbps * 125.0) == (5.0 if d.uplink_kbps == 8 else 2.5)
        assert j.compute == (0.25 * 4 if d.s_per_sample is not None else 0.5 * 2) == 1.0
        assert j.end == j.start + (j.download + j.compute + j.upload) and not j.dropped
    assert set(seen) >= {0, 1000, 2000, 3000}, seen  # current, one or two missed steps, and full downloads


def test_naive_downloads_one_dispatch_per_job(tmp_path):
    devices = [Device(uplink_kbps=8.0, downlink_kbps=8.0, s_per_sample=1.0)]
    sched = Schedule(closed(**from_file(tmp_path, devices), concurrency=2), 4, 0,
                     workload=workload(4, download="fresh", server=500, samples=3))
    starts = [e.job for e in take(sched, 400) if e.kind == "start"]
    assert all(j.bytes_down == 500 and j.download == 0.5 and j.end - j.start == 0.5 + 3.0 + 5.0 for j in starts)


def test_the_api_prices_jobs_with_the_run_s_exact_payloads():
    cfg = compose_cfg(*FAST, "timing=trace", "dataset.num_clients=20", "client_quantizer=minmax",
                      "server_quantizer=qsgd", "client.local_steps=3", "client.batch_size=4")
    s = setup_run(cfg)
    w = trace_workload(s.cfg, s.data, s.client_quantizer, s.server_quantizer)
    assert w.upload_bytes == s.client_quantizer.payload_bytes() and w.server_bytes == s.server_quantizer.payload_bytes()
    assert w.model_bytes == 4 * s.model.d and w.download == "catch_up" and w.buffer_size == 10
    sizes = s.data.client_sizes.tolist()
    assert w.steps == (3,) * 20 and w.samples == tuple(3 * min(4, n) for n in sizes)
    for alg, download, server in (("fedbuff", "catch_up", 4 * s.model.d), ("naive", "fresh", None)):
        t = setup_run(compose_cfg(*FAST, "timing=trace", "dataset.num_clients=20", f"algorithm={alg}"))
        wt = trace_workload(t.cfg, t.data, t.client_quantizer, t.server_quantizer)
        assert wt.download == download
        assert wt.server_bytes == (server if server is not None else t.server_quantizer.payload_bytes())


@pytest.mark.parametrize("side", ["client_quantizer", "server_quantizer"])
def test_elias_gamma_coding_is_refused_under_trace_timing(side):
    """QSGD's Elias-gamma sizes depend on the data, and a trace schedule prices each message before the job runs."""
    cfg = compose_cfg(*FAST, "timing=trace", "dataset.num_clients=10", f"{side}=qsgd", f"{side}.coding=elias_gamma")
    with pytest.raises(ConfigError) as info:
        setup_run(cfg)
    message = str(info.value)
    assert message.startswith(f"{side}.coding='elias_gamma': timing=trace") and "\n" not in message
    setup_run(compose_cfg(*FAST, "dataset.num_clients=10", f"{side}=qsgd", f"{side}.coding=elias_gamma"))  # elsewhere


# -------------------------------------------------------------------------------------------- availability
AVAILABILITY_CASES = {
    "open_redraw_idle": opened(offline_start="redraw"),
    "open_skip_idle": opened(offline_start="skip"),
    "open_redraw_busy": opened(offline_start="redraw", sample_busy_clients=True, rate=5.0),
    "open_finish_offline": opened(finish_offline=True),
    "closed_random_idle": closed(),
    "closed_same": closed(restart="same"),
    "closed_same_finish_offline": closed(restart="same", finish_offline=True),
}


@pytest.mark.parametrize("case", list(AVAILABILITY_CASES))
def test_no_job_starts_on_an_offline_client_and_a_leaving_client_drops_its_job(tmp_path, case):
    devices = integer_trace(12, seed=1)
    cfg = {**AVAILABILITY_CASES[case], **from_file(tmp_path, devices)}
    finish_offline = cfg.get("finish_offline", False)
    sched = Schedule(cfg, 24, 3, workload=workload(24, up=2000, server=400, model=4000, samples=8))
    state = {}
    kinds = Counter()
    last_time = 0.0
    for e in take(sched, 20_000):
        assert e.time >= last_time
        last_time = e.time
        kinds[e.kind] += 1
        if e.kind in ("online", "offline"):
            d = devices[e.client % 12]
            assert online_at(d, e.time) == (e.kind == "online")
            assert state.get(e.client, e.kind == "offline") != (e.kind == "online")  # alternates
            state[e.client] = e.kind == "online"
            continue
        j = e.job
        d = devices[j.client % 12]
        if e.kind == "start":
            assert online_at(d, j.start), f"job {j.job_id} started on offline client {j.client} at {j.start}"
            assert state.get(j.client, d.online is None)
            planned = j.start + (j.download + j.compute + j.upload)
            off = offline_after(d, j.start)
            if finish_offline:
                assert not j.dropped and j.end == planned
            elif off < planned:
                assert j.dropped and j.end == off
            else:
                assert not j.dropped and j.end == planned
        elif e.kind == "drop":
            assert j.dropped and not online_at(d, j.end)
        else:
            assert e.kind == "arrival" and not j.dropped
    assert kinds["start"] > 1000 and kinds["online"] > 50 and kinds["offline"] > 50
    if finish_offline:
        assert kinds["drop"] == 0
    else:
        assert kinds["drop"] > 10
    if case == "open_skip_idle":
        assert sched.offline_skipped_starts > 100 and sched.redrawn_starts == 0
    elif case.startswith("open_redraw"):
        assert sched.redrawn_starts > 100


def test_open_loop_start_counts_add_up(tmp_path):
    """Constant starts: every tick is a start, a redraw that started, or a skip."""
    devices = integer_trace(8, seed=2)
    for offline_start in ("skip", "redraw"):
        cfg = opened(**from_file(tmp_path, devices), arrival="constant", rate=1.0, offline_start=offline_start,
                     sample_busy_clients=True)
        sched = Schedule(cfg, 8, 0, workload=workload(8))
        starts = 0
        for e in itertools.islice(sched, 5000):  # lazily: the counters as of each event
            if e.kind == "start":  # constant rate 1: the k-th tick is at time k
                starts += 1
                assert starts + sched.offline_skipped_starts == round(e.time)
        assert starts > 1000
        assert (sched.redrawn_starts > 0, sched.offline_skipped_starts > 100) == \
            ((True, False) if offline_start == "redraw" else (False, True))


def test_closed_loop_restart_same_waits_for_its_own_client(tmp_path):
    devices = integer_trace(6, seed=4)
    sched = Schedule(closed(**from_file(tmp_path, devices), restart="same", concurrency=3), 6, 0, workload=workload(6))
    events = take(sched, 5000)
    first = {e.job.client for e in events if e.kind == "start" and e.time == 0.0}
    clients = {e.job.client for e in events if e.kind == "start"}
    assert first and clients == first  # the same clients throughout (all three online at 0 here)
    ended = {}
    for e in events:
        if e.kind in ("arrival", "drop"):
            ended[e.job.client] = e.time
        elif e.kind == "start" and e.job.client in ended:
            d = devices[e.job.client]
            t0 = ended.pop(e.job.client)
            assert e.time == t0 if online_at(d, t0) else e.time > t0  # at once, or when it is back


def test_a_trace_whose_clients_never_return_ends_the_schedule(tmp_path):
    devices = [Device(uplink_kbps=8.0, downlink_kbps=8.0, s_per_sample=1.0, online=((0.0, 30.0),)),
               Device(uplink_kbps=8.0, downlink_kbps=8.0, s_per_sample=1.0, online=((10.0, 50.0),))]
    for cfg in (closed(concurrency=2), opened(rate=1.0)):
        events = list(Schedule({**cfg, **from_file(tmp_path, devices)}, 2, 0, workload=workload(2)))
        assert events and max(e.time for e in events) <= 50.0
        assert sum(e.kind == "drop" for e in events) >= 1  # the jobs running when the windows closed


# ------------------------------------------------------------------------------- Little's law, staleness
def _constant_devices(n):
    return [Device(uplink_kbps=8.0, downlink_kbps=8.0, s_per_sample=0.25)] * n


def _replay(events, K):
    """Time-averaged jobs in flight, mean job duration and mean staleness, from the events alone."""
    steps = k = 0
    start_step, taus, durs = {}, [], []
    area, prev, flight = 0.0, 0.0, 0
    for e in events:
        area += flight * (e.time - prev)
        prev = e.time
        if e.kind == "start":
            flight += 1
            start_step[e.job.job_id] = steps
            durs.append(e.job.end - e.job.start)
        elif e.kind == "arrival":
            flight -= 1
            taus.append(steps - start_step.pop(e.job.job_id))
            k += 1
            if k == K:
                steps, k = steps + 1, 0
    return area / prev, float(np.mean(durs)), float(np.mean(taus))


@pytest.mark.parametrize("download", ["fresh", "catch_up"])
def test_little_law_and_staleness_hold_with_constant_speeds(tmp_path, download):
    """Every device alike and always online: open loop λ = 4, Poisson. fresh: every job lasts exactly
    0.5 + 1 + 5 = 6.5 s, so mean concurrency = λ·6.5 = 26; catch_up: λ × the mean duration. Staleness ≈ C/K."""
    cfg = opened(**from_file(tmp_path, _constant_devices(1)), rate=4.0, sample_busy_clients=True)
    w = workload(500, up=5000, server=500, model=1000, download=download, K=5)
    sched = Schedule(cfg, 500, 7, workload=w)
    conc, mean_dur, tau = _replay(take(sched, 120_000), K=5)
    if download == "fresh":
        assert mean_dur == 6.5
    assert conc == pytest.approx(4.0 * mean_dur, rel=0.04)
    assert tau == pytest.approx(conc / 5, rel=0.06)


def test_closed_loop_keeps_c_jobs_in_flight_and_staleness_near_c_over_k(tmp_path):
    """Constant speeds: exactly C in flight; they then run in lockstep (equal durations), so the staleness law
    needs the heterogeneous devices of the synthetic trace, always online: mean τ ≈ C/K ((C - 1)/K exactly)."""
    cfg = closed(**from_file(tmp_path, _constant_devices(1)), concurrency=50)
    events = take(Schedule(cfg, 120, 0, workload=workload(120, K=5)), 50_000)
    assert set(_in_flight_at_each_time(events).values()) == {50}
    assert little_law_concurrency(cfg) == 50.0
    varied = closed(concurrency=50, synthetic={"period": None})
    events = take(Schedule(varied, 120, 0, workload=workload(120, K=5)), 200_000)
    assert set(_in_flight_at_each_time(events).values()) == {50}
    _, _, tau = _replay(events, K=5)
    assert tau == pytest.approx(50 / 5, rel=0.05)


def _in_flight_at_each_time(events):
    """Jobs in flight after all events at each time (the last time left out: it may be cut short)."""
    flight, out = 0, {}
    for e in events:
        flight += 1 if e.kind == "start" else -1 if e.kind in ("arrival", "drop") else 0
        out[e.time] = flight
    out.pop(events[-1].time)
    return out


# -------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("cfg", [closed(synthetic={"period": 5.0}), opened(synthetic={"period": 5.0}),
                                 closed(restart="same", synthetic={"period": 5.0, "online_fraction": 0.3})],
                         ids=["closed", "open", "closed_same"])
def test_same_seed_same_schedule_different_seed_different(cfg):
    def events(seed):
        return [(e.time, e.kind, e.job, e.client) for e in take(Schedule(cfg, 40, seed, workload=workload(40)), 3000)]

    a = events(5)
    assert a == events(5)
    assert a != events(6)
    assert any(kind == "drop" for _, kind, _, _ in a)


# ----------------------------------------------------------------------------------------------- config
BAD = [
    ({**closed(), "duration": {"sigma": 0.5}}, r"^timing\.duration\.sigma=0\.5: not used by timing=trace"),
    ({**closed(), "rate": 3.0}, r"^timing\.rate=3\.0: only timing\.loop=open_loop uses it"),
    ({**opened(), "concurrency": 3}, r"^timing\.concurrency=3: only timing\.loop=closed_loop uses it"),
    ({**closed(), "restart_model": "before_step"}, r"^timing\.restart_model='before_step': not a timing=trace key"),
    ({**closed(), "trace_file": "x.json"}, r"^timing\.trace_file='x\.json': only timing\.trace=file"),
    ({**closed(), "trace": "file"}, r"^timing\.trace_file=None: timing\.trace=file needs"),
    ({**closed(), "synthetic": {"uplink": 3}}, r"^timing\.synthetic\.uplink=3: unknown key"),
    ({**closed(), "synthetic": {"online_fraction": 2}}, r"^timing\.synthetic\.online_fraction=2: must be a number in"),
    ({**opened(), "offline_start": "wait"}, r"^timing\.offline_start='wait': must be one of redraw, skip"),
    ({**closed(), "loop": "sometimes"}, r"^timing\.loop='sometimes': must be one of"),
    ({**closed(), "finish_offline": "yes"}, r"^timing\.finish_offline='yes': must be true or false"),
]


@pytest.mark.parametrize(("cfg", "message"), BAD, ids=[b[1][2:40] for b in BAD])
def test_bad_trace_timing_values_stop_with_one_line(cfg, message):
    with pytest.raises(ConfigError, match=message) as info:
        Schedule(cfg, 10, 0, workload=workload(10))
    assert "\n" not in str(info.value)


def test_a_trace_schedule_needs_a_workload():
    with pytest.raises(ConfigError, match="needs the run's workload"):
        Schedule(closed(), 10, 0)
    with pytest.raises(ConfigError, match=r"^workload\.samples=3: must have one entry per client"):
        Schedule(closed(), 10, 0, workload=workload(3))


def test_the_timing_group_keeps_its_other_options_unchanged():
    """An open_loop run after adding trace keys: the schema's new keys stay null and change nothing."""
    cfg = validate(compose_cfg("timing=open_loop"))
    assert all(cfg.timing[k] is None for k in ("loop", "offline_start", "finish_offline", "trace", "trace_file",
                                                "synthetic"))


# ------------------------------------------------------------------------------------------------ engine
SMALL = (*FAST, "timing=trace", "dataset.num_clients=20", "run.server_steps=30", "run.eval_every=10",
         "client.local_steps=2")


def run_engine(*overrides: str):
    s = setup_run(compose_cfg(*SMALL, *overrides))
    engine = make_engine(s)
    return s, engine, engine.run()


@pytest.mark.parametrize("algorithm", ["qafel", "fedbuff", "naive"])
def test_trace_timing_runs_under_every_algorithm(tmp_path, algorithm):
    devices = [Device(uplink_kbps=8.0, downlink_kbps=80.0, s_per_sample=0.001)]  # alike, always online
    trace = save_trace(devices, tmp_path / "alike.csv")
    ctx = pytest.warns(UserWarning, match="identity") if algorithm == "fedbuff" else contextlib.nullcontext()
    with ctx:
        s, engine, summary = run_engine(f"algorithm={algorithm}", "timing.trace=file", f"timing.trace_file={trace}",
                                        "client_quantizer=minmax", "server_quantizer=minmax", "timing.concurrency=5")
    assert summary["status"] == "completed" and summary["server_steps"] == 30
    assert all(summary[k] is not None for k in TRACE_SUMMARY_KEYS)
    up = summary["message_bytes_up"]
    assert summary["upload_time_total"] == pytest.approx(summary["uploads"] * up / 1000.0, rel=1e-12)
    assert summary["upload_time_mean"] == pytest.approx(up / 1000.0, rel=1e-12)
    assert summary["communication_time_total"] == pytest.approx(summary["download_time_total"]
                                                                + summary["upload_time_total"], rel=1e-12)
    assert summary["mean_online_fraction"] == pytest.approx(1.0)
    assert summary["mean_concurrency"] == pytest.approx(5.0)  # closed loop, everyone online: exactly C
    assert summary["dropped_by_reason"] == {"stale": 0, "offline": 0}
    if algorithm == "naive":
        assert summary["bytes_down_clients"] == summary["bytes_down_naive"]  # one Q_s(x) per job start
    else:  # catch-up: never more than a full model per start, never less than the missed broadcasts need
        assert 0 < summary["bytes_down_clients"] <= summary["jobs_started"] * 4 * summary["num_parameters"]
    assert engine.history[-1]["online_fraction"] == 1.0


def test_qafel_with_identity_quantizers_equals_fedbuff_bit_for_bit_under_traces():
    qafel, qe, qs = run_engine("algorithm=qafel", "client_quantizer=identity", "server_quantizer=identity")
    fed, fe, fs = run_engine("algorithm=fedbuff", "client_quantizer=identity", "server_quantizer=identity")
    assert torch.equal(qe.x, fe.x)
    for key in ("sim_time", "uploads", "bytes_down_clients", "download_time_total", "mean_staleness"):
        assert qs[key] == fs[key]


def test_qafel_reaches_the_same_steps_in_less_simulated_time_on_slow_uplinks():
    """4-bit uploads take an eighth of fp32's time: the same 30 server steps end sooner."""
    slow = ("timing.synthetic.uplink_kbps=50", "timing.synthetic.period=null")
    _, _, q = run_engine("algorithm=qafel", "client_quantizer=minmax", "server_quantizer=minmax", *slow)
    _, _, f = run_engine("algorithm=fedbuff", *slow)
    assert q["upload_time_mean"] < f["upload_time_mean"] / 5
    assert q["sim_time"] < f["sim_time"] / 2


def test_offline_drops_are_counted_by_reason_and_never_trained(monkeypatch):
    s = setup_run(compose_cfg(*SMALL, "timing.synthetic.period=20", "timing.synthetic.online_fraction=0.4",
                              "server.max_staleness=0", "run.server_steps=40"))
    engine = make_engine(s)
    trained = set()
    real = engine.trainer.train

    def spy(starts, clients, seeds):
        trained.update(seeds)
        return real(starts, clients, seeds)

    monkeypatch.setattr(engine.trainer, "train", spy)
    dropped = []
    schedule = s.schedule

    def watch():
        for e in schedule:
            if e.kind == "drop":
                dropped.append(e.job.job_id)
            yield e

    engine.schedule = watch()
    summary = engine.run()
    reasons = summary["dropped_by_reason"]
    assert reasons["offline"] == len(dropped) > 0 and reasons["stale"] > 0
    assert summary["dropped_updates"] == reasons["offline"] + reasons["stale"]
    assert summary["jobs_started"] == summary["uploads"] + reasons["offline"] + len(engine.jobs)
    assert not trained & {job_seed(s.cfg.seed, STREAM_CLIENT_TRAIN, j) for j in dropped}
    assert summary["offline_lost_time_total"] > 0
    assert 0 < summary["mean_online_fraction"] < 1


def test_resume_under_trace_timing_matches_an_uninterrupted_run(tmp_path):
    setting = (*SMALL, "timing.synthetic.period=20", "run.server_steps=40", "run.checkpoint_every=20")

    class Crash(Exception):
        pass

    def crash(record):
        if record["server_step"] == 30:
            raise Crash

    full = run_experiment(compose_cfg(*setting), tmp_path / "full")
    with pytest.raises(Crash):
        run_experiment(compose_cfg(*setting), tmp_path / "cut", on_eval=crash)
    resumed = run_experiment(compose_cfg(*setting), tmp_path / "cut", resume=True)
    volatile = {"wall_time_s", "run_dir", "resumed", "run_id"}
    assert {k: v for k, v in resumed.items() if k not in volatile} == \
        {k: v for k, v in full.items() if k not in volatile}
    assert full["dropped_by_reason"]["offline"] > 0


def test_summary_and_records_of_a_trace_run(tmp_path):
    summary = run_experiment(compose_cfg(*SMALL, "run.target_accuracy=0.3"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    hit = next(r for r in records if r["accuracy"] >= 0.3)
    assert summary["time_to_target"] == hit["sim_time"] > 0
    assert all("online_fraction" in r and "sim_time" in r for r in records)
    assert summary["offline_skipped_starts"] == summary["redrawn_starts"] == 0  # closed loop: never
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["dropped_by_reason"] == summary["dropped_by_reason"]


def test_run_py_refuses_a_bad_trace_file_with_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "qafel-trace/1", "clients": [{"uplink_kbps": -3, "downlink_kbps": 1, '
                   '"s_per_sample": 0.1}]}')
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "timing=trace", "timing.trace=file",
                           f"timing.trace_file={bad}", "tracking=none", "run.progress=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {bad}: clients[0]: uplink_kbps=-3 must be > 0"], proc.stderr[-2000:]
