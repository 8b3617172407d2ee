"""Tests for qafel.sim.timing: event order, Little's law, closed loop, staleness, determinism, distributions."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from qafel.errors import ConfigError
from qafel.sim.timing import Event, Job, Schedule, little_law_concurrency

SQRT_2_PI = math.sqrt(2.0 / math.pi)


def open_cfg(**kw):
    cfg = {"name": "open_loop", "arrival": "poisson", "rate": 100.0, "sample_busy_clients": True}
    cfg.update(kw)
    return cfg


def closed_cfg(**kw):
    cfg = {"name": "closed_loop", "concurrency": 100, "restart": "same"}
    cfg.update(kw)
    return cfg


def take(sched, n):
    return list(itertools.islice(sched, n))


def durations(cfg, n_jobs, num_clients=1000, seed=0, client_sizes=None):
    """Durations (and clients) of the first n_jobs jobs, from their start events."""
    sched = Schedule(cfg, num_clients, seed, client_sizes)
    durs, clients = [], []
    for ev in sched:
        if ev.kind == "start":
            durs.append(ev.job.end - ev.job.start)
            clients.append(ev.job.client)
            if len(durs) == n_jobs:
                break
    return np.array(durs), np.array(clients)


def time_avg_in_flight(sched, n_events, warmup):
    """Integral of in_flight over time / window length, over events with time > warmup."""
    area = 0.0
    prev_t, prev_n = None, 0
    for ev in itertools.islice(sched, n_events):
        if prev_t is not None and prev_t >= warmup:
            area += prev_n * (ev.time - prev_t)
        elif prev_t is not None and ev.time > warmup:
            area += prev_n * (ev.time - warmup)
        prev_t, prev_n = ev.time, sched.in_flight
    return area / (prev_t - warmup)


EQUAL_SIZES = [5] * 10
ORDER_CASES = {
    "open_poisson_halfnormal": (open_cfg(), 1000, None),
    "open_constant_exponential": (
        open_cfg(arrival="constant", duration={"distribution": "exponential"}),
        50,
        None,
    ),
    "open_idle_only": (open_cfg(sample_busy_clients=False), 60, None),
    # constant starts every 1 and durations exactly 2: arrivals and starts tie at every integer time
    "open_ties": (
        open_cfg(arrival="constant", rate=1.0, duration={"distribution": "per_example", "mean": 2.0}),
        10,
        EQUAL_SIZES,
    ),
    "closed_same": (closed_cfg(concurrency=30), 100, None),
    "closed_random_idle": (closed_cfg(concurrency=30, restart="random_idle"), 100, None),
    # all C jobs last exactly 1: C arrivals then C starts at every integer time
    "closed_ties": (closed_cfg(concurrency=5, duration={"distribution": "per_example"}), 10, EQUAL_SIZES),
}


# ------------------------------------------------------------------------------------------ 1. order


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_event_order(case):
    cfg, n, sizes = ORDER_CASES[case]
    sched = Schedule(cfg, n, 3, sizes)
    events = take(sched, 20_000)
    assert all(isinstance(e, Event) and isinstance(e.job, Job) for e in events)
    keys = [(e.time, 0 if e.kind == "arrival" else 1, e.job.job_id) for e in events]
    assert keys == sorted(keys), "events not ordered by (time, arrival before start, job_id)"
    assert len(set(keys)) == len(keys)
    started = set()
    next_id = 0
    for e in events:
        assert e.kind in ("start", "arrival")
        assert 0 <= e.job.client < n
        assert e.job.end >= e.job.start
        if e.kind == "start":
            assert e.time == e.job.start
            assert e.job.job_id == next_id, "job ids must be 0, 1, 2, ... in start order"
            next_id += 1
            started.add(e.job.job_id)
        else:
            assert e.time == e.job.end
            assert e.job.job_id in started, "arrival before its start"
            started.remove(e.job.job_id)
    if "ties" in case:
        same_time = sum(a.time == b.time and a.kind != b.kind for a, b in itertools.pairwise(events))
        assert same_time > 1000, "the tie cases must actually produce arrival/start ties"


def test_ties_closed_loop_arrivals_then_starts():
    sched = Schedule(closed_cfg(concurrency=5, duration={"distribution": "per_example"}), 10, 0, EQUAL_SIZES)
    events = take(sched, 25)
    assert [e.kind for e in events[:5]] == ["start"] * 5 and {e.time for e in events[:5]} == {0.0}
    assert [e.kind for e in events[5:15]] == ["arrival"] * 5 + ["start"] * 5
    assert {e.time for e in events[5:15]} == {1.0}
    assert [e.job.job_id for e in events[5:10]] == [0, 1, 2, 3, 4]
    assert [e.job.job_id for e in events[10:15]] == [5, 6, 7, 8, 9]


# --------------------------------------------------------------------------------------- 2. Little


@pytest.mark.parametrize(
    "cfg",
    [
        open_cfg(),
        open_cfg(arrival="constant"),
        open_cfg(duration={"distribution": "exponential", "mean": 1.0}),
    ],
    ids=["poisson_halfnormal", "constant_halfnormal", "poisson_exponential"],
)
def test_little_law_open_loop(cfg):
    expected = little_law_concurrency(cfg)
    sched = Schedule(cfg, 1000, 11)
    got = time_avg_in_flight(sched, 200_000, warmup=20.0)
    assert got == pytest.approx(expected, rel=0.03)
    if cfg.get("duration") is None:
        assert expected == pytest.approx(100 * SQRT_2_PI)  # ~79.8, the paper's setting


def test_little_law_concurrency_formula():
    assert little_law_concurrency(open_cfg()) == pytest.approx(100 * SQRT_2_PI)
    hn = {"distribution": "halfnormal", "sigma": 2.0, "min": 0.5, "client_speed_sigma": 0.4}
    assert little_law_concurrency(open_cfg(rate=10.0, duration=hn)) == pytest.approx(
        10 * (0.5 + 2 * SQRT_2_PI * math.exp(0.08))
    )
    uni = {"distribution": "uniform", "min": 1.0, "max": 3.0}
    assert little_law_concurrency(open_cfg(rate=4.0, duration=uni)) == pytest.approx(8.0)
    logn = {"distribution": "lognormal", "mean": 2.0, "sigma": 0.7, "min": 1.0}
    assert little_law_concurrency(open_cfg(rate=5.0, duration=logn)) == pytest.approx(15.0)
    assert little_law_concurrency(open_cfg(duration={"distribution": "per_example"})) is None
    assert little_law_concurrency(closed_cfg(concurrency=37)) == 37.0


# ---------------------------------------------------------------------------------- 3. closed loop


def _check_closed(sched, conc, n_events):
    """Walk the events: C distinct starts at t=0, then exactly C in flight at the end of each time stamp."""
    events = take(sched, n_events)
    first = events[:conc]
    assert all(e.kind == "start" and e.time == 0.0 for e in first)
    assert len({e.job.client for e in first}) == conc
    assert events[conc].kind == "arrival"
    busy: dict[int, int] = {}
    count = 0
    for i, e in enumerate(events):
        if e.kind == "start":
            assert e.job.client not in busy, "closed loop started a busy client"
            busy[e.job.client] = e.job.job_id
            count += 1
        else:
            assert busy.pop(e.job.client) == e.job.job_id
            count -= 1
        assert 0 < count <= conc
        last_at_time = i + 1 == len(events) or events[i + 1].time > e.time
        if i >= conc and last_at_time:
            assert count == conc, f"{count} in flight at t={e.time}, want {conc}"
    return events


@pytest.mark.parametrize("restart", ["same", "random_idle"])
def test_closed_loop_in_flight_exactly_c(restart):
    sched = Schedule(closed_cfg(concurrency=40, restart=restart), 100, 5)
    seen = []
    for e in itertools.islice(sched, 30_000):
        seen.append((e.kind, sched.in_flight))
    starts_after_init = [n for k, n in seen[40:] if k == "start"]
    arrivals = [n for k, n in seen if k == "arrival"]
    assert set(starts_after_init) == {40}
    assert set(arrivals) == {39}
    _check_closed(Schedule(closed_cfg(concurrency=40, restart=restart), 100, 5), 40, 30_000)


def test_closed_loop_restart_same():
    events = take(Schedule(closed_cfg(concurrency=30), 100, 1), 20_000)
    for a, b in itertools.pairwise(events[30:]):
        if a.kind == "arrival":
            assert b.kind == "start" and b.time == a.time and b.job.client == a.job.client


def test_closed_loop_random_idle():
    sched = Schedule(closed_cfg(concurrency=30, restart="random_idle"), 100, 1)
    events = _check_closed(sched, 30, 20_000)
    switched = sum(
        a.kind == "arrival" and b.kind == "start" and b.job.client != a.job.client
        for a, b in itertools.pairwise(events)
    )
    restarts = sum(e.kind == "start" for e in events[30:])
    assert switched / restarts > 0.5, "random_idle should mostly restart another client (70 of 71 are idle)"
    assert len({e.job.client for e in events}) == 100


@pytest.mark.parametrize("restart", ["same", "random_idle"])
def test_closed_loop_all_clients_busy(restart):
    sched = Schedule(closed_cfg(concurrency=20, restart=restart), 20, 2)
    events = _check_closed(sched, 20, 10_000)
    busy = set()
    for i, e in enumerate(events):
        if e.kind == "start":
            busy.add(e.job.client)
        else:
            busy.remove(e.job.client)
        if i + 1 < len(events) and events[i + 1].time > e.time:
            assert busy == set(range(20))


# ----------------------------------------------------------------------------- 4. open loop, idle


def test_open_loop_idle_only_and_skips():
    n = 5
    sched = Schedule(open_cfg(arrival="constant", rate=100.0, sample_busy_clients=False), n, 4)
    busy = set()
    n_starts = 0
    for e in itertools.islice(sched, 20_000):
        if e.kind == "start":
            assert e.job.client not in busy, "started a busy client"
            busy.add(e.job.client)
            n_starts += 1
            # constant arrivals: the k-th start slot is at k/rate; every slot so far was a start or a skip
            assert n_starts + sched.skipped_starts == round(e.time * 100.0)
        else:
            busy.remove(e.job.client)
        assert sched.in_flight == len(busy) <= n
    assert sched.skipped_starts > 10 * n_starts  # 5 clients, ~80 wanted in flight: most starts are skipped


def test_open_loop_samples_busy_clients():
    sched = Schedule(open_cfg(rate=100.0, sample_busy_clients=True), 5, 4)
    busy: dict[int, int] = {}
    busy_starts = 0
    for e in itertools.islice(sched, 5_000):
        c = e.job.client
        if e.kind == "start":
            busy_starts += busy.get(c, 0) > 0
            busy[c] = busy.get(c, 0) + 1
        else:
            busy[c] -= 1
    assert busy_starts > 1000
    assert sched.skipped_starts == 0
    assert sched.in_flight == sum(busy.values()) > 5


# ------------------------------------------------------------------------------------- 5. staleness


def mean_staleness(sched, n_events, k, warmup):
    steps = arrivals = 0
    start_step: dict[int, int] = {}
    taus = []
    for e in itertools.islice(sched, n_events):
        if e.kind == "start":
            start_step[e.job.job_id] = steps
        else:
            tau = steps - start_step.pop(e.job.job_id)
            if e.job.start > warmup:
                taus.append(tau)
            arrivals += 1
            if arrivals == k:
                steps, arrivals = steps + 1, 0
    return float(np.mean(taus))


def test_staleness_open_loop():
    cfg = open_cfg()
    got = mean_staleness(Schedule(cfg, 1000, 9), 200_000, k=10, warmup=20.0)
    assert got == pytest.approx(little_law_concurrency(cfg) / 10, rel=0.10)  # ~8


def test_staleness_closed_loop():
    got = mean_staleness(Schedule(closed_cfg(concurrency=100), 100, 9), 200_000, k=10, warmup=5.0)
    assert got == pytest.approx(100 / 10, rel=0.10)


# ----------------------------------------------------------------------------------- 6. determinism


DET_CASES = [open_cfg(), open_cfg(sample_busy_clients=False), closed_cfg(restart="random_idle")]


@pytest.mark.parametrize("cfg", DET_CASES, ids=["open", "open_idle", "closed_random_idle"])
def test_same_seed_same_events(cfg):
    np.random.seed(1)
    a = take(Schedule(cfg, 150, 42), 10_000)
    np.random.seed(2)  # the global numpy state must not matter
    b = take(Schedule(cfg, 150, 42), 10_000)
    assert a == b
    c = take(Schedule(cfg, 150, 43), 10_000)
    assert a != c
    assert [e.time for e in a] != [e.time for e in c]


@pytest.mark.parametrize("cfg", DET_CASES, ids=["open", "open_idle", "closed_random_idle"])
def test_chunked_consumption_identical(cfg):
    whole = take(Schedule(cfg, 150, 7), 12_000)
    sched = Schedule(cfg, 150, 7)
    other = Schedule(cfg, 150, 7)  # interleaved consumption of a twin must not interfere
    chunks = []
    for size in itertools.cycle([1, 7, 4095, 2, 4097, 13]):
        chunks.extend(take(sched, min(size, 12_000 - len(chunks))))
        take(other, 3)
        if len(chunks) == 12_000:
            break
    assert chunks == whole
    twin = Schedule(cfg, 150, 7)
    take(twin, 12_000)
    assert sched.in_flight == twin.in_flight


def test_omegaconf_config_matches_dict():
    omegaconf = pytest.importorskip("omegaconf")
    yaml = """
