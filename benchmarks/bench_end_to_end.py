"""End-to-end throughput: where a whole run's time goes, against the client trainer alone on the same jobs.

For each workload the script builds the run as ``run.py`` does (``qafel.experiment.runner.setup_run``), runs a fixed
number of
server steps with every part timed in place, then replays the very calls the engine made to the client trainer
(same start models, clients and seeds, in the same batches) with nothing else around them:

    python benchmarks/bench_end_to_end.py [--json] [--device cuda] [--only NAME] [--steps N] [--concurrent N]
                                          [--set KEY=VALUE ...]

Workloads: ``paper_logreg`` (the paper's logistic regression: 100 clients, closed loop, QSGD both ways);
``cifar10`` (the CIFAR-10 protocol on ``dataset=synthetic_cifar10``: power-law over 5,000 clients, the paper CNN,
K = 10, min-max 4/4); ``celeba`` (the CelebA protocol on ``dataset=synthetic_celeba``: 7,474 clients, the paper CNN
for 2 classes). Per workload it prints ``name``, ``device``, ``e2e_updates_per_s`` (uploads per second of the event
loop), ``trainer_updates_per_s`` (the same jobs through the trainer alone), ``efficiency`` (their ratio), and the
fractions of the whole run (data set-up included) spent in ``training``, ``scheduling`` (drawing the event
schedule), ``quantization`` (client and server codecs), ``evaluation``, ``bookkeeping`` (the rest of the event
loop) and ``data_setup`` (data, model, quantizers, schedule and f*); ``jobs_per_call`` is the mean batch the
trainer saw. ``--concurrent N`` also runs N copies of the workload in N processes at once, the machine's cores
split between them as ``qafel-sweep --workers N`` does, and reports ``concurrent_updates_per_s`` (all uploads
over the wall time from the first start to the last end).

A short benchmark evaluates far more often per upload than the run it stands for (the evaluations at step 0
and at the last step are a large share of 100 or 200 steps), so each row also carries the measured costs over to
the experiment's whole run (its own ``run.server_steps`` and ``run.eval_every``): everything but evaluation
scales with the uploads, evaluation with the number of evaluations. ``evaluations`` (in the benchmark),
``full_run_server_steps``, ``full_run_evaluations``, ``full_run_uploads``, ``full_run_efficiency`` (the same ratio
as ``efficiency``, for the whole run) and ``full_run_hours`` (the whole run's wall clock at these rates, data
set-up included). ``efficiency_without_evaluation`` is the same ratio with the evaluations' time left out of the
event loop: how close the engine's own work (scheduling, codecs, bookkeeping around the trainer) comes to the
trainer alone, whatever the protocol's evaluation cadence costs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

WORKLOADS: dict[str, tuple[list[str], int]] = {  # name -> (overrides, default server steps)
    "paper_logreg": (["experiment=paper_logreg"], 2000),
    "cifar10": (["experiment=paper_cifar10", "dataset=synthetic_cifar10"], 200),
    "celeba": (["experiment=paper_celeba", "dataset=synthetic_celeba"], 100),
}
PARTS = ("training", "scheduling", "quantization", "evaluation", "bookkeeping", "data_setup")


def data_root() -> str:
    return os.environ.get("QAFEL_DATA_ROOT", str(REPO.parent / "shared" / "data"))


class Timer:
    """Seconds spent inside wrapped callables, per part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(PARTS, 0)

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.calls[part] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0
        return timed

    def iterate(self, part: str, events: Iterator[Any]) -> Iterator[Any]:
        """The events of ``events``, the time spent drawing each one counted as ``part``."""
        while True:
            t0 = time.perf_counter()
            try:
                event = next(events)
            except StopIteration:
                return
            finally:
                self.seconds[part] += time.perf_counter() - t0
            yield event


