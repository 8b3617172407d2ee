"""Client local training as a pure function of (start parameters, client data, job seed)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from qafel.data.federated import FederatedData
from qafel.models.networks import FlatModel, dropout_generator
from qafel.sim.system import map_in_threads

_MASK64 = (1 << 64) - 1


def job_seed(seed: int, stream: int, job_id: int) -> int:
    """A 63-bit seed for one job's generator (splitmix64 of the run seed, a stream tag and the job id).

    Each job owns its generator, so results do not depend on the order or grouping in which jobs are computed.
    """
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + job_id + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass(frozen=True)
class LocalTraining:
    """What one client job does: ``local_steps`` SGD steps (or ``local_epochs`` passes) with step size ``lr``
    on minibatches of ``batch_size`` (None: full batch)."""

    lr: float
    local_steps: int | None = None
    local_epochs: int | None = None
    batch_size: int | None = None

    def batches(self, n: int, generator: torch.Generator) -> list[torch.Tensor | None]:
        """Index sets for each local step on a client with ``n`` samples (None means all samples).

        ``local_steps``: each step draws ``batch_size`` samples without replacement from the client's data.
        ``local_epochs``: each epoch shuffles the data and walks it in batches (the last may be smaller).
        """
        full = self.batch_size is None or self.batch_size >= n
        if self.local_epochs is not None:
            if full:
                return [None] * self.local_epochs
            out: list[torch.Tensor | None] = []
            for _ in range(self.local_epochs):
                perm = torch.randperm(n, generator=generator)
                out += list(torch.split(perm, self.batch_size))
            return out
        steps = int(self.local_steps or 0)
        if full:
            return [None] * steps
        return [torch.randperm(n, generator=generator)[: self.batch_size] for _ in range(steps)]

    def samples_for(self, n: int) -> int:
        """Training samples a job on ``n`` samples processes (summed over its local steps)."""
        if self.local_epochs is not None:
            return self.local_epochs * n
        batch = n if self.batch_size is None else min(self.batch_size, n)
        return int(self.local_steps or 0) * batch

    def steps_for(self, n: int) -> int:
        """Number of local steps a job on ``n`` samples takes."""
        if self.local_epochs is None:
            return int(self.local_steps or 0)
        per_epoch = 1 if self.batch_size is None or self.batch_size >= n else math.ceil(n / self.batch_size)
        return self.local_epochs * per_epoch


class ClientTrainer:
    """Runs client jobs one by one: y₀ → P local SGD steps → Δ = y₀ − y_P.

    With ``job_threads`` > 1, the jobs of one ``train`` call run side by side in that many threads (PyTorch
    releases the GIL inside its operators, so compute-bound jobs such as the CNN's scale with cores). A job's
    result depends only on its start model, client and seed, so it is bit-identical either way.
    """

    def __init__(self, model: FlatModel, data: FederatedData, local: LocalTraining, job_threads: int = 1) -> None:
        if job_threads < 1:
            raise ValueError(f"job_threads must be at least 1, got {job_threads}")
        self.model = model
        self.data = data
        self.local = local
        self.job_threads = job_threads
        self._sizes: list[int] | None = None

    def train_one(self, start: torch.Tensor, client: int, seed: int) -> torch.Tensor:
        """Δ for one job of ``client`` from start model ``start`` with the job's seed."""
        X, y = self.data.client(client)
        generator = torch.Generator().manual_seed(seed)
        masks: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.model.has_dropout:
            if X.device.type == "cpu":  # the job's own generator: jobs may run in parallel threads
                masks = dropout_generator(torch.Generator().manual_seed(seed))
            else:
                torch.manual_seed(seed)  # CUDA dropout draws from the global generator: pin it per job
        self.model.module.train()
        w = start
        with masks:
            for idx in self.local.batches(len(y), generator):
                Xb, yb = (X, y) if idx is None else (X[idx.to(X.device)], y[idx.to(X.device)])
                leaf = w.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.model.loss(leaf, Xb, yb), leaf)
                w = w - self.local.lr * g
        return start - w

    def train(self, starts: torch.Tensor, clients: list[int], seeds: list[int]) -> torch.Tensor:
        """Δ for a batch of jobs: row j starts from ``starts[j]`` on ``clients[j]`` with ``seeds[j]``.

        In threads, the jobs start longest first (by samples processed), so that a long job at the end of a
        call does not leave the other threads idle: client sizes under a power law differ by tens of times.
        """
        if self.job_threads > 1 and len(clients) > 1:
            sizes = self._client_sizes()
            order = sorted(range(len(clients)), key=lambda j: -self.local.samples_for(sizes[clients[j]]))
            done = map_in_threads(self.job_threads, self.train_one, [starts[j] for j in order],
                                  [clients[j] for j in order], [seeds[j] for j in order])
            deltas: list[torch.Tensor] = [starts] * len(clients)
            for j, delta in zip(order, done, strict=True):
                deltas[j] = delta
            return torch.stack(deltas)
        return torch.stack([self.train_one(starts[j], clients[j], seeds[j]) for j in range(len(clients))])

    def _client_sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = [int(n) for n in self.data.client_sizes.tolist()]
        return self._sizes


