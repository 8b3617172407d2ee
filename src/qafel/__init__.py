"""qafel: quantized asynchronous federated learning (QAFeL, FedBuff, naive) in a simulated async system.

The public Python API, imported lazily so that ``import qafel`` stays cheap::

    import qafel
    cfg = qafel.compose(["experiment=paper_celeba", "debug=smoke"])   # a validated config from overrides
    result = qafel.run(cfg)            # or qafel.run([...overrides]); result.summary, result.metrics (list of dicts)

Packages, in the direction imports go (entry points -> experiment -> sim -> quantizers, models, data):
``qafel.sweep`` and ``qafel.report`` (entry points), ``qafel.experiment``, ``qafel.sim``, ``qafel.quantizers``,
``qafel.models``, ``qafel.data``; ``qafel.errors`` and ``qafel.signals`` are shared by all.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: name -> (module, attribute): the public names, imported on first use.
_LAZY = {
    "compose": ("qafel.experiment.compose", "compose"),
    "config_dir": ("qafel.experiment.compose", "config_dir"),
    "run": ("qafel.experiment.public", "run"),
    "RunResult": ("qafel.experiment.public", "RunResult"),
    "run_experiment": ("qafel.experiment.runner", "run_experiment"),
    "write_report": ("qafel.report", "write_report"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'qafel' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