def compose_workload(name: str, steps: int | None, device: str, extra: Sequence[str]) -> Any:
    """The workload's config, composed as run.py composes it (``steps`` None: the experiment's own server steps)."""
    from qafel.experiment.compose import compose

    overrides, _ = WORKLOADS[name]
    length = [] if steps is None else [f"run.server_steps={steps}"]
    return compose([*overrides, f"paths.data_root={data_root()}", f"device={device}", *length,
                    "tracking=none", "run.progress=false", "run.checkpoint_every=0", *extra])


def full_run_projection(row: dict[str, Any], evaluations: int, eval_seconds: float, full_steps: int,
                        eval_every: int) -> dict[str, Any]:
    """The measured costs carried over to the experiment's whole run (``full_steps`` server steps, an evaluation
    every ``eval_every`` and at the end): everything but evaluation scales with the uploads, evaluation with the
    number of evaluations. A short benchmark evaluates far more often per upload than the run it stands for
    (step 0 and the last step included), so its own ``efficiency`` understates a whole run's. Outside evaluation
    the cost is charged per job trained (``jobs_trained``, when the row has it): a whole run trains as many jobs as
    it uploads, give or take the few in flight at its end."""
    full_evaluations = 1 + full_steps // eval_every + (1 if full_steps % eval_every else 0)
    full_uploads = row["uploads"] / max(1, row["server_steps"]) * full_steps
    # per job trained, not per upload: a short run also trains the jobs still in flight at its end (3-7% more
    # jobs than uploads at the default steps), which a whole run's hundreds of thousands of uploads amortise
    per_job = (row["loop_s"] - eval_seconds) / max(1, row.get("jobs_trained") or row["uploads"])
    full_loop = full_uploads * per_job + full_evaluations * eval_seconds / max(1, evaluations)
    out: dict[str, Any] = {"evaluations": evaluations, "full_run_server_steps": full_steps,
                           "full_run_evaluations": full_evaluations, "full_run_uploads": round(full_uploads),
                           "full_run_hours": (full_loop + row["data_setup_s"]) / 3600}
    if row.get("trainer_updates_per_s"):
        out["full_run_efficiency"] = full_uploads / full_loop / row["trainer_updates_per_s"]
    return out


def measure(name: str, steps: int, device: str, extra: Sequence[str], replay: bool = True) -> dict[str, Any]:
    """Run the workload once with every part timed; replay its trainer calls alone (``replay``)."""
    from qafel.experiment.runner import make_engine, setup_run

    cfg = compose_workload(name, steps, device, extra)
    full = compose_workload(name, None, device, extra).run
    timer = Timer()
    t0 = time.perf_counter()
    s = setup_run(cfg)
    setup = time.perf_counter() - t0
    calls: list[tuple[torch.Tensor, list[int], list[int]]] = []
    jobs_trained = [0, 0]  # jobs, calls
    engine = make_engine(s)
    train = engine.trainer.train

    def recorded_train(starts: torch.Tensor, clients: list[int], seeds: list[int]) -> torch.Tensor:
        jobs_trained[0] += len(clients)
        jobs_trained[1] += 1
        if replay:
            calls.append((starts.clone(), list(clients), list(seeds)))
        return train(starts, clients, seeds)

    engine.trainer.train = timer.wrap("training", recorded_train)
    for q in {id(engine.qc): engine.qc, id(engine.qs): engine.qs}.values():
        for method in ("quantize", "quantize_batch", "encode", "decode"):
            setattr(q, method, timer.wrap("quantization", getattr(q, method)))
    engine.evaluate = timer.wrap("evaluation", engine.evaluate)
    engine.schedule = timer.iterate("scheduling", iter(engine.schedule))
    sync = torch.cuda.synchronize if s.x0.device.type == "cuda" else (lambda: None)
    sync()
    t1 = time.perf_counter()
    summary = engine.run()
    sync()
    loop = time.perf_counter() - t1
    timer.seconds["bookkeeping"] = loop - sum(timer.seconds[p] for p in PARTS if p != "bookkeeping")
    timer.seconds["data_setup"] = setup
    total = loop + setup
    row: dict[str, Any] = {
        "name": name, "device": str(s.x0.device), "server_steps": summary["server_steps"],
        "uploads": summary["uploads"], "status": summary["status"], "loop_s": loop, "data_setup_s": setup,
        "e2e_updates_per_s": summary["uploads"] / loop,
        **{f"{p}_fraction": timer.seconds[p] / total for p in PARTS},
        "trainer_calls": jobs_trained[1], "jobs_trained": jobs_trained[0],
        "jobs_per_call": jobs_trained[0] / max(1, jobs_trained[1]),
    }
    if replay:
        jobs = sum(len(c[1]) for c in calls)
        sync()
        t2 = time.perf_counter()
        for starts, clients, seeds in calls:
            train(starts, clients, seeds)
        sync()
        alone = time.perf_counter() - t2
        row.update(trainer_s=alone, trainer_updates_per_s=jobs / alone,
                   efficiency=(summary["uploads"] / loop) / (jobs / alone),
                   efficiency_without_evaluation=(summary["uploads"] / (loop - timer.seconds["evaluation"]))
                   / (jobs / alone))
    row.update(full_run_projection(row, timer.calls["evaluation"], timer.seconds["evaluation"],
                                   int(full.server_steps), int(full.eval_every)))
    return row


