"""One experiment end to end: config in, run records and a summary out.

Owns ``config`` (the schema and its validation), ``compose`` (composing a config from Hydra overrides; the config
directory), ``runner`` (the run function ``run_experiment``: data, model, schedule, engine, records), ``public``
(``qafel.compose`` / ``qafel.run`` for notebooks and scripts), ``tracking`` and ``wandb_runs`` (local records, W&B
mirror; ``python -m qafel.experiment.wandb_runs`` is the qafel-wandb CLI), ``checkpoint`` (save, resume), and the
Hydra callbacks (``hydra_callbacks``, ``multirun``).

May import: ``qafel.sim``, ``qafel.quantizers``, ``qafel.models``, ``qafel.data`` and the shared
``qafel.errors``/``qafel.signals``; never ``qafel.sweep`` or ``qafel.report``.
"""
