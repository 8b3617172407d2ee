"""``run_experiment``: one run from a validated config to run records and a summary (used by run.py and sweeps)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qafel.data import FederatedData, build_dataset
from qafel.errors import ConfigError, OutputError, RunDirExistsError
from qafel.experiment.checkpoint import (
    CHECKPOINT_NAME,
    check_config_matches,
    load_checkpoint,
    remove_quietly,
    save_checkpoint,
    tmp_path,
)
from qafel.experiment.config import quantizer_options, validate
from qafel.experiment.tracking import RunOrigin, RunRecorder, make_tracker, origin_record, read_origin, write_origin
from qafel.models.networks import FlatModel, build_module
from qafel.models.optimum import objective, solve_optimum
from qafel.quantizers import Quantizer, build_quantizer
from qafel.signals import checkpointing_run, stop_if_preempted
from qafel.sim.algorithms import ServerOptimizer, StalenessWeight
from qafel.sim.clients import BatchedTrainer, ClientTrainer, LocalTraining
from qafel.sim.engine import ENGINE_SUMMARY_KEYS, EVAL_SUMMARY_KEYS, Engine, EngineSettings
from qafel.sim.system import map_in_threads, resolve_job_threads, tune_malloc
from qafel.sim.timing import Schedule
from qafel.sim.trace_timing import Workload

#: The keys run_experiment adds to the engine's summary.
RUN_SUMMARY_KEYS = ("skipped_starts", "offline_skipped_starts", "redrawn_starts", "f_star", "partition", "dataset",
                    "model", "client_quantizer", "server_quantizer", "seed", "wall_time_s", "resumed", "run_dir",
                    "run_id")
#: Every key summary.json can hold (EVAL_SUMMARY_KEYS only when the evaluator reports them).
SUMMARY_KEYS = tuple(dict.fromkeys((*ENGINE_SUMMARY_KEYS, *EVAL_SUMMARY_KEYS, *RUN_SUMMARY_KEYS)))
#: The summary keys whose values are not numbers (they cannot be sweep objectives).
TEXT_SUMMARY_KEYS = frozenset({"status", "algorithm", "staleness_histogram", "dropped_by_reason", "partition",
                               "dataset", "model", "client_quantizer", "server_quantizer", "resumed", "run_dir",
                               "run_id"})
#: The summary keys a sweep objective may name (numbers, or null when not reached).
NUMERIC_SUMMARY_KEYS = tuple(k for k in SUMMARY_KEYS if k not in TEXT_SUMMARY_KEYS)


def build_model(cfg: DictConfig, data: FederatedData) -> FlatModel:
    """The flat model for this dataset, with ``model.l2`` resolved (``inverse_n`` = 1/training samples)."""
    l2 = 1.0 / len(data.y) if cfg.model.l2 == "inverse_n" else float(cfg.model.l2)
    return FlatModel(build_module(cfg.model, data.input_shape, data.num_classes), l2=l2)


def timing_options(timing: DictConfig) -> dict[str, Any]:
    """The timing node as a plain dict without the keys the chosen loop does not use (left null)."""
    return {k: v for k, v in OmegaConf.to_container(timing).items() if v is not None}


def trace_workload(cfg: DictConfig, data: FederatedData, qc: Quantizer, qs: Quantizer) -> Workload | None:
    """What timing=trace prices jobs with (None for other timings): the exact upload size, what a job start
    downloads (FedBuff: the fp32 model; QAFeL: the missed broadcasts Q_s(x − x̂), capped at the fp32 model;
    naive: one Q_s(x)), and each client's samples and local steps per job. Data-dependent sizes (QSGD's
    Elias-gamma coding) are refused: the schedule is drawn before any job runs."""
    if cfg.timing.name != "trace":
        return None
    algorithm = cfg.algorithm.name
    for side, q in (("client_quantizer", qc), ("server_quantizer", qs)):
        if q.payload_bytes() is None and (side == "client_quantizer" or algorithm != "fedbuff"):
            raise ConfigError(f"{side}.coding", cfg[side].coding, "timing=trace prices every message before the "
                              "job runs, and Elias-gamma sizes depend on the data: use coding=fixed")
    model_bytes = qc.fp32_bytes()
    server = model_bytes if algorithm == "fedbuff" else qs.payload_bytes()
    local = local_training(cfg)
    sizes = [int(n) for n in data.client_sizes.tolist()]
    return Workload(upload_bytes=int(qc.payload_bytes() or 0), server_bytes=int(server or 0), model_bytes=model_bytes,
                    download="fresh" if algorithm == "naive" else "catch_up",
                    buffer_size=int(cfg.algorithm.buffer_size), max_staleness=cfg.server.max_staleness,
                    samples=tuple(local.samples_for(n) for n in sizes), steps=tuple(local.steps_for(n) for n in sizes))


def local_training(cfg: DictConfig) -> LocalTraining:
    """The client node as a LocalTraining spec."""
    bs = cfg.client.batch_size
    return LocalTraining(lr=float(cfg.client.lr), local_steps=cfg.client.local_steps,
                         local_epochs=cfg.client.local_epochs, batch_size=None if bs in (None, "full") else int(bs))


class Evaluator:
    """Test accuracy and loss of a flat model; f(x) − f* on the training objective when f* is known.

    The test set goes through the model in chunks of ``chunk`` samples (256: a CNN's activations for larger
    chunks outgrow the allocator's reuse threshold and are page-faulted in again on every evaluation, 2.3x
    slower measured for 2,000 Fashion-MNIST images); with ``threads`` > 1 the chunks run side by side in the
    job threads. Chunk results are summed in order, so the figures do not depend on ``threads``.
    """

    def __init__(self, model: FlatModel, data: FederatedData, optimum: float | None, chunk: int = 256,
                 threads: int = 1) -> None:
        self.model, self.data, self.optimum, self.chunk, self.threads = model, data, optimum, chunk, threads
        self._X64 = data.X.double() if optimum is not None else None

    def _chunk(self, x: torch.Tensor, start: int) -> tuple[float, int]:
        """(summed loss, correct predictions) on test samples ``start`` .. ``start + chunk``."""
        Xb, yb = self.data.X_test[start:start + self.chunk], self.data.y_test[start:start + self.chunk]
        with torch.no_grad():
            out = self.model.logits(x, Xb)
            return float(self.model.data_loss(out, yb)) * len(yb), int(self.model.correct(out, yb))

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        self.model.module.eval()
        n = len(self.data.y_test)
        starts = range(0, n, self.chunk)
        if self.threads > 1 and len(starts) > 1:
            parts = map_in_threads(self.threads, self._chunk, [x] * len(starts), starts)
        else:
            parts = [self._chunk(x, i) for i in starts]
        loss_sum, correct = 0.0, 0
        for part_loss, part_correct in parts:
            loss_sum += part_loss
            correct += part_correct
        out: dict[str, float] = {"accuracy": correct / n, "loss": loss_sum / n}
        if self.optimum is not None:
            f = objective(self.model, x, self._X64, self.data.y)
            out["train_objective"] = f
            out["suboptimality"] = f - self.optimum
        return out


@dataclass
class RunSetup:
    """Everything one run is built from, before the event loop starts."""

    cfg: DictConfig
    data: FederatedData
    model: FlatModel
    client_quantizer: Quantizer
    server_quantizer: Quantizer
    schedule: Schedule
    evaluator: Evaluator
    x0: torch.Tensor
    f_star: float | None


def setup_run(cfg: DictConfig | dict) -> RunSetup:
    """Validate the config and build data, model, quantizers, schedule and evaluator."""
    cfg = validate(cfg)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", cfg.device, "needs a CUDA GPU, and torch sees none here: use device=cpu")
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.run.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.run.tf32)
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.tune_malloc:
        tune_malloc()
    torch.manual_seed(cfg.seed)
    data = build_dataset(cfg.dataset, cfg.paths.data_root, cfg.seed).to(device)
    model = build_model(cfg, data)
    model.module.to(device)
    qc = build_quantizer(quantizer_options(cfg.client_quantizer), model.layout, key="client_quantizer")
    qs = build_quantizer(quantizer_options(cfg.server_quantizer), model.layout, key="server_quantizer")
    schedule = Schedule(timing_options(cfg.timing), data.num_clients, cfg.seed, client_sizes=data.client_sizes.tolist(),
                        workload=trace_workload(cfg, data, qc, qs))
    x0 = model.initial_vector(cfg.seed, cfg.model.init).to(device)
    want_optimum = cfg.run.compute_optimum if cfg.run.compute_optimum is not None else cfg.model.name == "logreg"
    f_star = solve_optimum(model, data.X, data.y)[0] if want_optimum else None
    evaluator = Evaluator(model, data, f_star, threads=resolve_job_threads(cfg.run.job_threads, device))
    return RunSetup(cfg, data, model, qc, qs, schedule, evaluator, x0, f_star)


def choose_trainer(choice: str, model: FlatModel, device: torch.device) -> str:
    """``batched`` or ``loop``: ``auto`` batches unless the model convolves on the CPU, where vmapped per-job
    convolutions become grouped convolutions (measured ~5x slower there than one job at a time)."""
    if choice != "auto":
        return choice
    convolves = any(isinstance(m, torch.nn.Conv2d) for m in model.module.modules())
    return "loop" if convolves and device.type == "cpu" else "batched"


def make_trainer(choice: str, model: FlatModel, data: FederatedData, local: LocalTraining,
                 device: torch.device, job_threads: int | None = None) -> ClientTrainer:
    """The client trainer ``run.trainer`` names (``auto`` as ``choose_trainer`` decides). The per-job trainer on
    the CPU trains ``job_threads`` jobs side by side (``run.job_threads``; see ``system.resolve_job_threads``)."""
    if choose_trainer(choice, model, device) == "batched":
        return BatchedTrainer(model, data, local)
    return ClientTrainer(model, data, local, job_threads=resolve_job_threads(job_threads, device))


def make_engine(s: RunSetup, on_eval: Callable[[dict[str, Any]], None] | None = None,
                on_server_step: Callable[[int], None] | None = None,
                on_checkpoint: Callable[[Engine], None] | None = None) -> Engine:
    """The event loop for a prepared run."""
    cfg = s.cfg
    settings = EngineSettings(
        algorithm=cfg.algorithm.name, buffer_size=cfg.algorithm.buffer_size, server_steps=cfg.run.server_steps,
        eval_every=cfg.run.eval_every, seed=cfg.seed, reduction=cfg.server.reduction,
        max_staleness=cfg.server.max_staleness, codec=cfg.run.codec,
        hidden_state_replicas=cfg.algorithm.hidden_state_replicas, client_batch=cfg.run.client_batch,
        target_accuracy=cfg.run.target_accuracy, checkpoint_every=cfg.run.checkpoint_every,
        restart_before_step=s.schedule.restart_before_step, trace_timing=s.schedule.is_trace,
        num_clients=s.data.num_clients)
    trainer = make_trainer(cfg.run.trainer, s.model, s.data, local_training(cfg), s.x0.device,
                           cfg.run.job_threads)
    return Engine(settings, x0=s.x0, trainer=trainer,
                  client_quantizer=s.client_quantizer, server_quantizer=s.server_quantizer,
                  optimizer=ServerOptimizer(cfg.server, s.model.d, s.x0.device),
                  staleness_weight=StalenessWeight(cfg.server.staleness), schedule=s.schedule,
                  evaluate=s.evaluator, on_eval=on_eval, on_server_step=on_server_step, on_checkpoint=on_checkpoint)


RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT_NAME)


def holds_records(run_dir: str | Path) -> list[str]:
    """The run records (``RECORD_FILES``) already in ``run_dir``; empty when a fresh run may start there."""
    return [name for name in RECORD_FILES if (Path(run_dir) / name).exists()]


def refuse_existing_run_dir(run_dir: str | Path) -> None:
    """Raise RunDirExistsError when ``run_dir`` already holds a run's records (they are never overwritten)."""
    found = holds_records(run_dir)
    if found:
        how = f"continue it with resume={run_dir} or" if CHECKPOINT_NAME in found else "it has no checkpoint to resume:"
        raise RunDirExistsError(f"{run_dir}: already holds a run ({', '.join(found)}); {how} choose another "
                                "directory (hydra.run.dir=...)")