def _concurrent_worker(args: tuple[str, int, str, list[str], int, Any]) -> None:
    name, steps, device, extra, cores, queue = args
    from qafel.sim.system import set_core_budget

    torch.set_num_threads(1)
    set_core_budget(cores)  # run.job_threads=null then plans for this process's share, as sweep workers do
    t0 = time.time()
    row = measure(name, steps, device, extra, replay=False)
    queue.put((t0 + row["data_setup_s"], time.time(), row["uploads"]))


def measure_concurrent(name: str, steps: int, device: str, extra: Sequence[str], n: int) -> dict[str, Any]:
    """N copies of the workload at once in N processes (the machine's cores split between them)."""
    from qafel.sim.system import available_cores

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    cores = max(1, available_cores() // n)
    procs = [ctx.Process(target=_concurrent_worker, args=((name, steps, device, list(extra), cores, queue),))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    start, end = min(r[0] for r in results), max(r[1] for r in results)
    uploads = sum(r[2] for r in results)
    return {"concurrent": n, "concurrent_updates_per_s": uploads / (end - start), "concurrent_wall_s": end - start}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", action="append", choices=sorted(WORKLOADS), help="run only this workload (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="server steps per run (default: per workload)")
    p.add_argument("--concurrent", type=int, default=0, help="also run N copies at once and report their aggregate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from qafel.errors import QafelError

    try:
        rows = run_workloads(args)
    except QafelError as exc:  # a bad --set, a missing data file, device=cuda without a GPU: one line
        print(f"bench_end_to_end.py: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def run_workloads(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure each chosen workload (printing a table row per workload unless ``--json``)."""
    rows = []
    for name in args.only or list(WORKLOADS):
        steps = args.steps or WORKLOADS[name][1]
        row = measure(name, steps, args.device, args.set)
        if args.concurrent:
            row.update(measure_concurrent(name, steps, args.device, args.set, args.concurrent))
        rows.append(row)
        if not args.json:
            print(f"{name:13s} {row['device']:5s} e2e {row['e2e_updates_per_s']:9.1f} upd/s  trainer "
                  f"{row['trainer_updates_per_s']:9.1f} upd/s  efficiency {row['efficiency']:.2f} "
                  f"({row['efficiency_without_evaluation']:.2f} without evaluation)  "
                  f"({row['jobs_per_call']:.1f} jobs/call)  "
                  + "  ".join(f"{part} {row[f'{part}_fraction']:.0%}" for part in PARTS)
                  + f"  | full run ({row['full_run_server_steps']} steps, {row['full_run_evaluations']} evaluations):"
                  f" efficiency {row['full_run_efficiency']:.2f}, {row['full_run_hours']:.2f} h"
                  + (f"  {args.concurrent} at once: {row['concurrent_updates_per_s']:.1f} upd/s"
                     if args.concurrent else ""), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
