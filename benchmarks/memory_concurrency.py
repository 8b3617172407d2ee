"""Peak memory of a run with about 1,000 concurrent clients and the paper's CNN (CIFAR-shaped synthetic data).

    python benchmarks/memory_concurrency.py [extra overrides...]

The paper's concurrency study at its largest rate (timing.rate=1253, half-normal durations with sigma 1:
lambda * E[duration] = 1,000 jobs in flight at steady state), 300 server steps, QAFeL with 4/4-bit min-max.
"""

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import compose_cfg  # noqa: E402

from qafel.experiment.runner import run_experiment  # noqa: E402

cfg = compose_cfg("experiment=paper_cifar10_concurrency", "dataset=synthetic_cifar10", "dataset.num_samples=12000",
                  "dataset.test_fraction=0.2", "timing.rate=1253",
                  "tracking=none", "run.progress=false", "run.server_steps=300", "run.eval_every=300", *sys.argv[1:])
t = time.time()
s = run_experiment(cfg, tempfile.mkdtemp())
print({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
       "mean_concurrency": s["mean_concurrency"], "uploads": s["uploads"], "wall_s": time.time() - t,
       "num_parameters": s["num_parameters"]})