#: ``outcome(summary, error)``: how the caller judges a run that ended with ``summary`` or raised ``error``.
Outcome = Callable[[dict[str, Any] | None, BaseException | None], Mapping[str, Any]]


def run_experiment(cfg: DictConfig | dict, output_dir: str | Path,
                   on_eval: Callable[[dict[str, Any]], None] | None = None, resume: bool = False,
                   origin: RunOrigin | None = None, outcome: Outcome | None = None) -> dict[str, Any]:
    """Run one experiment; write ``config.yaml``, ``run.json``, ``metrics.jsonl``, ``summary.json`` and
    ``checkpoint.pt`` (every ``run.checkpoint_every`` server steps and at the end) to ``output_dir``.

    ``on_eval`` (optional) sees every evaluation record as it is made (sweeps use it for pruning).
    ``resume``: continue from ``output_dir/checkpoint.pt``, whose saved config must equal ``cfg`` (paths,
    tracking and ``run.progress`` aside); metrics.jsonl is rewritten to the checkpoint's records first, so the
    finished files equal those of an uninterrupted run, and the W&B run continues under the same id. Without
    ``resume`` a directory that already holds run records is refused (RunDirExistsError) before anything is
    written. ``config.yaml``, ``run.json`` and ``summary.json`` carry the same ``run_id``.
    ``origin``: where the run comes from (run.py: Hydra's choices and overrides; sweeps: the trial), recorded in
    run.json (a resumed run keeps its own). ``outcome`` (sweeps: the trial's state and objective values) is
    called once, with the summary or with the exception that ended the run, and recorded in run.json and W&B.
    Returns the summary dict.
    """
    t0 = time.perf_counter()
    out = Path(output_dir)
    ckpt_path = out / CHECKPOINT_NAME
    cfg = validate(cfg)
    if resume:
        checkpoint = load_checkpoint(ckpt_path)
        check_config_matches(ckpt_path, checkpoint["config"], cfg, what="the config to resume with")
        state = checkpoint["engine"]
        run_id = checkpoint["config"].get("run_id") or cfg.run_id or uuid.uuid4().hex
        remove_quietly(tmp_path(ckpt_path))  # left by a run killed while saving
    else:
        refuse_existing_run_dir(out)
        state, run_id = None, cfg.run_id or uuid.uuid4().hex
    cfg.run_id = run_id
    s = setup_run(cfg)
    cfg = s.cfg
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    except OSError as exc:
        raise OutputError(f"{out / 'config.yaml'}: cannot write ({exc.strerror or exc})") from None
    run_record = _origin(out, cfg, origin, resume)
    recorder = RunRecorder(out, history=state["history"] if state else None)
    tracker = make_tracker(cfg.tracking, out, run_record)
    if tracker is not None and state is not None:
        for past in state["history"]:  # the W&B run continues from the same records as metrics.jsonl
            tracker.log(past)
    progress = _progress_bar(cfg) if cfg.run.progress else None

    def log(record: dict[str, Any]) -> None:
        recorder.log(record)
        if tracker is not None:
            tracker.log(record)
        if progress is not None:
            progress.set_postfix(acc=f"{record['accuracy']:.3f}", loss=f"{record['loss']:.4g}", refresh=False)
        if on_eval is not None:
            on_eval(record)

    def checkpoint(e: Engine) -> None:
        save_checkpoint(ckpt_path, e.state_dict(), cfg)
        stop_if_preempted()  # a cluster job's preemption signal waited for this checkpoint (qafel.signals)

    engine = make_engine(s, on_eval=log,
                         on_server_step=(lambda _step: progress.update(1)) if progress is not None else None,
                         on_checkpoint=checkpoint)
    previous_wall = 0.0
    if state is not None:
        engine.load_state_dict(state)
        previous_wall = state["wall_elapsed"]
        if progress is not None:
            progress.update(engine.server_step)
    try:
        with checkpointing_run():
            summary = engine.run()
        save_checkpoint(ckpt_path, engine.state_dict(), cfg)
    except BaseException as exc:
        with suppress(Exception):  # the error that ended the run is the one to report
            _end(out, run_record, tracker, outcome(None, exc) if outcome is not None else None)
        raise
    finally:
        if progress is not None:
            progress.close()
        recorder.close()
    summary.update({
        "skipped_starts": s.schedule.skipped_starts,
        "offline_skipped_starts": s.schedule.offline_skipped_starts if s.schedule.is_trace else None,
        "redrawn_starts": s.schedule.redrawn_starts if s.schedule.is_trace else None,
        "f_star": s.f_star,
        "partition": s.data.stats,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "client_quantizer": cfg.client_quantizer.name,
        "server_quantizer": cfg.server_quantizer.name,
        "seed": cfg.seed,
        "wall_time_s": time.perf_counter() - t0 + previous_wall,
        "resumed": state is not None,
        "run_dir": str(out),
        "run_id": run_id,
    })
    recorder.write_summary(summary)
    _end(out, run_record, tracker, outcome(summary, None) if outcome is not None else None)
    return summary