name: open_loop
arrival: poisson
rate: 100.0
sample_busy_clients: true
duration: {distribution: halfnormal, sigma: 1.0, min: 0.0, mean: 1.0, max: null, client_speed_sigma: 0.0}
"""
    cfg = omegaconf.OmegaConf.create(yaml)
    assert take(Schedule(cfg, 100, 0), 3000) == take(Schedule(open_cfg(), 100, 0), 3000)
    assert little_law_concurrency(cfg) == pytest.approx(100 * SQRT_2_PI)


# ---------------------------------------------------------------------------------- 7. distributions

DIST_CASES = {
    "halfnormal": (
        {"distribution": "halfnormal", "sigma": 2.0, "min": 0.5},
        0.5 + 2 * SQRT_2_PI,
        2.0 * math.sqrt(1 - 2 / math.pi),
    ),
    "exponential": ({"distribution": "exponential", "mean": 3.0, "min": 0.2}, 3.2, 3.0),
    "uniform": ({"distribution": "uniform", "min": 1.0, "max": 3.0}, 2.0, 2.0 / math.sqrt(12)),
    "lognormal": (
        {"distribution": "lognormal", "mean": 2.0, "sigma": 0.5, "min": 0.1},
        2.1,
        2.0 * math.sqrt(math.exp(0.25) - 1),
    ),
}


@pytest.mark.parametrize("name", list(DIST_CASES))
def test_distribution_moments(name):
    node, mean, sd = DIST_CASES[name]
    d, _ = durations(open_cfg(duration=node), 60_000)
    assert d.mean() == pytest.approx(mean, rel=0.03)
    assert d.std() == pytest.approx(sd, rel=0.05)
    assert d.min() >= node.get("min", 0.0)
    if "max" in node:
        assert d.max() <= node["max"]


def test_halfnormal_default_is_the_paper():
    d, _ = durations(open_cfg(), 60_000)
    assert d.mean() == pytest.approx(SQRT_2_PI, rel=0.03)
    assert d.min() >= 0.0


def _per_client_means(d, clients, n):
    return np.array([d[clients == c].mean() for c in range(n)])


def test_client_speed_is_persistent():
    n = 20
    node = {"distribution": "exponential", "mean": 1.0, "client_speed_sigma": 0.5}
    d, clients = durations(open_cfg(duration=node), 60_000, num_clients=n)
    half = len(d) // 2
    m1 = _per_client_means(d[:half], clients[:half], n)
    m2 = _per_client_means(d[half:], clients[half:], n)
    assert np.corrcoef(m1, m2)[0, 1] > 0.9, "slow clients must stay slow"
    assert m1.max() / m1.min() > 1.5
    speed = np.array(Schedule(open_cfg(duration=node), n, 0).client_speed)
    assert np.corrcoef(m1, speed)[0, 1] > 0.95

    flat, flat_clients = durations(open_cfg(duration={"distribution": "exponential"}), 60_000, num_clients=n)
    f = _per_client_means(flat, flat_clients, n)
    assert f.max() / f.min() < 1.2
    assert Schedule(open_cfg(), n, 0).client_speed == (1.0,) * n


def test_client_speed_multiplies_only_the_part_above_min():
    node = {"distribution": "halfnormal", "sigma": 1.0, "min": 2.0, "client_speed_sigma": 1.0}
    sched = Schedule(open_cfg(duration=node), 4, 0)
    base, _ = durations(open_cfg(duration={"distribution": "halfnormal", "sigma": 1.0, "min": 2.0}), 5000, 4)
    d, clients = durations(open_cfg(duration=node), 5000, 4)
    speed = np.array(sched.client_speed)
    # the same seed gives the same random parts: only the speed factor differs
    np.testing.assert_allclose(d - 2.0, (base - 2.0) * speed[clients], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("speed_sigma", [0.0, 0.3])
def test_per_example_proportional_to_size(speed_sigma):
    sizes = [10, 20, 40, 5, 25]
    node = {"distribution": "per_example", "mean": 2.0, "min": 0.5, "client_speed_sigma": speed_sigma}
    sched = Schedule(closed_cfg(concurrency=3, restart="random_idle", duration=node), 5, 0, sizes)
    speed = sched.client_speed
    avg = np.mean(sizes)
    seen = set()
    for e in itertools.islice(sched, 2000):
        c = e.job.client
        want = 0.5 + 2.0 * sizes[c] / avg * speed[c]
        assert e.job.end - e.job.start == pytest.approx(want, rel=1e-12)
        seen.add(c)
    assert seen == set(range(5))


def test_per_example_open_loop_numpy_sizes():
    sizes = np.array([1, 2, 3, 4])
    d, clients = durations(open_cfg(duration={"distribution": "per_example"}), 500, 4, client_sizes=sizes)
    np.testing.assert_allclose(d, sizes[clients] / sizes.mean())


# ----------------------------------------------------------------------------------- 8. bad values


BAD = [
    ({"name": "x"}, 100, None, "timing.name='x': must be one of open_loop, closed_loop"),
    ({"rate": 5.0}, 100, None, "timing.name=None: must be one of open_loop, closed_loop"),
    (open_cfg(rate=0), 100, None, "timing.rate=0: must be > 0"),
    (open_cfg(rate=-3.0), 100, None, "timing.rate=-3.0: must be > 0"),
    (open_cfg(rate="fast"), 100, None, "timing.rate='fast': must be a finite number > 0"),
    (open_cfg(rate=float("nan")), 100, None, "timing.rate=nan"),
    (open_cfg(arrival="x"), 100, None, "timing.arrival='x': must be one of constant, poisson"),
    (open_cfg(sample_busy_clients="yes"), 100, None, "timing.sample_busy_clients='yes'"),
    (open_cfg(concurrency=5), 100, None, "timing.concurrency=5: unknown key"),
    (open_cfg(rat=5), 100, None, "timing.rat=5: unknown key; allowed: name, arrival, rate"),
    (closed_cfg(concurrency=500), 100, None, "timing.concurrency=500: must be between 1 and num_clients=100"),
    (closed_cfg(concurrency=0), 100, None, "timing.concurrency=0: must be between 1 and num_clients=100"),
    (closed_cfg(concurrency=2.5), 100, None, "timing.concurrency=2.5: must be an integer"),
    (closed_cfg(concurrency=True), 100, None, "timing.concurrency=True"),
    (closed_cfg(restart="x"), 100, None, "timing.restart='x': must be one of same, random_idle"),
    (closed_cfg(rate=3.0), 100, None, "timing.rate=3.0: unknown key"),
    (
        open_cfg(duration={"distribution": "gamma"}),
        100,
        None,
        "timing.duration.distribution='gamma': must be one of halfnormal, exponential, uniform, lognormal, "
        "per_example",
    ),
    (open_cfg(duration={"sigma": 0}), 100, None, "timing.duration.sigma=0: must be > 0"),
    (
        open_cfg(duration={"distribution": "lognormal", "sigma": -1.0}),
        100,
        None,
        "timing.duration.sigma=-1.0: must be >= 0",
    ),
    (
        open_cfg(duration={"distribution": "exponential", "mean": 0}),
        100,
        None,
        "timing.duration.mean=0: must be > 0",
    ),
    (open_cfg(duration={"distribution": "uniform"}), 100, None, "timing.duration.max=None: uniform needs"),
    (
        open_cfg(duration={"distribution": "uniform", "min": 2.0, "max": 2.0}),
        100,
        None,
        "timing.duration.max=2.0: must be > 2",
    ),
    (open_cfg(duration={"min": -1.0}), 100, None, "timing.duration.min=-1.0: must be >= 0"),
    (open_cfg(duration={"max": 5.0}), 100, None, "timing.duration.max=5.0: must be null"),
    (
        open_cfg(duration={"client_speed_sigma": -0.1}),
        100,
        None,
        "timing.duration.client_speed_sigma=-0.1: must be >= 0",
    ),
    (open_cfg(duration={"sigmaa": 1.0}), 100, None, "timing.duration.sigmaa=1.0: unknown key"),
    (open_cfg(duration=3), 100, None, "timing.duration=3: must be a mapping"),
    (open_cfg(duration={"distribution": "per_example"}), 100, None, "client_sizes=None"),
    (open_cfg(), 3, [1, 2], "client_sizes="),
    (open_cfg(), 3, [1, -2, 3], "client_sizes=-2: must all be >= 0"),
    (open_cfg(duration={"distribution": "per_example"}), 3, [1, 0, 3], "client_sizes=0: per_example"),
    (open_cfg(), 0, None, "num_clients=0: must be an integer >= 1"),
]


@pytest.mark.parametrize(("cfg", "n", "sizes", "message"), BAD, ids=[b[3][:45] for b in BAD])
def test_bad_values_raise_config_error(cfg, n, sizes, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        Schedule(cfg, n, 0, sizes)


def test_bad_seed_and_little_law_validation():
    with pytest.raises(ConfigError, match=r"^seed=-1"):
        Schedule(open_cfg(), 10, -1)
    with pytest.raises(ConfigError, match=r"^timing\.rate=0"):
        little_law_concurrency(open_cfg(rate=0))
    with pytest.raises(ConfigError, match=r"^timing\.concurrency=0"):
        little_law_concurrency(closed_cfg(concurrency=0))


def test_defaults_fill_missing_keys():
    a = take(Schedule({"name": "open_loop"}, 100, 0), 2000)
    b = take(
        Schedule(open_cfg(duration={"distribution": "halfnormal", "sigma": 1.0, "min": 0.0}), 100, 0), 2000
    )
    assert a == b
    c = take(Schedule({"name": "closed_loop", "duration": None}, 100, 0), 2000)
    assert c == take(Schedule(closed_cfg(), 100, 0), 2000)
