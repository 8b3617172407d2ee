"""One-step jobs that all start from the same model: is a shared-weight forward/backward cheaper?

When every job of a batch starts from one model version and takes one local step, the gradients can come from
``vmap(grad(loss), in_dims=(None, 0, 0, 0))``: the weights are not stacked, so the forward pass is one
ordinary (not grouped) layer call over all jobs' samples. This script times it side by side against the
stacked-weight vmap the batched trainer uses and against one job at a time, on the same jobs, and checks the
gradients agree. Usage:

    python benchmarks/bench_shared_start.py [--jobs N] [--batch B] [--repeat R] [--json]

Measured on this project's 2-core CPU (docs/performance.md) it was not cheaper, so the engine does not use it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.func import grad, vmap

from qafel.models.networks import FlatModel, PaperCNN, build_module


def models() -> list[tuple[str, FlatModel, tuple[int, ...], int]]:
    """(name, model, input shape, classes) for the paper CNN at 32x32 and the digits MLP."""
    return [("paper_cnn_32x32", FlatModel(PaperCNN(3, 32, 2, dropout=0.0)), (3, 32, 32), 2),
            ("mlp_64_hidden", FlatModel(build_module({"name": "mlp", "hidden": [64]}, (64,), 10)), (64,), 10)]


def bench(name: str, model: FlatModel, shape: tuple[int, ...], classes: int, n: int, batch: int,
          repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, batch, *shape, generator=gen)
    y = torch.randint(0, classes, (n, batch), generator=gen)
    mask = torch.ones(n, batch)
    w = model.initial_vector(0)
    stacked_w = w.repeat(n, 1)
    shared = vmap(grad(model.masked_loss), in_dims=(None, 0, 0, 0))
    stacked = vmap(grad(model.masked_loss))

    def one_by_one() -> torch.Tensor:
        out = []
        for j in range(n):
            leaf = w.detach().requires_grad_(True)
            out.append(torch.autograd.grad(model.masked_loss(leaf, X[j], y[j], mask[j]), leaf)[0])
        return torch.stack(out)

    sides = {"shared_weights": lambda: shared(w, X, y, mask), "stacked_weights": lambda: stacked(stacked_w, X, y, mask),
             "one_by_one": one_by_one}
    results = {k: f() for k, f in sides.items()}  # warm-up, and the values compared
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeat):  # interleaved rounds: load bursts hit every side alike
        for k, f in sides.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ref = results["one_by_one"]
    norm = torch.linalg.vector_norm
    row = {"model": name, "jobs": n, "batch": batch, "threads": torch.get_num_threads()}
    for k in sides:
        row[f"{k}_ms_per_job"] = 1e3 * float(np.median(times[k])) / n
        row[f"{k}_relative_difference"] = float(norm(results[k] - ref) / norm(ref))
    row["shared_vs_stacked_speedup"] = row["stacked_weights_ms_per_job"] / row["shared_weights_ms_per_job"]
    row["shared_vs_one_by_one_speedup"] = row["one_by_one_ms_per_job"] / row["shared_weights_ms_per_job"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (as run.threads)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(*m, n=args.jobs, batch=args.batch, repeat=args.repeat) for m in models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':18} {'shared ms/job':>13} {'stacked ms/job':>14} {'one-by-one ms/job':>17} "
          f"{'shared vs stacked':>17}")
    for r in rows:
        print(f"{r['model']:18} {r['shared_weights_ms_per_job']:13.3f} {r['stacked_weights_ms_per_job']:14.3f} "
              f"{r['one_by_one_ms_per_job']:17.3f} {r['shared_vs_stacked_speedup']:16.2f}x")


if __name__ == "__main__":
    main()
