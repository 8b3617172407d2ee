"""The trace-driven asynchronous system (``timing=trace``; the model is docs/traces.md).

A job of client c started at t with the server at step s takes download + compute + upload seconds:

* download: the bytes c must receive to hold the job's start model, over its downlink. ``catch_up`` (FedBuff,
  QAFeL): the server steps c missed since its last download, each one broadcast message, capped at a full fp32
  model, which is also what a client that never trained receives; nothing when c is current. ``fresh`` (naive):
  one Q_s(x) dispatch per job.
* compute: seconds per sample x samples the job trains on (or seconds per step x local steps);
* upload: the client quantizer's exact payload over c's uplink.

The schedule follows the server's step count itself (every K applied arrivals; arrivals staler than
``max_staleness`` are not applied), so it knows what each download costs without model values: it stays a pure
function of (config, seed, clients, payload sizes, local work).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qafel.errors import ConfigError
from qafel.sim.timing import Event, Job
from qafel.sim.traces import Device, availability_changes, transfer_seconds

if TYPE_CHECKING:
    from qafel.sim.timing import Schedule

DOWNLOADS = ("catch_up", "fresh")
# Order of simultaneous events: arrivals, availability changes, drops (caused by a change), starts.
_ARRIVAL, _CHANGE, _DROP, _START = 0, 1, 2, 3


@dataclass(frozen=True)
class Workload:
    """What the trace prices a job with: exact message sizes and each client's local work per job.

    ``download``: ``catch_up`` (``server_bytes`` is one server step's broadcast; a full download is
    ``model_bytes``) or ``fresh`` (``server_bytes`` is the dispatch each job start receives).
    ``samples[c]`` / ``steps[c]``: training samples processed / local steps taken by one job of client c.
    """

    upload_bytes: int
    server_bytes: int
    model_bytes: int
    download: str = "catch_up"
    buffer_size: int = 1
    max_staleness: int | None = None
    samples: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()

    def check(self, num_clients: int) -> None:
        """Raise ConfigError when a field is out of range or the work lists do not cover every client."""
        if self.download not in DOWNLOADS:
            raise ConfigError("workload.download", self.download, "must be one of " + ", ".join(DOWNLOADS))
        for key in ("upload_bytes", "server_bytes", "model_bytes", "buffer_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (1 if key == "buffer_size" else 0):
                raise ConfigError(f"workload.{key}", value, "must be an integer >= "
                                  f"{1 if key == 'buffer_size' else 0}")
        for key in ("samples", "steps"):
            if len(getattr(self, key)) != num_clients:
                raise ConfigError(f"workload.{key}", len(getattr(self, key)), f"must have one entry per client "
                                  f"({num_clients})")


class _IndexSet:
    """Client ids with O(1) add, discard, membership and a uniform pick from a number in [0, 1)."""

    __slots__ = ("items", "pos")

    def __init__(self, n: int, members: Iterable[int] = ()) -> None:
        self.items: list[int] = []
        self.pos = [-1] * n
        for c in members:
            self.add(c)

    def add(self, c: int) -> None:
        if self.pos[c] < 0:
            self.pos[c] = len(self.items)
            self.items.append(c)

    def discard(self, c: int) -> None:
        i = self.pos[c]
        if i >= 0:
            last = self.items.pop()
            if last != c:
                self.items[i] = last
                self.pos[last] = i
            self.pos[c] = -1

    def __len__(self) -> int:
        return len(self.items)

    def pick(self, u: float) -> int:
        m = len(self.items)
        return self.items[min(int(u * m), m - 1)]


def job_seconds(device: Device, samples: int, steps: int) -> float:
    """A job's compute time on ``device``."""
    if device.s_per_sample is not None:
        return device.s_per_sample * samples
    assert device.s_per_step is not None
    return device.s_per_step * steps


