"""Client-update throughput: a per-client loop as FLSim does it versus qafel's client trainer.

Both run side by side in one process on the same jobs (same clients, start models and minibatches), and the
script checks that they produce the same updates. "qafel" is the trainer the engine uses for that model and
device (``run.trainer=auto``): the batched vmap trainer, except for convolutional models on the CPU, where
vmapped per-job convolutions become slow grouped convolutions and the engine trains jobs one by one with
fused GroupNorm/ReLU/max-pool kernels. The vmap trainer's and qafel's own loop's throughputs are printed too.
Usage:

    python benchmarks/bench_clients.py [--jobs N] [--repeat R] [--device cpu|cuda] [--threads T] [--json]
                                       [--one-core-only] [--e2e] [--memory]

Each side is timed in R interleaved rounds (default 5) over the same jobs and the median round is reported;
``--json`` also lists every round's seconds (``loop_round_s``, ``qafel_round_s``). The main comparison pins
both sides to ``--threads`` torch threads (default 1: one core each). On a CPU a second comparison then gives
each side the whole machine as it runs by default: the FLSim loop with torch's default intra-op threads (or one,
if that is faster), qafel with ``run.job_threads=null``, i.e. the per-job trainer's jobs side by side in one
thread per core; its updates must equal the one-core ones bit for bit (``*_all_cores`` keys in the JSON).

``--e2e`` also times ``python run.py experiment=paper_logreg`` end to end (10,000 server steps) in-process;
``--memory`` reports peak memory of one batched call over 1,000 concurrent CNN clients.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from qafel.data import FederatedData, build_dataset  # noqa: E402
from qafel.experiment.runner import choose_trainer, make_trainer  # noqa: E402
from qafel.models.networks import FlatModel, build_module  # noqa: E402
from qafel.sim.clients import BatchedTrainer, ClientTrainer, LocalTraining, job_seed  # noqa: E402
from qafel.sim.system import available_cores, tune_malloc  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # torch's default intra-op threads, before main() sets --threads


def data_root() -> str:
    return os.environ.get("QAFEL_DATA_ROOT", str(REPO.parent / "shared" / "data"))


def workloads(device: str):
    """(name, model, data, local-training spec) for each benchmarked setting."""
    mush = build_dataset({"name": "mushrooms", "num_clients": 100, "partition": "contiguous", "test_fraction": 0.0},
                         data_root(), 0)
    logreg = FlatModel(build_module({"name": "logreg", "bias": False, "binary_output": True}, mush.input_shape, 2),
                       l2=1.0 / len(mush.y))
    yield "logreg_mushrooms_P10_fullbatch", logreg, mush.to(device), LocalTraining(lr=2.0, local_steps=10)

    digits = build_dataset({"name": "digits", "num_clients": 50, "partition": "dirichlet", "alpha": 0.5,
                            "test_fraction": 0.2}, ".", 0)
    mlp = FlatModel(build_module({"name": "mlp", "hidden": [64]}, digits.input_shape, 10))
    yield "mlp_digits_P5_batch16", mlp, digits.to(device), LocalTraining(lr=0.1, local_steps=5, batch_size=16)

    gen = torch.Generator().manual_seed(0)
    n_clients, per_client = 200, 32  # CelebA-sized clients: one local epoch of batch 32 is one step
    X = torch.randn(n_clients * per_client, 3, 32, 32, generator=gen)
    y = torch.randint(0, 2, (n_clients * per_client,), generator=gen)
    parts = [np.arange(i * per_client, (i + 1) * per_client) for i in range(n_clients)]
    images = FederatedData.from_partition("synthetic", X, y, parts, X[:64], y[:64], 2)
    cnn = FlatModel(build_module({"name": "cnn", "dropout": 0.0}, (3, 32, 32), 2))
    yield "paper_cnn_32x32_1epoch_batch32", cnn, images.to(device), LocalTraining(lr=0.01, local_epochs=1,
                                                                                 batch_size=32)


def flsim_style_loop(model: FlatModel, data: FederatedData, local: LocalTraining, starts: torch.Tensor,
                     clients: list[int], seeds: list[int]) -> torch.Tensor:
    """One deep-copied nn.Module and one torch.optim.SGD per client job, as FLSim trains clients."""
    out = []
    for start, c, seed in zip(starts, clients, seeds, strict=True):
        net = copy.deepcopy(model.module)
        if hasattr(net, "fused_cpu"):
            net.fused_cpu = False  # FLSim's CNN runs GroupNorm, ReLU and MaxPool2d as separate modules
        torch.nn.utils.vector_to_parameters(start.clone(), net.parameters())  # params become views of it
        opt = torch.optim.SGD(net.parameters(), lr=local.lr)
        X, y = data.client(c)
        net.train()
        for idx in local.batches(len(y), torch.Generator().manual_seed(seed)):
            Xb, yb = (X, y) if idx is None else (X[idx.to(X.device)], y[idx.to(X.device)])
            opt.zero_grad()
            outb = net(Xb)
            outb = outb.squeeze(-1) if model.binary else outb
            loss = model.data_loss(outb, yb)
            if model.l2:
                loss = loss + 0.5 * model.l2 * sum((p * p).sum() for p in net.parameters())
            loss.backward()
            opt.step()
        out.append(start - torch.nn.utils.parameters_to_vector(net.parameters()).detach())
    return torch.stack(out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(name, model, data, local, n_jobs: int, device: str, repeat: int = 5, all_cores: bool = True) -> dict:
    """Times the FLSim-style loop and qafel's trainer on the same jobs in ``repeat`` interleaved rounds (loop,
    then qafel, then loop...) and reports the median round of each, so a burst of load on a shared machine
    hits both sides alike and one slow round does not decide the ratio.

    First both sides get the process's torch threads (``--threads``, default one core each). Then, with
    ``all_cores`` on a CPU, each side gets the whole machine as it would by default: the loop torch's default
    intra-op threads (its better of that and one thread counts), qafel ``run.threads=1`` with
    ``run.job_threads=null`` (one job thread per core; only the per-job trainer uses them).
    """
    model.module.to(device)
    gen = torch.Generator().manual_seed(0)
    x0 = model.initial_vector(0).to(device)
    starts = x0 + 0.01 * torch.randn(n_jobs, model.d, generator=gen).to(device)
    clients = [int(c) for c in torch.randint(0, data.num_clients, (n_jobs,), generator=gen)]
    seeds = [job_seed(0, 1, j) for j in range(n_jobs)]
    batched = BatchedTrainer(model, data, local)
    ours_loop = ClientTrainer(model, data, local)
    chosen = choose_trainer("auto", model, torch.device(device))
    qafel, other = (batched, ours_loop) if chosen == "batched" else (ours_loop, batched)
    batched.train(starts[:4], clients[:4], seeds[:4])  # warm-ups: first calls pay one-off costs
    ours_loop.train(starts[:2], clients[:2], seeds[:2])
    flsim_style_loop(model, data, local, starts[:2], clients[:2], seeds[:2])

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(starts, clients, seeds)
        _sync(device)
        return out, time.perf_counter() - t0

    loop_times, qafel_times = [], []
    for _ in range(repeat):
        ref, t = timed(lambda *a: flsim_style_loop(model, data, local, *a))
        loop_times.append(t)
        got, t = timed(qafel.train)
        qafel_times.append(t)
    other_out, t_other = timed(other.train)  # the trainer the engine does not pick here: once, for reference
    vmapped, t_vmap = (other_out, t_other) if chosen != "batched" else (got, float(np.median(qafel_times)))
    t_ours_loop = t_other if chosen == "batched" else float(np.median(qafel_times))
    t_loop, t_qafel = float(np.median(loop_times)), float(np.median(qafel_times))
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    rel = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
    rel_vmap = float(torch.linalg.vector_norm(vmapped - ref) / torch.linalg.vector_norm(ref))
    row = {"workload": name, "device": device, "threads": torch.get_num_threads(), "jobs": n_jobs,
           "parameters": model.d, "qafel_trainer": chosen, "loop_updates_per_s": n_jobs / t_loop,
           "batched_updates_per_s": n_jobs / t_qafel, "speedup": t_loop / t_qafel, "repeat": repeat,
           "loop_round_s": loop_times, "qafel_round_s": qafel_times,
           "vmap_updates_per_s": n_jobs / t_vmap, "qafel_loop_updates_per_s": n_jobs / t_ours_loop,
           "max_abs_diff": diff, "max_abs_update": scale, "relative_error": rel, "vmap_relative_error": rel_vmap,
           **float64_agreement(model, data, local, starts, clients, seeds)}
    if all_cores and device == "cpu":
        row |= bench_all_cores(model, data, local, starts, clients, seeds, repeat, got, n_jobs / t_loop)
    return row


def bench_all_cores(model, data, local, starts, clients, seeds, repeat: int, one_core_out: torch.Tensor,
                    loop_one_thread_updates_per_s: float) -> dict:
    """Both sides on the whole CPU, as each runs by default (see ``bench``); qafel's result must be bit-identical
    to its one-core result."""
    one_core_threads = torch.get_num_threads()
    # run.threads=1 with run.job_threads=null: one job thread per core (used by the per-job trainer only)
    qafel = make_trainer("auto", model, data, local, torch.device("cpu"), job_threads=available_cores())
    job_threads = qafel.job_threads
    loop_times, qafel_times = [], []
    try:
        for r in range(repeat + 1):  # round 0 warms the thread pools up
            torch.set_num_threads(DEFAULT_THREADS)
            t0 = time.perf_counter()
            flsim_style_loop(model, data, local, starts, clients, seeds)
            t_loop = time.perf_counter() - t0
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            out = qafel.train(starts, clients, seeds)
            t_qafel = time.perf_counter() - t0
            if r:
                loop_times.append(t_loop)
                qafel_times.append(t_qafel)
    finally:
        torch.set_num_threads(one_core_threads)
    n = len(clients)
    loop_default = n / float(np.median(loop_times))
    loop_best = max(loop_default, loop_one_thread_updates_per_s)
    ours = n / float(np.median(qafel_times))
    return {"cores": available_cores(), "job_threads": job_threads, "loop_default_threads": DEFAULT_THREADS,
            "loop_default_threads_updates_per_s": loop_default,
            "loop_all_cores_threads": DEFAULT_THREADS if loop_default >= loop_one_thread_updates_per_s else 1,
            "loop_all_cores_updates_per_s": loop_best, "batched_all_cores_updates_per_s": ours,
            "speedup_all_cores": ours / loop_best, "loop_all_cores_round_s": loop_times,
            "qafel_all_cores_round_s": qafel_times, "all_cores_same_as_one_core": bool(torch.equal(out, one_core_out))}


def float64_agreement(model: FlatModel, data: FederatedData, local: LocalTraining, starts: torch.Tensor,
                      clients: list[int], seeds: list[int], n_jobs: int = 16) -> dict:
    """Relative difference of the FLSim loop's and qafel's updates recomputed in float64 on ``n_jobs`` jobs.

    In float32 a max-pool window whose two largest inputs are within rounding of each other can route a
    gradient to another element when the two paths sum in different orders (measured for the CNN: ~1e-3
    relative on a GPU, 6e-4 to 8e-4 on the CPU, where qafel's convolutions run channels-last and FLSim's NCHW);
    in float64 that practically never happens, so equal math shows as ~1e-15.
    """
    model64 = FlatModel(copy.deepcopy(model.module).double(), l2=model.l2)
    if hasattr(model64.module, "fused_cpu"):
        model64.module.fused_cpu = model.module.fused_cpu
    floats = data.X.is_floating_point()
    data64 = dataclasses.replace(data, X=data.X.double(), X_test=data.X_test.double()) if floats else data
    starts64, clients, seeds = starts[:n_jobs].double(), clients[:n_jobs], seeds[:n_jobs]
    ref = flsim_style_loop(model64, data64, local, starts64, clients, seeds)
    got = make_trainer("auto", model64, data64, local, starts.device).train(starts64, clients, seeds)
    rel = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
    return {"float64_relative_error": rel, "same_updates": rel < 1e-9}


def e2e_paper_logreg() -> dict:
    from conftest import compose_cfg

    from qafel.experiment.runner import run_experiment

    cfg = compose_cfg("experiment=paper_logreg", "tracking=none", "run.progress=false",
                      f"paths.data_root={data_root()}")
    t0 = time.perf_counter()
    summary = run_experiment(cfg, Path("/tmp/qafel_bench_paper_logreg"))
    return {"workload": "e2e_paper_logreg_10000_steps", "wall_time_s": time.perf_counter() - t0,
            "server_steps": summary["server_steps"], "suboptimality": summary.get("suboptimality")}


def peak_memory_cnn(device: str, clients: int = 1000, client_batch: int = 256) -> dict:
    """Peak memory of training ``clients`` concurrent CNN jobs (one local epoch of batch 32) as the engine does:
    with the trainer ``run.trainer=auto`` picks, at most ``client_batch`` jobs per call (run.client_batch)."""
    gen = torch.Generator().manual_seed(0)
    per_client = 32
    X = torch.randn(clients * per_client, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (clients * per_client,), generator=gen)
    parts = [np.arange(i * per_client, (i + 1) * per_client) for i in range(clients)]
    data = FederatedData.from_partition("synthetic", X, y, parts, X[:10], y[:10], 10).to(device)
    model = FlatModel(build_module({"name": "cnn", "dropout": 0.0}, (3, 32, 32), 10))
    model.module.to(device)
    starts = model.initial_vector(0).to(device).repeat(clients, 1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    local = LocalTraining(lr=0.01, local_epochs=1, batch_size=32)
    trainer = make_trainer("auto", model, data, local, torch.device(device))
    for lo in range(0, clients, client_batch):
        hi = min(lo + client_batch, clients)
        trainer.train(starts[lo:hi], list(range(lo, hi)), list(range(lo, hi)))
    out = {"workload": f"peak_memory_cnn_{clients}_clients", "device": device,
           "qafel_trainer": "batched" if isinstance(trainer, BatchedTrainer) else "loop", "client_batch": client_batch,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides (as run.threads)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved timing rounds per side; the median round is reported")
    parser.add_argument("--only", default="", help="run only workloads whose name contains this text")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (as run.tf32; off)")
    parser.add_argument("--no-tune-malloc", action="store_true",
                        help="leave glibc's allocator as it is (runs tune it: run.tune_malloc)")
    parser.add_argument("--one-core-only", action="store_true",
                        help="skip the whole-machine comparison (each side with its default threads)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--e2e", action="store_true", help="also time experiment=paper_logreg end to end")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, 1,000 CNN clients")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # as setup_run does
    tuned = False if args.no_tune_malloc else tune_malloc()  # as setup_run does; both sides share the process
    rows = [bench(*w, n_jobs=args.jobs, device=args.device, repeat=args.repeat, all_cores=not args.one_core_only)
            | {"malloc_tuned": tuned}
            for w in workloads(args.device) if args.only in w[0]]
    extra = []
    if args.e2e:
        extra.append(e2e_paper_logreg())
    if args.memory:
        extra.append(peak_memory_cnn(args.device))
    if args.json:
        print(json.dumps(rows + extra, indent=2))
        return
    print(f"{'workload':34} {'device':6} {'FLSim loop upd/s':>16} {'qafel upd/s':>12} {'trainer':>8} {'speedup':>8} "
          f"{'vmap upd/s':>11} {'same':>5}")
    for r in rows:
        print(f"{r['workload']:34} {r['device']:6} {r['loop_updates_per_s']:16.1f} {r['batched_updates_per_s']:12.1f} "
              f"{r['qafel_trainer']:>8} {r['speedup']:7.2f}x {r['vmap_updates_per_s']:11.1f} "
              f"{str(r['same_updates']):>5}")
    whole = [r for r in rows if "speedup_all_cores" in r]
    if whole:
        print(f"\nwhole machine ({whole[0]['cores']} cores), each side with its default threads:")
        print(f"{'workload':34} {'FLSim loop upd/s':>16} {'(threads)':>9} {'qafel upd/s':>12} {'job thr.':>8} "
              f"{'speedup':>8} {'same':>5}")
        for r in whole:
            print(f"{r['workload']:34} {r['loop_all_cores_updates_per_s']:16.1f} {r['loop_all_cores_threads']:9d} "
                  f"{r['batched_all_cores_updates_per_s']:12.1f} {r['job_threads']:8d} {r['speedup_all_cores']:7.2f}x "
                  f"{str(r['all_cores_same_as_one_core']):>5}")
    for e in extra:
        print(json.dumps(e))


if __name__ == "__main__":
    main()
