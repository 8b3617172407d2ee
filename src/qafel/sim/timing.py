"""The asynchronous system's event schedule (ALGORITHMS.md section 6).

Timing is exogenous: who trains when never depends on model values, so the schedule is generated from its own
seeded generator and is identical for every algorithm given the same seed (QAFeL and FedBuff see the same jobs,
job for job; under ``timing=trace`` durations depend on each algorithm's payload sizes, so the algorithms share
the devices, availability and random streams, not the jobs). A :class:`Schedule` is an infinite, lazily
generated, time-ordered stream of :class:`Event` s: a ``"start"`` when a client begins a job and an
``"arrival"`` when the job's update reaches the server. Order: by time; at equal times arrivals before starts;
then by job id.

Config (``timing`` node, plain dict or OmegaConf DictConfig; missing optional keys take the defaults shown)::

    # timing=open_loop (FLSim; the paper's neural-network runs)
    name: open_loop
    arrival: poisson          # constant: the k-th start (k >= 1) is at k/rate;
                              # poisson: starts are a Poisson process of rate `rate`
    rate: 100.0               # > 0
    sample_busy_clients: true # true (FLSim): each start picks a client uniformly at random WITH replacement,
                              # even if busy. false: uniformly among idle clients; if none is idle the start
                              # is skipped and counted in Schedule.skipped_starts
    duration: {distribution: halfnormal, sigma: 1.0, min: 0.0, mean: 1.0, max: null, client_speed_sigma: 0.0}

    # timing=closed_loop (the authors' logistic-regression code)
    name: closed_loop
    concurrency: 100          # C jobs always in flight, 1..num_clients; at t=0, C distinct random
                              # clients start
    restart: same             # same: when a job arrives, that client starts a new job at once (same time);
                              # random_idle: a uniformly random idle client (the one that just finished
                              # counts as idle) starts instead
    restart_model: before_step  # which model such a restart starts from when the arrival completes the server's
                              # buffer: before_step (the authors' LR code: the model before that server step) or
                              # after_step (the updated model). The engine applies it (Schedule.restart_model);
                              # the i-th start at an arrival's time is the restart of the i-th arrival at that time
    duration: {...same node...}

    # timing=trace (docs/traces.md): durations from device traces and the bytes each job moves
    name: trace
    loop: closed_loop         # closed_loop (concurrency, restart) | open_loop (arrival, rate, sample_busy_clients,
                              # offline_start); the other loop's keys must be null
    offline_start: redraw     # open loop: a start whose client is offline picks uniformly among online clients
                              # (redraw, counted in redrawn_starts) or is skipped (skip, offline_skipped_starts)
    finish_offline: false     # false: a job whose client goes offline before it ends is dropped at that moment
    trace: synthetic          # synthetic (the `synthetic` node: qafel.sim.traces.SYNTHETIC_DEFAULTS) | file
    trace_file: null          # trace=file: a .json or .csv trace (qafel.sim.traces.load_trace); client i uses row
                              # i mod rows

Duration node (``distribution`` and the keys it uses; the other keys are ignored):

- ``halfnormal``: min + |N(0, sigma^2)|, sigma > 0 (the paper: sigma = 1, min = 0).
- ``exponential``: min + Exponential with mean ``mean`` > 0.
- ``uniform``: Uniform(min, max), max > min required.
- ``lognormal``: min + exp(N(log(mean) - sigma^2/2, sigma^2)), sigma >= 0: the random part has mean ``mean``.
- ``per_example``: min + mean * n_client / mean(client_sizes): deterministic, proportional to the client's
  data size; needs ``client_sizes``.
- ``min`` >= 0 (default 0); ``max`` is used by ``uniform`` only and must be null otherwise.
- ``client_speed_sigma`` >= 0 (default 0): a persistent per-client slowness factor exp(N(0, s^2)), drawn once
  per client at construction, multiplies the part above ``min`` for every job of that client.

Trace timing (``name: trace``): closed-loop restarts start from the model current at their start
(``restart_model`` is not a trace key); ``same`` waits until its client is online again, ``random_idle`` picks
among idle online clients (or waits for one). The ``duration`` node must keep its defaults: durations come from
the trace. A trace schedule needs ``workload`` (qafel.sim.trace_timing.Workload: payload sizes and local work); it
also yields ``"drop"`` events (a job lost when its client went offline, at that moment) and ``"online"`` /
``"offline"`` events (``Event.client``; the clients online at 0 first). Order at equal times: arrivals,
availability changes, drops, starts.

Random numbers: four independent streams (start gaps, client choices, durations, client speeds) spawned from
``numpy.random.SeedSequence([seed, _TIMING_TAG])`` and drawn in fixed-size blocks, so the k-th job's duration
draw and the k-th choice draw never depend on how many events a caller consumes or when: the stream is a pure
function of (cfg, num_clients, seed, client_sizes).
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qafel.errors import ConfigError

if TYPE_CHECKING:
    from qafel.sim.trace_timing import Workload
    from qafel.sim.traces import Device

__all__ = [
    "ARRIVALS",
    "DISTRIBUTIONS",
    "LOOPS",
    "NAMES",
    "RESTARTS",
    "Event",
    "Job",
    "Schedule",
    "little_law_concurrency",
]

NAMES = ("open_loop", "closed_loop", "trace")
LOOPS = ("closed_loop", "open_loop")
OFFLINE_STARTS = ("redraw", "skip")
TRACE_SOURCES = ("synthetic", "file")
ARRIVALS = ("constant", "poisson")
RESTARTS = ("same", "random_idle")
RESTART_MODELS = ("before_step", "after_step")
DISTRIBUTIONS = ("halfnormal", "exponential", "uniform", "lognormal", "per_example")

_OPEN_KEYS = ("name", "arrival", "rate", "sample_busy_clients", "duration")
_CLOSED_KEYS = ("name", "concurrency", "restart", "restart_model", "duration")
_TRACE_OPEN = ("arrival", "rate", "sample_busy_clients", "offline_start")
_TRACE_CLOSED = ("concurrency", "restart")
_TRACE_KEYS = ("name", "loop", *_TRACE_OPEN, *_TRACE_CLOSED, "finish_offline", "trace", "trace_file", "synthetic",
               "duration")
_DURATION_KEYS = ("distribution", "sigma", "min", "mean", "max", "client_speed_sigma")
_DURATION_DEFAULTS: dict[str, Any] = {
    "distribution": "halfnormal",
    "sigma": 1.0,
    "min": 0.0,
    "mean": 1.0,
    "max": None,
    "client_speed_sigma": 0.0,
}
_BLOCK = 4096  # random numbers drawn per refill of a stream's buffer
_TIMING_TAG = 0x71_A7E1  # mixed into the seed so the schedule's streams differ from other users of `seed`


@dataclass(frozen=True, slots=True)
class Job:
    """One client job: started by ``client`` at ``start``; its update reaches the server at ``end``.

    Trace timing only: the planned seconds spent downloading, computing and uploading (end = start + their sum),
    the bytes the client received to start, and whether the job is lost (then ``end`` is when its client went
    offline)."""

    job_id: int  # 0, 1, 2, ... in start order
    client: int  # 0..num_clients-1
    start: float
    end: float  # arrival time at the server = start + duration
    download: float = 0.0
    compute: float = 0.0
    upload: float = 0.0
    bytes_down: int = 0
    dropped: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """A job's ``"start"`` (at ``job.start``), ``"arrival"`` at the server or ``"drop"`` (at ``job.end``), or
    (trace timing) client ``client`` going ``"online"`` or ``"offline"`` (``job`` None)."""

    time: float
    kind: str  # "arrival", "start", "drop", "online", "offline"
    job: Job | None
    client: int = -1


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _Duration:
    distribution: str
    sigma: float
    min: float
    mean: float
    max: float | None
    client_speed_sigma: float


@dataclass(frozen=True)
class _Timing:
    name: str
    duration: _Duration
    arrival: str = "poisson"
    rate: float = 100.0
    sample_busy_clients: bool = True
    concurrency: int = 100
    restart: str = "same"
    restart_model: str = "before_step"
    loop: str = ""                 # trace: closed_loop | open_loop
    offline_start: str = "redraw"  # trace, open loop
    finish_offline: bool = False   # trace
    trace: str = "synthetic"       # trace: synthetic | file
    trace_file: str | None = None
    synthetic: dict[str, Any] | None = None


def _get(node: Mapping[str, Any], key: str, default: Any) -> Any:
    value = node.get(key, default)
    return default if value is None and default is not None else value


def _choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(key, value, "must be one of " + ", ".join(allowed))
    return value


def _real(key: str, value: Any, *, gt: float | None = None, ge: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        bound = f" > {gt:g}" if gt is not None else f" >= {ge:g}" if ge is not None else ""
        raise ConfigError(key, value, "must be a finite number" + bound)
    x = float(value)
    if gt is not None and not x > gt:
        raise ConfigError(key, value, f"must be > {gt:g}")
    if ge is not None and not x >= ge:
        raise ConfigError(key, value, f"must be >= {ge:g}")
    return x


def _check_keys(prefix: str, node: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{prefix}.{key}", node[key], "unknown key; allowed: " + ", ".join(allowed))


def _parse_duration(node: Any) -> _Duration:
    p = "timing.duration"
    if node is None:
        node = {}
    if not isinstance(node, Mapping) and not hasattr(node, "get"):
        raise ConfigError(p, node, "must be a mapping with keys " + ", ".join(_DURATION_KEYS))
    _check_keys(p, node, _DURATION_KEYS)
    v = {k: _get(node, k, d) for k, d in _DURATION_DEFAULTS.items()}
    dist = _choice(f"{p}.distribution", v["distribution"], DISTRIBUTIONS)
    dmin = _real(f"{p}.min", v["min"], ge=0.0)
    sigma = mean = 0.0
    dmax: float | None = None
    if dist == "halfnormal":
        sigma = _real(f"{p}.sigma", v["sigma"], gt=0.0)
    if dist == "lognormal":
        sigma = _real(f"{p}.sigma", v["sigma"], ge=0.0)
    if dist in ("exponential", "lognormal", "per_example"):
        mean = _real(f"{p}.mean", v["mean"], gt=0.0)
    if dist == "uniform":
        if v["max"] is None:
            raise ConfigError(f"{p}.max", None, f"uniform needs a max > min={dmin:g}")
        dmax = _real(f"{p}.max", v["max"], gt=dmin)
    elif v["max"] is not None:
        raise ConfigError(
            f"{p}.max", v["max"], f"must be null: only distribution=uniform uses max (got {dist})"
        )
    speed = _real(f"{p}.client_speed_sigma", v["client_speed_sigma"], ge=0.0)
    return _Duration(dist, sigma, dmin, mean, dmax, speed)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


def _parse(cfg: Mapping[str, Any], num_clients: int | None) -> _Timing:
    if cfg is None or not hasattr(cfg, "get"):
        raise ConfigError("timing", cfg, "must be a mapping with a name: " + ", ".join(NAMES))
    name = _choice("timing.name", cfg.get("name"), NAMES)
    duration = _parse_duration(cfg.get("duration"))
    if name == "trace":
        return _parse_trace(cfg, duration, num_clients)
    if name == "open_loop":
        _check_keys("timing", cfg, _OPEN_KEYS)
        arrival = _choice("timing.arrival", _get(cfg, "arrival", "poisson"), ARRIVALS)
        rate = _real("timing.rate", _get(cfg, "rate", 100.0), gt=0.0)
        busy = _bool("timing.sample_busy_clients", _get(cfg, "sample_busy_clients", True))
        return _Timing(name, duration, arrival=arrival, rate=rate, sample_busy_clients=busy)
    _check_keys("timing", cfg, _CLOSED_KEYS)
    return _parse_closed(cfg, duration, num_clients, name)


def _parse_closed(cfg: Mapping[str, Any], duration: _Duration, num_clients: int | None, name: str) -> _Timing:
    conc = _get(cfg, "concurrency", 100)
    if isinstance(conc, bool) or not isinstance(conc, numbers.Integral):
        raise ConfigError("timing.concurrency", conc, "must be an integer >= 1")
    conc = int(conc)
    if num_clients is None:
        if conc < 1:
            raise ConfigError("timing.concurrency", conc, "must be an integer >= 1")
    elif not 1 <= conc <= num_clients:
        raise ConfigError("timing.concurrency", conc, f"must be between 1 and num_clients={num_clients}")
    restart = _choice("timing.restart", _get(cfg, "restart", "same"), RESTARTS)
    if name == "trace":
        return _Timing(name, duration, concurrency=conc, restart=restart)
    restart_model = _choice("timing.restart_model", _get(cfg, "restart_model", "before_step"), RESTART_MODELS)
    return _Timing(name, duration, concurrency=conc, restart=restart, restart_model=restart_model)


def _parse_trace(cfg: Mapping[str, Any], duration: _Duration, num_clients: int | None) -> _Timing:
    from qafel.sim.traces import parse_synthetic

    if cfg.get("restart_model") is not None:
        raise ConfigError("timing.restart_model", cfg["restart_model"], "not a timing=trace key: a trace restart "
                          "starts from the model current at its start (it may wait for its client to come online)")
    _check_keys("timing", cfg, _TRACE_KEYS)
    for key, value in (cfg.get("duration") or {}).items():
        if value != _DURATION_DEFAULTS.get(key, value):
            raise ConfigError(f"timing.duration.{key}", value, "not used by timing=trace: job durations come from "
                              "the trace (download + compute + upload); leave the duration node at its defaults")
    loop = _choice("timing.loop", _get(cfg, "loop", "closed_loop"), LOOPS)
    unused = _TRACE_CLOSED if loop == "open_loop" else _TRACE_OPEN
    for key in unused:
        if cfg.get(key) is not None:
            other = "closed_loop" if loop == "open_loop" else "open_loop"
            raise ConfigError(f"timing.{key}", cfg[key], f"only timing.loop={other} uses it (timing.loop={loop}): "
                              "set it to null")
    source = _choice("timing.trace", _get(cfg, "trace", "synthetic"), TRACE_SOURCES)
    trace_file = cfg.get("trace_file")
    if source == "file" and (not isinstance(trace_file, str) or not trace_file):
        raise ConfigError("timing.trace_file", trace_file, "timing.trace=file needs the path of a .json or .csv "
                          "trace (docs/traces.md)")
    if source == "synthetic" and trace_file is not None:
        raise ConfigError("timing.trace_file", trace_file, "only timing.trace=file reads a trace file (this is "
                          "timing.trace=synthetic)")
    synthetic = parse_synthetic(cfg.get("synthetic"))
    finish = _bool("timing.finish_offline", _get(cfg, "finish_offline", False))
    common = {"loop": loop, "finish_offline": finish, "trace": source, "trace_file": trace_file,
              "synthetic": synthetic}
    if loop == "closed_loop":
        closed = _parse_closed(cfg, duration, num_clients, "trace")
        return _Timing("trace", duration, concurrency=closed.concurrency, restart=closed.restart, **common)
    arrival = _choice("timing.arrival", _get(cfg, "arrival", "poisson"), ARRIVALS)
    rate = _real("timing.rate", _get(cfg, "rate", 100.0), gt=0.0)
    busy = _bool("timing.sample_busy_clients", _get(cfg, "sample_busy_clients", True))
    offline = _choice("timing.offline_start", _get(cfg, "offline_start", "redraw"), OFFLINE_STARTS)
    return _Timing("trace", duration, arrival=arrival, rate=rate, sample_busy_clients=busy, offline_start=offline,
                   **common)


def _mean_random_part(d: _Duration) -> float | None:
    """E[duration - min] for one job of a client with speed factor 1 (None for per_example)."""
    if d.distribution == "halfnormal":
        return d.sigma * math.sqrt(2.0 / math.pi)
    if d.distribution in ("exponential", "lognormal"):
        return d.mean
    if d.distribution == "uniform":
        assert d.max is not None
        return (d.max - d.min) / 2.0
    return None


def little_law_concurrency(cfg: Mapping[str, Any]) -> float | None:
    """Expected mean concurrency λ·E[duration] for open loop (None for per_example or closed loop: C).

    Open loop: rate times the expected duration min + E[random part]·exp(client_speed_sigma²/2), the
    expectation over clients' speed factors too (one realisation of the factors can differ). With
    ``sample_busy_clients: false`` this is an upper bound: skipped starts lower the effective rate, and slow
    clients, busy for longer, are picked less often. Closed loop: the concurrency C, exactly.
    """
    t = _parse(cfg, None)
    if t.name == "closed_loop" or (t.name == "trace" and t.loop == "closed_loop"):
        return float(t.concurrency)
    if t.name == "trace":
        return None  # durations come from the trace and the bytes
    part = _mean_random_part(t.duration)
    if part is None:
        return None
    speed = math.exp(t.duration.client_speed_sigma**2 / 2.0)
    return t.rate * (t.duration.min + part * speed)


# -------------------------------------------------------------------------------------------- schedule


class Schedule:
    """Iterator over Events ordered by time; at equal times arrivals come before starts, then by job_id.

    ``Schedule(cfg, num_clients, seed, client_sizes=None)``: ``cfg`` is the ``timing`` config node (see the
    module docstring); ``client_sizes`` (one count per client) is required by ``per_example`` durations.
    Infinite: take what you need with ``next`` or ``itertools.islice``.

    Attributes: ``skipped_starts`` (open loop with ``sample_busy_clients: false``: starts dropped because
    every client was busy), ``in_flight`` (jobs started and not yet arrived, as of the last event returned),
    ``num_clients``, ``client_speed`` (each client's persistent speed factor; all 1.0 when
    ``client_speed_sigma`` is 0). Trace timing: ``workload`` is required; ``offline_skipped_starts`` and
    ``redrawn_starts`` (open-loop starts whose client was offline), ``devices`` (the trace's rows). A trace
    schedule ends (StopIteration) when no client can come online again and no job is in flight.
    """

    skipped_starts: int
    in_flight: int

    def __init__(
        self,
        cfg: Mapping[str, Any],
        num_clients: int,
        seed: int,
        client_sizes: Sequence[int] | None = None,
        workload: Workload | None = None,
    ) -> None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
            raise ConfigError("num_clients", num_clients, "must be an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ConfigError("seed", seed, "must be an integer >= 0")
        self.num_clients = n = int(num_clients)
        self._cfg = t = _parse(cfg, n)
        d = t.duration

        sizes: list[float] | None = None
        if client_sizes is not None:
            arr = np.asarray(client_sizes)
            if arr.shape != (n,) or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise ConfigError(
                    "client_sizes",
                    f"<{arr.dtype} array of shape {arr.shape}>",
                    f"must be {n} integers (one per client)",
                )
            if (arr < 0).any():
                raise ConfigError("client_sizes", int(arr.min()), "must all be >= 0")
            sizes = arr.astype(float).tolist()

        streams = np.random.SeedSequence([int(seed), _TIMING_TAG]).spawn(4)
        rngs = [np.random.default_rng(s) for s in streams]
        self._gap_rng, self._choice_rng, self._dur_rng, speed_rng = rngs
        if d.client_speed_sigma > 0:
            self.client_speed: tuple[float, ...] = tuple(
                np.exp(speed_rng.normal(0.0, d.client_speed_sigma, n)).tolist()
            )
        else:
            self.client_speed = (1.0,) * n

        # per_example: each client's whole duration is fixed
        self._fixed: list[float] | None = None
        if d.distribution == "per_example":
            if sizes is None:
                raise ConfigError("client_sizes", None, "timing.duration.distribution=per_example needs them")
            avg = sum(sizes) / n
            if avg <= 0:
                raise ConfigError("client_sizes", client_sizes, "must have a positive mean for per_example")
            if d.min == 0 and min(sizes) == 0:
                raise ConfigError(
                    "client_sizes",
                    int(min(sizes)),
                    "per_example with timing.duration.min=0 needs every client size > 0",
                )
            speeds = self.client_speed
            self._fixed = [d.min + d.mean * s / avg * v for s, v in zip(sizes, speeds, strict=True)]
        self._lognormal_mu = math.log(d.mean) - d.sigma**2 / 2.0 if d.distribution == "lognormal" else 0.0

        self.skipped_starts = 0
        self.offline_skipped_starts = 0
        self.redrawn_starts = 0
        self.in_flight = 0
        self.devices: list[Device] | None = None
        if t.name == "trace":
            gen = self._trace(workload, int(seed))
        else:
            gen = self._open_loop() if t.name == "open_loop" else self._closed_loop()
        self._next = gen.__next__

    def __iter__(self) -> Schedule:
        """The schedule is its own iterator."""
        return self

    def __next__(self) -> Event:
        """The next event in time order."""
        return self._next()

    def _trace(self, workload: Workload | None, seed: int) -> Iterator[Event]:
        from qafel.sim.trace_timing import trace_events
        from qafel.sim.traces import load_trace, synthetic_trace

        t = self._cfg
        if workload is None:
            raise ConfigError("timing.name", "trace", "a trace schedule needs the run's workload (payload sizes and "
                              "local work: qafel.experiment.runner builds it)")
        workload.check(self.num_clients)
        if t.trace == "file":
            assert t.trace_file is not None
            self.devices = load_trace(t.trace_file)
        else:
            self.devices = synthetic_trace(t.synthetic or {}, self.num_clients, seed)
        return trace_events(self, self.devices, workload)

    @property
    def is_trace(self) -> bool:
        """Durations come from device traces (``timing=trace``)."""
        return self._cfg.name == "trace"

    @property
    def restart_before_step(self) -> bool:
        """Closed loop with ``restart_model: before_step``: each start at an arrival's time is that arrival's
        restart and starts from the model as of that arrival, before the server step it may complete."""
        return self._cfg.name == "closed_loop" and self._cfg.restart_model == "before_step"

    def __repr__(self) -> str:
        return f"Schedule({self._cfg.name}, num_clients={self.num_clients}, in_flight={self.in_flight})"

    # -- block draws: each returns the next _BLOCK numbers of its own stream

    def _draw_parts(self) -> list[float]:
        """Random parts (duration - min, before the client's speed factor) of the next _BLOCK jobs."""
        d, rng = self._cfg.duration, self._dur_rng
        if d.distribution == "halfnormal":
            a = np.abs(rng.standard_normal(_BLOCK)) * d.sigma
        elif d.distribution == "exponential":
            a = rng.exponential(d.mean, _BLOCK)
        elif d.distribution == "uniform":
            assert d.max is not None
            a = rng.random(_BLOCK) * (d.max - d.min)
        else:  # lognormal
            a = np.exp(rng.normal(self._lognormal_mu, d.sigma, _BLOCK))
        return a.tolist()

    def _draw_choices(self) -> list[float]:
        return self._choice_rng.random(_BLOCK).tolist()

    def _draw_gaps(self) -> list[float]:
        return self._gap_rng.exponential(1.0 / self._cfg.rate, _BLOCK).tolist()

    # -- the two systems, as generators (locals are faster than attributes)

    def _open_loop(self) -> Iterator[Event]:
        t_cfg, d = self._cfg, self._cfg.duration
        n, rate, poisson = self.num_clients, t_cfg.rate, t_cfg.arrival == "poisson"
        track = not t_cfg.sample_busy_clients
        fixed, speed, dmin = self._fixed, self.client_speed, d.min
        items = list(range(n))  # idle clients (used when track); pick-and-remove by swapping with the last
        push, pop = heapq.heappush, heapq.heappop
        heap: list[tuple[float, int, Job]] = []
        gaps: list[float] = []
        us: list[float] = []
        parts: list[float] = []
        gi = ui = pi = 0
        k = 1
        if poisson:
            gaps = self._draw_gaps()
            t_next, gi = gaps[0], 1
        else:
            t_next = 1.0 / rate
        job_id = in_flight = 0
        while True:
            if heap and heap[0][0] <= t_next:
                end, _, job = pop(heap)
                in_flight -= 1
                self.in_flight = in_flight
                if track:
                    items.append(job.client)
                yield Event(end, "arrival", job)
                continue
            t = t_next
            if poisson:
                if gi == len(gaps):
                    gaps, gi = self._draw_gaps(), 0
                t_next = t + gaps[gi]
                gi += 1
            else:
                k += 1
                t_next = k / rate
            if track:
                m = len(items)
                if m == 0:
                    self.skipped_starts += 1
                    continue
                if ui == len(us):
                    us, ui = self._draw_choices(), 0
                i = int(us[ui] * m)
                ui += 1
                if i >= m:
                    i = m - 1
                client = items[i]
                last = items.pop()
                if i < m - 1:
                    items[i] = last
            else:
                if ui == len(us):
                    us, ui = self._draw_choices(), 0
                client = int(us[ui] * n)
                ui += 1
                if client >= n:
                    client = n - 1
            if fixed is not None:
                end = t + fixed[client]
            else:
                if pi == len(parts):
                    parts, pi = self._draw_parts(), 0
                end = t + (dmin + parts[pi] * speed[client])
                pi += 1
            job = Job(job_id, client, t, end)
            push(heap, (end, job_id, job))
            job_id += 1
            in_flight += 1
            self.in_flight = in_flight
            yield Event(t, "start", job)

    def _closed_loop(self) -> Iterator[Event]:
        t_cfg, d = self._cfg, self._cfg.duration
        n, conc, random_idle = self.num_clients, t_cfg.concurrency, t_cfg.restart == "random_idle"
        fixed, speed, dmin = self._fixed, self.client_speed, d.min
        first = self._choice_rng.permutation(n)[:conc].tolist()
        taken = set(first)
        items = [c for c in range(n) if c not in taken]  # idle clients, as in _open_loop
        push, pop = heapq.heappush, heapq.heappop
        heap: list[tuple[float, int, Job]] = []
        pending: deque[tuple[float, int]] = deque((0.0, c) for c in first)  # starts due; client -1 = pick
        us: list[float] = []
        parts: list[float] = []
        ui = pi = 0
        job_id = in_flight = 0
        while True:
            if heap and (not pending or heap[0][0] <= pending[0][0]):
                end, _, job = pop(heap)
                in_flight -= 1
                self.in_flight = in_flight
                c = job.client
                if random_idle:
                    items.append(c)
                    pending.append((end, -1))
                else:
                    pending.append((end, c))
                yield Event(end, "arrival", job)
                continue
            t, client = pending.popleft()
            if client < 0:
                m = len(items)
                if ui == len(us):
                    us, ui = self._draw_choices(), 0
                i = int(us[ui] * m)
                ui += 1
                if i >= m:
                    i = m - 1
                client = items[i]
                last = items.pop()
                if i < m - 1:
                    items[i] = last
            if fixed is not None:
                end = t + fixed[client]
            else:
                if pi == len(parts):
                    parts, pi = self._draw_parts(), 0
                end = t + (dmin + parts[pi] * speed[client])
                pi += 1
            job = Job(job_id, client, t, end)
            push(heap, (end, job_id, job))
            job_id += 1
            in_flight += 1
            self.in_flight = in_flight
            yield Event(t, "start", job)