class BatchedTrainer(ClientTrainer):
    """Runs many client jobs at once with ``torch.func.vmap`` over stacked per-job parameters.

    Every job draws the same minibatch indices as in ``ClientTrainer`` (same per-job generator). Every batch
    is padded to one width fixed for the run (the batch size, or the largest client for full-batch steps),
    padded samples carrying mask 0 in a masked mean loss, and jobs are grouped by their number of local steps
    (so no job computes steps it does not take). A job's computation therefore has the same shapes whichever
    jobs share its call, and its result is bit-identical whatever the engine's batch layout (a lone job is
    vmapped beside a copy of itself for the same reason). Against the one-by-one ``ClientTrainer`` the result
    differs only by floating-point summation order (the tests state the tolerance).
    """

    def __init__(self, model: FlatModel, data: FederatedData, local: LocalTraining) -> None:
        super().__init__(model, data, local)  # one thread: vmap already computes the jobs together
        from torch.func import grad, vmap

        self._full: dict[int, torch.Tensor] = {}
        largest = int(data.client_sizes.max())
        self.width = largest if local.batch_size is None else min(local.batch_size, largest)
        self._vgrad = vmap(grad(model.masked_loss), randomness="different" if model.has_dropout else "error")

    def _full_index(self, client: int) -> torch.Tensor:
        """All of a client's rows in the global data (cached: full-batch steps reuse it)."""
        idx = self._full.get(client)
        if idx is None:
            idx = self._full[client] = torch.arange(int(self.data.offsets[client]), int(self.data.offsets[client + 1]))
        return idx

    def train(self, starts: torch.Tensor, clients: list[int], seeds: list[int]) -> torch.Tensor:
        """Δ for a batch of jobs: row j starts from ``starts[j]`` on ``clients[j]`` with ``seeds[j]``."""
        offsets = self.data.offsets
        groups: dict[int, list[tuple[int, list[torch.Tensor]]]] = {}
        for j, (c, seed) in enumerate(zip(clients, seeds, strict=True)):
            base = int(offsets[c])
            batches = self.local.batches(int(offsets[c + 1]) - base, torch.Generator().manual_seed(seed))
            plan = [self._full_index(c) if idx is None else idx + base for idx in batches]
            groups.setdefault(len(plan), []).append((j, plan))
        deltas = torch.empty_like(starts)
        for n_steps, members in sorted(groups.items()):
            rows = torch.tensor([j for j, _ in members], device=starts.device)
            deltas[rows] = self._train_group(starts[rows], [p for _, p in members], n_steps, seeds[members[0][0]])
        return deltas

    def _train_group(self, starts: torch.Tensor, plans: list[list[torch.Tensor]], n_steps: int,
                     seed: int) -> torch.Tensor:
        n, width = len(plans), self.width
        if n == 1:  # vmap over one job may pick other kernels than over many: keep the shapes uniform
            return self._train_group(starts.repeat(2, 1), plans * 2, n_steps, seed)[:1]
        full_batch = self.local.batch_size is None  # every step sees the same samples: build and gather once
        steps_built = 1 if full_batch else n_steps
        flat = [idx for plan in plans for idx in plan[:steps_built]]  # job-major: (job, step)
        lengths = torch.tensor([len(idx) for idx in flat])
        padded = pad_sequence(flat, batch_first=True)
        index = F.pad(padded, (0, width - padded.shape[1])).view(n, steps_built, width)
        mask = (torch.arange(width) < lengths.unsqueeze(1)).to(starts.dtype).view(n, steps_built, width)
        device = self.data.X.device
        index, mask = index.to(device), mask.to(device)
        if self.model.has_dropout:
            torch.manual_seed(seed)  # dropout masks come from the global generator
        self.model.module.train()
        w, lr = starts, self.local.lr
        for s in range(n_steps):
            if s == 0 or not full_batch:
                idx = index[:, s]
                Xb, yb, mb = self.data.X[idx], self.data.y[idx], mask[:, s]
                step = self.model.linear_sgd_step(Xb, yb, mb, lr)
            w = step(w) if step is not None else w - lr * self._vgrad(w, Xb, yb, mb)
        return starts - w
