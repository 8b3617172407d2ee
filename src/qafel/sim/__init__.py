"""The simulated asynchronous system: who trains when, and what the server does with the updates.

Owns ``timing`` (arrival process and durations -> event schedule), ``traces`` and ``trace_timing`` (device traces
and the schedules they drive; ``python -m qafel.sim.traces`` is the qafel-traces CLI), ``engine`` (the event loop:
model versions, buffers, server steps, evaluation), ``algorithms`` (server rules: FedBuff, QAFeL, naive; server
optimizers and staleness weights), ``clients`` (local training, batched over clients) and ``system`` (threads, cores,
the allocator).

May import: ``qafel.quantizers``, ``qafel.models``, ``qafel.data`` and the shared ``qafel.errors``/``qafel.signals``;
never ``qafel.experiment``, ``qafel.sweep`` or ``qafel.report``.
"""