def _origin(out: Path, cfg: DictConfig, origin: RunOrigin | None, resume: bool) -> dict[str, Any]:
    """The run's run.json record: a resumed run's own (written when the run started), else a new one."""
    existing = read_origin(out) if resume else None
    if existing is not None and existing.get("run_id") == cfg.run_id:
        return existing
    record = origin_record(cfg, None if resume else origin)  # a resumed run's origin is not the resume command
    write_origin(out, record)
    return record


def _end(out: Path, record: dict[str, Any], tracker: Any, outcome: Mapping[str, Any] | None) -> None:
    """Record the caller's outcome in run.json, then write the W&B summary and close the W&B run."""
    if outcome is not None:
        record["outcome"] = dict(outcome)
        write_origin(out, record)
    if tracker is not None:
        tracker.finish(record)


def _progress_bar(cfg: DictConfig):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.run.server_steps, desc=f"{cfg.algorithm.name} server steps", unit="step",
                dynamic_ncols=True)


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable block of the numbers a researcher looks at first."""
    def mb(n: float | None) -> str:
        return "-" if n is None else f"{n / 1e6:,.3f} MB"

    lines = [
        f"status            {summary['status']}",
        f"algorithm         {summary['algorithm']} (client {summary['client_quantizer']}, "
        f"server {summary['server_quantizer']})",
        f"final accuracy    {summary['final_accuracy']:.4f}" if summary.get("final_accuracy") is not None
        else "final accuracy    -",
        f"final loss        {summary['final_loss']:.5g}" if summary.get("final_loss") is not None
        else "final loss        -",
    ]
    if summary.get("suboptimality") is not None:
        lines.append(f"f(x) - f*         {summary['suboptimality']:.4e}")
    target = summary.get("target_accuracy")
    if target is not None:
        hit = summary.get("uploads_to_target")
        lines.append(f"{f'uploads to {target:.0%}':<18}{hit if hit is not None else 'not reached'}")
        if summary.get("time_to_target") is not None:
            lines.append(f"{f'sim time to {target:.0%}':<18}{summary['time_to_target']:,.1f}")
    lines += [
        f"parameters        {summary['num_parameters']:,}",
        f"server steps      {summary['server_steps']:,}",
        f"uploads           {summary['uploads']:,}",
        f"bytes uploaded    {mb(summary['bytes_up'])}  ({summary['message_bytes_up'] or 0:,.0f} B/message; "
        f"fp32 {mb(summary['bytes_up_fp32_equivalent'])})",
        f"bytes broadcast   {mb(summary['bytes_broadcast'])}  (fp32 {mb(summary['bytes_broadcast_fp32_equivalent'])})",
    ]
    if summary.get("bytes_down_naive"):
        lines.append(f"bytes downloaded  {mb(summary['bytes_down_naive'])}  (naive: one Q_s(x) per job start)")
    if summary.get("reduction_vs_fedbuff") is not None:
        lines.append(f"vs fp32 FedBuff   {summary['reduction_vs_fedbuff']:.2f}x fewer bytes in total")
    if summary.get("communication_time_mean") is not None:
        lines.append(f"per job (s)       compute {summary['compute_time_mean']:.3g}, communication "
                     f"{summary['communication_time_mean']:.3g} (download {summary['download_time_mean']:.3g}, "
                     f"upload {summary['upload_time_mean']:.3g})")
        reasons = summary.get("dropped_by_reason") or {}
        lines.append(f"availability      {summary['mean_online_fraction'] or 0:.1%} of clients online on average; "
                     f"{reasons.get('offline', 0):,} jobs lost offline; {summary.get('redrawn_starts') or 0:,} "
                     f"starts redrawn, {summary.get('offline_skipped_starts') or 0:,} skipped")
    lines += [
        f"sim time          {summary['sim_time']:,.1f}",
        f"mean staleness    {summary['mean_staleness']:.2f}   mean concurrency {summary['mean_concurrency']:.1f}",
        f"wall time         {summary['wall_time_s']:.1f} s",
        f"run directory     {summary['run_dir']}",
    ]
    return "\n".join(lines)
