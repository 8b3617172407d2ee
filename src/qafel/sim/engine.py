"""The asynchronous event loop: jobs start from a model version, train, upload, and the server steps every K.

The engine is algorithm-agnostic except for three rules (ALGORITHMS.md §4):

* start model y₀: FedBuff the server model x; QAFeL the hidden state x̂; naive Q_s(x), quantized per dispatch;
* what each server step broadcasts: FedBuff the full model; QAFeL Q_s(x − x̂); naive nothing;
* QAFeL moves x̂ ← x̂ + Q_s(x − x̂) on the server and on every simulated client copy.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from qafel.quantizers import Quantizer
from qafel.signals import preemption_requested
from qafel.sim.algorithms import ServerOptimizer, StalenessWeight, is_finite, reduce_buffer
from qafel.sim.clients import job_seed
from qafel.sim.timing import Event, Job

# Generator streams derived from the run seed (clients.job_seed's ``stream`` argument).
STREAM_CLIENT_TRAIN = 1
STREAM_CLIENT_QUANT = 2
STREAM_SERVER_QUANT = 3

#: Summary keys only timing=trace fills (null otherwise): per arrived job, seconds downloading, computing and
#: uploading (totals and means; communicating = downloading + uploading), the bytes clients downloaded to start
#: jobs, the work lost to offline drops, and the time-averaged fraction of clients online.
TRACE_SUMMARY_KEYS = (
    "download_time_total", "compute_time_total", "upload_time_total", "communication_time_total",
    "download_time_mean", "compute_time_mean", "upload_time_mean", "communication_time_mean", "bytes_down_clients",
    "offline_lost_time_total", "mean_online_fraction")
#: The reasons an update is dropped (``dropped_by_reason``): staler than server.max_staleness, or its client
#: went offline before the job ended (trace timing).
DROP_REASONS = ("stale", "offline")
#: The keys of ``Engine.summary()``, in order (sweep objectives and tests read this list, so it cannot drift).
ENGINE_SUMMARY_KEYS = (
    "status", "algorithm", "final_accuracy", "final_loss", "server_steps", "uploads", "jobs_started",
    "dropped_updates", "bytes_up", "bytes_broadcast", "bytes_down_naive", "bytes_total", "bytes_up_fp32_equivalent",
    "bytes_broadcast_fp32_equivalent", "bytes_down_naive_fp32_equivalent", "message_bytes_up",
    "message_bytes_broadcast", "message_bytes_down_naive", "reduction_vs_fedbuff", "num_parameters",
    "target_accuracy", "uploads_to_target", "bytes_up_at_target", "bytes_broadcast_at_target", "time_to_target",
    "mean_staleness", "max_staleness_seen", "staleness_histogram", "mean_concurrency", "sim_time", "wall_time_s",
    "diverged_at_step", "dropped_by_reason", *TRACE_SUMMARY_KEYS)
#: Evaluation keys the summary copies from the last evaluation when the evaluator reports them.
EVAL_SUMMARY_KEYS = ("suboptimality", "train_objective", "hidden_state_error")
#: The keys an evaluation record (a metrics.jsonl line) can hold (the evaluator's extra keys and
#: ``online_fraction``, under timing=trace, only when they apply).
RECORD_KEYS = ("server_step", "uploads", "sim_time", "accuracy", "loss", "bytes_up", "bytes_broadcast",
               "bytes_down_naive", "bytes_total", "mean_staleness", "in_flight", "dropped_updates", "wall_time_s",
               *EVAL_SUMMARY_KEYS, "online_fraction")


@dataclass(frozen=True)
class EngineSettings:
    """The scalars that drive one run of the event loop."""

    algorithm: str
    buffer_size: int
    server_steps: int
    eval_every: int
    seed: int
    reduction: str = "sum"
    max_staleness: int | None = None
    codec: str = "simulated"          # "wire": every message is encoded to bytes and decoded on arrival
    hidden_state_replicas: int = 0    # QAFeL: client copies of x̂ kept (and checked) beside the server's
    client_batch: int = 256           # jobs trained together at most
    target_accuracy: float | None = None
    checkpoint_every: int = 0         # call on_checkpoint every this many server steps (0: never)
    restart_before_step: bool = False  # closed loop, the authors' LR code: a job restarted by an arrival starts
                                       # from the model as of that arrival, before the server step it completes
    trace_timing: bool = False        # timing=trace: jobs carry download/compute/upload times; clients go offline
    num_clients: int = 0              # for the fraction of clients online (trace timing)


@dataclass
class _InFlight:
    job: Job
    start_step: int
    version: tuple[int, int] | None = None   # key into the version store (FedBuff, QAFeL)
    start: torch.Tensor | None = None        # naive: the job's own quantized start model
    update: torch.Tensor | None = None       # decoded Q_c(Δ), once trained
    payload: bytes | None = None             # codec=wire: the uplink message
    nbytes: int = 0


def _job_state(e: _InFlight) -> dict[str, Any]:
    j = e.job
    return {"job": [j.job_id, j.client, j.start, j.end, j.download, j.compute, j.upload, j.bytes_down, j.dropped],
            "start_step": e.start_step,
            "version": None if e.version is None else list(e.version), "start": e.start, "update": e.update,
            "payload": e.payload, "nbytes": e.nbytes}


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _job_from_state(d: dict[str, Any]) -> _InFlight:
    job_id, client, start, end, *trace = d["job"]  # checkpoints before trace timing hold the first four
    return _InFlight(Job(int(job_id), int(client), float(start), float(end), *trace), d["start_step"],
                     None if d["version"] is None else tuple(d["version"]), d["start"], d["update"], d["payload"],
                     d["nbytes"])


@dataclass
class Counters:
    """Totals kept by the engine (never only means)."""

    uploads: int = 0
    jobs_started: int = 0
    dropped_updates: int = 0
    bytes_up: int = 0
    bytes_broadcast: int = 0
    bytes_down_naive: int = 0
    broadcasts: int = 0
    staleness_sum: int = 0
    staleness_count: int = 0
    staleness_hist: Counter = field(default_factory=Counter)
    concurrency_area: float = 0.0
    dropped_by_reason: Counter = field(default_factory=Counter)
    download_time: float = 0.0        # trace timing: seconds over the arrived jobs
    compute_time: float = 0.0
    upload_time: float = 0.0
    bytes_down_clients: int = 0       # trace timing: bytes clients received to start their jobs
    offline_lost_time: float = 0.0    # trace timing: seconds of jobs lost to their client going offline
    online: int = 0                   # trace timing: clients online now, and the integral of that over time
    online_area: float = 0.0


class VersionStore:
    """Model versions still referenced by jobs in flight, with reference counts; freed when unused."""

    def __init__(self) -> None:
        self._models: dict[tuple[int, int], torch.Tensor] = {}
        self._refs: Counter = Counter()

    def acquire(self, key: tuple[int, int], current: Callable[[], torch.Tensor]) -> tuple[int, int]:
        """Reference version ``key``, snapshotting ``current()`` the first time it is needed."""
        if key not in self._models:
            self._models[key] = current().clone()
        self._refs[key] += 1
        return key

    def get(self, key: tuple[int, int]) -> torch.Tensor:
        """The stored model for ``key``."""
        return self._models[key]

    def release(self, key: tuple[int, int]) -> None:
        """Drop one reference; free the model when none is left."""
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key], self._models[key]

    def __len__(self) -> int:
        return len(self._models)

    def state_dict(self) -> list[list[Any]]:
        """``[step, replica, model, references]`` per stored version."""
        return [[*key, model, self._refs[key]] for key, model in self._models.items()]

    def load_state_dict(self, state: list[list[Any]]) -> None:
        """Restore a ``state_dict``."""
        self._models = {(int(s), int(r)): model for s, r, model, _ in state}
        self._refs = Counter({(int(s), int(r)): int(n) for s, r, _, n in state})


class Engine:
    """Runs FedBuff, QAFeL or naive direct quantization over an exogenous event schedule."""

    def __init__(self, settings: EngineSettings, *, x0: torch.Tensor, trainer: Any, client_quantizer: Quantizer,
                 server_quantizer: Quantizer, optimizer: ServerOptimizer, staleness_weight: StalenessWeight,
                 schedule: Iterator[Event], evaluate: Callable[[torch.Tensor], dict[str, float]],
                 on_eval: Callable[[dict[str, Any]], None] | None = None,
                 on_server_step: Callable[[int], None] | None = None,
                 on_checkpoint: Callable[[Engine], None] | None = None) -> None:
        self.s = settings
        self.trainer = trainer
        self.qc, self.qs = client_quantizer, server_quantizer
        self.optimizer = optimizer
        self.weight = staleness_weight
        self.schedule = schedule
        self.evaluate = evaluate
        self.on_eval = on_eval
        self.on_server_step = on_server_step
        self.on_checkpoint = on_checkpoint
        self.d = x0.numel()
        self.x = x0.clone()
        self.xhat = x0.clone() if settings.algorithm == "qafel" else None
        self.replicas = [x0.clone() for _ in range(settings.hidden_state_replicas)] if self.xhat is not None else []
        self.buffer = torch.zeros_like(self.x)
        self.k = 0
        self.server_step = 0
        self.time = 0.0
        self.jobs: dict[int, _InFlight] = {}
        self.versions = VersionStore()
        self.c = Counters()
        self.server_gen = torch.Generator().manual_seed(job_seed(settings.seed, STREAM_SERVER_QUANT, 0))
        self.status = "running"
        self.diverged_at: int | None = None
        self.history: list[dict[str, Any]] = []
        self._last_eval_step = -1
        self.events_processed = 0
        self.owed_starts: list[tuple[float, int, Any]] = []  # restart_before_step: (time, step, start model ref)
        self._wall0 = time.perf_counter()

    # ----------------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Process events until ``server_steps`` server steps are done (or the run diverges).

        A restored engine (``load_state_dict``) continues where its checkpoint stopped.
        """
        if not self.history:
            self._evaluate()
        while self.server_step < self.s.server_steps and self.status == "running":
            event = next(self.schedule, None)  # not drawn past the last event processed: the schedule's counters
            if event is None:  # a trace whose clients never come online again   # match the run's events
                self.status = "trace_ended"
                break
            self.events_processed += 1
            dt = event.time - self.time
            self.c.concurrency_area += len(self.jobs) * dt
            self.c.online_area += self.c.online * dt
            self.time = event.time
            kind = event.kind
            if kind == "start":
                self._on_start(event.job)
            elif kind == "arrival":
                self._on_arrival(event.job)
            elif kind == "drop":
                self._on_drop(event.job)
            else:
                self.c.online += 1 if kind == "online" else -1
        if self.status == "running":
            self.status = "completed"
        if self._last_eval_step != self.server_step:
            self._evaluate()
        return self.summary()

    def _on_start(self, job: Job) -> None:
        self.c.jobs_started += 1
        self.c.bytes_down_clients += job.bytes_down
        entry = _InFlight(job, self.server_step)
        owed = self.owed_starts.pop(0) if self.owed_starts and self.owed_starts[0][0] == job.start else None
        if owed is not None:  # the restart of an arrival at this time: the model as of that arrival
            entry.start_step = owed[1]
        if self.s.algorithm == "naive":
            start, nbytes = self._send(self.qs, owed[2] if owed is not None else self.x, self.server_gen)
            entry.start = start
            self.c.bytes_down_naive += nbytes
        else:
            entry.version = owed[2] if owed is not None else self._start_model(job.client)
        self.jobs[job.job_id] = entry

    def _start_model(self, client: int) -> Any:
        """A reference to the model a job of ``client`` starting now trains from: naive x itself (quantized per
        dispatch), FedBuff x and QAFeL x̂ (or the client's copy of it) as a version in the store."""
        if self.s.algorithm == "naive":
            return self.x.clone()
        if self.s.algorithm == "fedbuff":
            return self.versions.acquire((self.server_step, 0), lambda: self.x)
        r = client % len(self.replicas) if self.replicas else -1
        source = self.replicas[r] if self.replicas else self.xhat
        return self.versions.acquire((self.server_step, r), lambda: source)

    def _on_arrival(self, job: Job) -> None:
        if self.s.restart_before_step:  # this arrival's restart (the next start at this time) trains from now
            self.owed_starts.append((job.end, self.server_step, self._start_model(job.client)))
        entry = self.jobs[job.job_id]
        if entry.update is None and entry.payload is None:
            self._train_pending()
            if self.status != "running":
                return
        del self.jobs[job.job_id]
        update = self.qc.decode(entry.payload).to(self.x.device) if entry.payload is not None else entry.update
        self.c.uploads += 1
        self.c.bytes_up += entry.nbytes
        self.c.download_time += job.download
        self.c.compute_time += job.compute
        self.c.upload_time += job.upload
        tau = self.server_step - entry.start_step
        if self.s.max_staleness is not None and tau > self.s.max_staleness:
            self.c.dropped_updates += 1
            self.c.dropped_by_reason["stale"] += 1
            return
        self.c.staleness_sum += tau
        self.c.staleness_count += 1
        self.c.staleness_hist[tau] += 1
        w = self.weight(tau)
        if w == 1.0:
            self.buffer += update
        else:
            self.buffer.add_(update, alpha=w)
        self.k += 1
        if self.k == self.s.buffer_size:
            self._server_update()

    def _on_drop(self, job: Job) -> None:
        """A job lost when its client went offline (trace timing): never trained, nothing uploaded."""
        entry = self.jobs.pop(job.job_id)
        if entry.version is not None:
            self.versions.release(entry.version)
        self.c.dropped_updates += 1
        self.c.dropped_by_reason["offline"] += 1
        self.c.offline_lost_time += job.end - job.start

    def _train_pending(self) -> None:
        """Train every started, untrained job in flight (their start models are all known) in batches; jobs the
        schedule will drop are not trained."""
        pending = [e for e in self.jobs.values() if e.update is None and e.payload is None and not e.job.dropped]
        for i in range(0, len(pending), self.s.client_batch):
            chunk = pending[i:i + self.s.client_batch]
            starts = torch.stack([e.start if e.start is not None else self.versions.get(e.version) for e in chunk])
            clients = [e.job.client for e in chunk]
            seeds = [job_seed(self.s.seed, STREAM_CLIENT_TRAIN, e.job.job_id) for e in chunk]
            deltas = self.trainer.train(starts, clients, seeds)
            if not is_finite(deltas):  # a client's local training blew up: nothing sensible to quantize
                self._diverge()
                return
            gens = [torch.Generator().manual_seed(job_seed(self.s.seed, STREAM_CLIENT_QUANT, e.job.job_id))
                    for e in chunk]
            if self.s.codec == "wire":
                for e, delta, g in zip(chunk, deltas, gens, strict=True):
                    e.payload = self.qc.encode(delta, g)
                    e.nbytes = len(e.payload)
            else:
                values, sizes = self.qc.quantize_batch(deltas, gens)
                for e, value, nbytes in zip(chunk, values, sizes, strict=True):
                    e.update, e.nbytes = value, nbytes
            for e in chunk:
                if e.version is not None:
                    self.versions.release(e.version)
                    e.version = None
                e.start = None

    def _server_update(self) -> None:
        g = reduce_buffer(self.buffer, self.k, self.s.reduction)
        self.x = self.optimizer.step(self.x, g)
        self.buffer.zero_()
        self.k = 0
        self.server_step += 1
        if not is_finite(self.x):
            self._diverge()
            self._evaluate()
            return
        if self.s.algorithm == "fedbuff":
            self.c.bytes_broadcast += 4 * self.d
            self.c.broadcasts += 1
        elif self.s.algorithm == "qafel":
            self._move_hidden_state()
        if self.on_server_step is not None:
            self.on_server_step(self.server_step)
        if self.server_step % self.s.eval_every == 0 or self.server_step == self.s.server_steps:
            self._evaluate()
        every = self.s.checkpoint_every
        if self.on_checkpoint is not None and (every and self.server_step % every == 0 or preemption_requested()):
            self.on_checkpoint(self)  # also when a cluster job is preempted (qafel.signals): it resumes from here

    def _move_hidden_state(self) -> None:
        """x̂ ← x̂ + Q_s(x − x̂) on the server and on every client copy, from the same broadcast message.

        An identity server quantizer sends x itself (the same 4·d bytes as x − x̂), so that x̂ equals x
        exactly rather than up to the rounding of x̂ + (x − x̂): QAFeL then equals FedBuff bit for bit.
        """
        self.c.broadcasts += 1
        if self.qs.is_identity:
            payload = self.qs.encode(self.x)
            self.c.bytes_broadcast += len(payload)
            self.xhat = self.x.clone()
            for i in range(len(self.replicas)):
                self.replicas[i] = self.qs.decode(payload).to(self.x.device)
        else:
            diff = self.x - self.xhat
            if self.replicas or self.s.codec == "wire":
                payload = self.qs.encode(diff, self.server_gen)
                q = self.qs.decode(payload).to(self.x.device)
                nbytes = len(payload)
            else:
                q, nbytes = self.qs.quantize(diff, self.server_gen)
            self.c.bytes_broadcast += nbytes
            self.xhat += q
            for r in self.replicas:
                r += self.qs.decode(payload).to(self.x.device)
        for r in self.replicas:
            if not torch.equal(r, self.xhat):
                raise RuntimeError(f"a client copy of the hidden state differs from the server's at step "
                                   f"{self.server_step}")

    def _send(self, quantizer: Quantizer, v: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        if self.s.codec == "wire":
            payload = quantizer.encode(v, generator)
            return quantizer.decode(payload).to(v.device), len(payload)
        return quantizer.quantize(v, generator)

    def _diverge(self) -> None:
        self.status = "diverged"
        self.diverged_at = self.server_step

    # ----------------------------------------------------------------------------------------- checkpoints
    _STATE = ("x", "xhat", "replicas", "buffer", "k", "server_step", "time", "status", "diverged_at", "history",
              "_last_eval_step", "events_processed", "owed_starts")

    def state_dict(self) -> dict[str, Any]:
        """The complete engine state: models, buffer, optimizer, version store, jobs in flight (with their
        trained updates), counters, metrics so far, every generator's state and how far the schedule got.

        Only tensors, numbers, strings, bytes, None, lists and dicts, so that ``torch.load(weights_only=True)``
        reads it back without unpickling any class.
        """
        counters = {f.name: getattr(self.c, f.name) for f in fields(self.c)}
        counters["staleness_hist"] = dict(self.c.staleness_hist)
        counters["dropped_by_reason"] = dict(self.c.dropped_by_reason)
        return {**{k: getattr(self, k) for k in self._STATE},
                "jobs": [_job_state(e) for e in self.jobs.values()],
                "versions": self.versions.state_dict(),
                "c": counters,
                "optimizer": dict(self.optimizer.__dict__),
                "server_gen": self.server_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "wall_elapsed": time.perf_counter() - self._wall0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the (exogenous) schedule is replayed up to where the checkpoint stood.

        Checkpoints are read onto the CPU: model tensors move to this engine's device (its x⁰'s), generator states
        stay on the CPU.
        """
        rng = {k: state[k] for k in ("server_gen", "torch_rng")}
        state = {**_to_device(state, self.x.device), **rng}
        for k in self._STATE:
            setattr(self, k, state[k])
        self.jobs = {e.job.job_id: e for e in map(_job_from_state, state["jobs"])}
        self.owed_starts = [(t, step, ref if isinstance(ref, torch.Tensor) else tuple(ref))
                            for t, step, ref in state["owed_starts"]]
        self.versions.load_state_dict(state["versions"])
        self.c = Counters(**{**state["c"], "staleness_hist": Counter(state["c"]["staleness_hist"]),
                             "dropped_by_reason": Counter(state["c"].get("dropped_by_reason", {}))})
        self.optimizer.__dict__.update(state["optimizer"])
        self.server_gen.set_state(state["server_gen"])
        torch.set_rng_state(state["torch_rng"])
        self._wall0 = time.perf_counter() - state["wall_elapsed"]
        for _ in range(self.events_processed):
            next(self.schedule)

    # -------------------------------------------------------------------------------------------- metrics
    def _evaluate(self) -> None:
        self._last_eval_step = self.server_step
        metrics = self.evaluate(self.x) if is_finite(self.x) else {"accuracy": float("nan"), "loss": float("nan")}
        record: dict[str, Any] = {
            "server_step": self.server_step,
            "uploads": self.c.uploads,
            "sim_time": self.time,
            **metrics,
            "bytes_up": self.c.bytes_up,
            "bytes_broadcast": self.c.bytes_broadcast,
            "bytes_down_naive": self.c.bytes_down_naive,
            "bytes_total": self.c.bytes_up + self.c.bytes_broadcast + self.c.bytes_down_naive,
            "mean_staleness": self.mean_staleness,
            "in_flight": len(self.jobs),
            "dropped_updates": self.c.dropped_updates,
            "wall_time_s": time.perf_counter() - self._wall0,
        }
        if self.xhat is not None:
            record["hidden_state_error"] = float(torch.linalg.vector_norm(self.x - self.xhat))
        if self.s.trace_timing and self.s.num_clients:
            record["online_fraction"] = self.c.online / self.s.num_clients
        loss = metrics.get("loss")
        if loss is not None and loss != loss and self.status == "running":  # NaN loss
            self._diverge()
        self.history.append(record)
        if self.on_eval is not None:
            self.on_eval(record)

    def _trace_summary(self) -> dict[str, Any]:
        """TRACE_SUMMARY_KEYS: time per arrived job by phase, client downloads, lost work, availability."""
        c, n = self.c, self.c.uploads
        if not self.s.trace_timing:
            return dict.fromkeys(TRACE_SUMMARY_KEYS)
        comm = c.download_time + c.upload_time
        return {
            "download_time_total": c.download_time, "compute_time_total": c.compute_time,
            "upload_time_total": c.upload_time, "communication_time_total": comm,
            "download_time_mean": c.download_time / n if n else None,
            "compute_time_mean": c.compute_time / n if n else None,
            "upload_time_mean": c.upload_time / n if n else None,
            "communication_time_mean": comm / n if n else None,
            "bytes_down_clients": c.bytes_down_clients,
            "offline_lost_time_total": c.offline_lost_time,
            "mean_online_fraction": (c.online_area / self.time / self.s.num_clients
                                     if self.time > 0 and self.s.num_clients else None),
        }

    @property
    def mean_staleness(self) -> float:
        """Mean staleness τ of the updates applied so far."""
        return self.c.staleness_sum / self.c.staleness_count if self.c.staleness_count else 0.0

    def uploads_to_target(self) -> tuple[int, dict[str, Any]] | None:
        """Uploads received up to the first evaluation whose accuracy ≥ target, and that evaluation's record.

        Every upload the server received counts, updates dropped for staleness (``server.max_staleness``)
        included, so that ``bytes_up_at_target`` covers the same uploads; without drops this is K × server steps
        (ALGORITHMS.md §7).
        """
        target = self.s.target_accuracy
        if target is None:
            return None
        for rec in self.history:
            if rec.get("accuracy") is not None and rec["accuracy"] >= target:
                return rec["uploads"], rec
        return None

    def summary(self) -> dict[str, Any]:
        """The run's totals and final metrics."""
        last = self.history[-1]
        up32 = 4 * self.d * self.c.uploads
        bc32 = 4 * self.d * self.server_step
        down32 = 4 * self.d * self.c.jobs_started if self.s.algorithm == "naive" else 0
        sent = self.c.bytes_up + self.c.bytes_broadcast + self.c.bytes_down_naive
        hit = self.uploads_to_target()
        out: dict[str, Any] = {
            "status": self.status,
            "algorithm": self.s.algorithm,
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "server_steps": self.server_step,
            "uploads": self.c.uploads,
            "jobs_started": self.c.jobs_started,
            "dropped_updates": self.c.dropped_updates,
            "bytes_up": self.c.bytes_up,
            "bytes_broadcast": self.c.bytes_broadcast,
            "bytes_down_naive": self.c.bytes_down_naive,
            "bytes_total": sent,
            "bytes_up_fp32_equivalent": up32,
            "bytes_broadcast_fp32_equivalent": bc32,
            "bytes_down_naive_fp32_equivalent": down32,
            "message_bytes_up": self.c.bytes_up / self.c.uploads if self.c.uploads else None,
            "message_bytes_broadcast": (self.c.bytes_broadcast / self.c.broadcasts if self.c.broadcasts else None),
            "message_bytes_down_naive": (self.c.bytes_down_naive / self.c.jobs_started
                                         if self.s.algorithm == "naive" and self.c.jobs_started else None),
            "reduction_vs_fedbuff": (up32 + bc32) / sent if sent else None,
            "num_parameters": self.d,
            "target_accuracy": self.s.target_accuracy,
            "uploads_to_target": hit[0] if hit else None,
            "bytes_up_at_target": hit[1]["bytes_up"] if hit else None,
            "bytes_broadcast_at_target": hit[1]["bytes_broadcast"] if hit else None,
            "time_to_target": hit[1]["sim_time"] if hit else None,
            "mean_staleness": self.mean_staleness,
            "max_staleness_seen": max(self.c.staleness_hist) if self.c.staleness_hist else 0,
            "staleness_histogram": {str(k): v for k, v in sorted(self.c.staleness_hist.items())},
            "mean_concurrency": self.c.concurrency_area / self.time if self.time > 0 else 0.0,
            "sim_time": self.time,
            "wall_time_s": time.perf_counter() - self._wall0,
            "diverged_at_step": self.diverged_at,
            "dropped_by_reason": {r: self.c.dropped_by_reason.get(r, 0) for r in DROP_REASONS},
            **self._trace_summary(),
        }
        for key in EVAL_SUMMARY_KEYS:
            if key in last:
                out[key] = last[key]
        return out