def trace_events(s: Schedule, devices: Sequence[Device], w: Workload) -> Iterator[Event]:
    """The event stream of a trace schedule (see the module and :class:`qafel.sim.timing.Schedule` docstrings).

    Client c uses ``devices[c % len(devices)]``. Random draws: the schedule's start-gap stream (open loop) and
    client-choice stream (one number per pick, one more per redraw).
    """
    t = s._cfg
    n = s.num_clients
    rows = [devices[c % len(devices)] for c in range(n)]
    upload = [transfer_seconds(w.upload_bytes, d.uplink_kbps) for d in rows]
    down_kbps = [d.downlink_kbps for d in rows]
    compute = [job_seconds(d, w.samples[c], w.steps[c]) for c, d in enumerate(rows)]
    fresh, full, per_step = w.download == "fresh", w.model_bytes, w.server_bytes
    K, max_stale = w.buffer_size, w.max_staleness
    finish_offline = t.finish_offline
    open_loop = t.loop == "open_loop"
    track_idle = open_loop and not t.sample_busy_clients
    redraw, same = t.offline_start == "redraw", t.restart == "same"
    inf = math.inf
    push, pop = heapq.heappush, heapq.heappop
    heap: list[tuple[float, int, int, object]] = []

    online = [False] * n
    changes = []
    next_change = [inf] * n  # online client: when it goes offline; offline: when it comes online
    live = 0  # clients with a change still to come
    for c, d in enumerate(rows):
        on0, it = availability_changes(d)
        online[c] = on0
        changes.append(it)
        nxt = next(it, None)
        if nxt is not None:
            next_change[c] = nxt
            push(heap, (nxt, _CHANGE, c, None))
            live += 1
    online_set = _IndexSet(n, (c for c in range(n) if online[c]))
    idle_online = _IndexSet(n, online_set.items)
    idle = _IndexSet(n, range(n)) if track_idle else None
    busy = [0] * n
    last_step = [-1] * n  # catch_up: the server step of the client's copy (-1: none)
    state = {"steps": 0, "k": 0, "job_id": 0, "in_flight": 0, "waiting": 0, "seq": 0, "pending": 0}
    waiting_same: set[int] = set()  # closed loop, restart=same: clients whose restart waits for them to be online
    us: list[float] = []
    ui = 0

    def draw() -> float:
        nonlocal us, ui
        if ui == len(us):
            us, ui = s._draw_choices(), 0
        ui += 1
        return us[ui - 1]

    def take(c: int) -> None:
        busy[c] += 1
        if busy[c] == 1:
            idle_online.discard(c)
            if idle is not None:
                idle.discard(c)

    def free(c: int) -> None:
        busy[c] -= 1
        if busy[c] == 0:
            if online[c]:
                idle_online.add(c)
            if idle is not None:
                idle.add(c)

    def queue_start(time: float, c: int) -> None:  # closed loop: c is reserved now, starts at `time`
        take(c)
        state["seq"] += 1
        state["pending"] += 1
        push(heap, (time, _START, state["seq"], c))

    def restart(time: float, c: int) -> None:  # closed loop: client c's slot is free
        if same:
            if online[c] and busy[c] == 0:
                queue_start(time, c)
            else:
                waiting_same.add(c)
        elif len(idle_online):
            queue_start(time, idle_online.pick(draw()))
        else:
            state["waiting"] += 1

    def launch(time: float, c: int) -> Job:
        steps = state["steps"]
        if fresh:
            nbytes = per_step
        else:
            last = last_step[c]
            nbytes = full if last < 0 else min((steps - last) * per_step, full)
            last_step[c] = steps
        down = transfer_seconds(nbytes, down_kbps[c])
        comp, up = compute[c], upload[c]
        end = time + (down + comp + up)
        dropped = not finish_offline and next_change[c] < end
        if dropped:
            end = next_change[c]
        job = Job(state["job_id"], c, time, end, down, comp, up, nbytes, dropped)
        push(heap, (end, _DROP if dropped else _ARRIVAL, job.job_id, (job, steps)))
        state["job_id"] += 1
        state["in_flight"] += 1
        s.in_flight = state["in_flight"]
        return job

    for c in online_set.items:
        yield Event(0.0, "online", None, c)
    gaps: list[float] = []
    gi = 0
    k_tick = 1
    if open_loop:
        if t.arrival == "poisson":
            gaps, gi = s._draw_gaps(), 1
            push(heap, (gaps[0], _START, 0, None))
        else:
            push(heap, (1.0 / t.rate, _START, 0, None))
    else:
        for _ in range(t.concurrency):  # C distinct online clients; slots without one wait for one
            if len(idle_online):
                queue_start(0.0, idle_online.pick(draw()))
            else:
                state["waiting"] += 1

    while heap:
        time, order, tb, payload = pop(heap)
        if order == _CHANGE:
            c = tb
            on = not online[c]
            online[c] = on
            nxt = next(changes[c], None)
            if nxt is None:
                next_change[c] = inf
                live -= 1
            else:
                next_change[c] = nxt
                push(heap, (nxt, _CHANGE, c, None))
            if on:
                online_set.add(c)
                if busy[c] == 0:
                    idle_online.add(c)
                    if not open_loop and c in waiting_same:
                        waiting_same.discard(c)
                        queue_start(time, c)
                    elif not open_loop and state["waiting"]:
                        state["waiting"] -= 1
                        queue_start(time, c)
            else:
                online_set.discard(c)
                idle_online.discard(c)
            yield Event(time, "online" if on else "offline", None, c)
            if (not open_loop and not state["in_flight"] and not state["pending"]
                    and (not state["waiting"] or not live)
                    and all(next_change[x] == inf for x in waiting_same)):
                return  # no slot can ever be filled again
        elif order == _START:
            if open_loop:
                if t.arrival == "poisson":
                    if gi == len(gaps):
                        gaps, gi = s._draw_gaps(), 0
                    push(heap, (time + gaps[gi], _START, 0, None))
                    gi += 1
                else:
                    k_tick += 1
                    push(heap, (k_tick / t.rate, _START, 0, None))
                if not len(online_set) and not live and not state["in_flight"]:
                    return  # no client can come online again
                if idle is not None:
                    if not len(idle):
                        s.skipped_starts += 1
                        continue
                    c = idle.pick(draw())
                else:
                    c = min(int(draw() * n), n - 1)
                if not online[c]:
                    pool = idle_online if idle is not None else online_set
                    if not redraw or not len(pool):
                        s.offline_skipped_starts += 1
                        continue
                    c = pool.pick(draw())
                    s.redrawn_starts += 1
                take(c)
            else:
                c = payload  # type: ignore[assignment]
                state["pending"] -= 1
                if not online[c]:  # went offline at this very time, before its start
                    free(c)
                    restart(time, c)
                    continue
            yield Event(time, "start", launch(time, c))
        else:
            job, start_step = payload  # type: ignore[misc]
            state["in_flight"] -= 1
            s.in_flight = state["in_flight"]
            if order == _ARRIVAL and (max_stale is None or state["steps"] - start_step <= max_stale):
                state["k"] += 1
                if state["k"] == K:
                    state["steps"] += 1
                    state["k"] = 0
            free(job.client)
            if not open_loop:
                restart(time, job.client)
            yield Event(time, "arrival" if order == _ARRIVAL else "drop", job)
