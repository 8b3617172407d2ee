"""Seeded partitions of a dataset's sample indices across clients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qafel.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "contiguous", "shards", "power_law", "natural")


def partition(labels: np.ndarray, num_clients: int, cfg: Mapping[str, Any], seed: int,
              groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` into ``num_clients`` non-empty, disjoint index arrays.

    ``cfg['partition']``: ``iid`` (random equal split), ``dirichlet`` (label skew with concentration
    ``cfg['alpha']``: smaller is more skewed), ``contiguous`` (file order, as the paper's mushrooms split),
    ``shards`` (sort by label, cut into ``cfg['shards_per_client']·num_clients`` shards, deal them out),
    ``power_law`` (FLSim's PowerLawSharder with ``cfg['alpha']`` in (0, 1]: skewed client sizes, the paper's
    CIFAR-10 split), ``natural`` (one client per user id in ``groups``; at most ``num_clients`` users, a seeded
    sample, whose samples are the only ones used).
    """
    n = len(labels)
    kind = cfg.get("partition", "iid")
    rng = np.random.default_rng(seed)
    if kind == "natural":
        return _natural(groups, num_clients, rng)
    if num_clients < 1 or num_clients > n:
        raise ConfigError("dataset.num_clients", num_clients, f"must be between 1 and the {n} training samples")
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if kind == "contiguous":
        return list(np.array_split(np.arange(n), num_clients))
    if kind == "dirichlet":
        alpha = cfg.get("alpha")
        if alpha is None or float(alpha) <= 0:
            raise ConfigError("dataset.alpha", alpha, "must be > 0 for partition=dirichlet")
        return _dirichlet(labels, num_clients, float(alpha), rng)
    if kind == "shards":
        per = int(cfg.get("shards_per_client") or 2)
        if per < 1 or per * num_clients > n:
            raise ConfigError("dataset.shards_per_client", per, "must be >= 1 with shards_per_client*num_clients <= n")
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, per * num_clients)
        deal = rng.permutation(per * num_clients).reshape(num_clients, per)
        return [np.sort(np.concatenate([shards[j] for j in row])) for row in deal]
    if kind == "power_law":
        alpha = cfg.get("alpha")
        if alpha is None or not 0.0 < float(alpha) <= 1.0:
            raise ConfigError("dataset.alpha", alpha, "must be in (0, 1] for partition=power_law")
        return _power_law(n, num_clients, float(alpha), rng)
    raise ConfigError("dataset.partition", kind, f"must be one of {', '.join(PARTITIONS)}")


def _power_law(n: int, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """FLSim's PowerLawSharder on a seeded shuffle of the samples.

    Client weights are drawn from the power distribution with exponent ``alpha`` (density alpha·x^(alpha-1) on
    [0, 1]: most weights near 0) and normalised. The first ``num_clients`` samples go one per client
    (round-robin), every later sample to a client drawn with those weights.
    """
    order = rng.permutation(n)
    weights = rng.power(alpha, num_clients)
    weights = weights / weights.sum()
    owner = np.empty(n, dtype=np.int64)
    owner[:num_clients] = np.arange(num_clients)
    owner[num_clients:] = rng.choice(num_clients, size=n - num_clients, p=weights)
    by_client = np.argsort(owner, kind="stable")
    cuts = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
    return [np.sort(order[idx]) for idx in np.split(by_client, cuts)]


def _natural(groups: np.ndarray | None, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One client per distinct user id (in sorted id order); a seeded sample of ``num_clients`` users if more."""
    if groups is None:
        raise ConfigError("dataset.partition", "natural", "needs a dataset with users (celeba, shakespeare)")
    if num_clients < 1:
        raise ConfigError("dataset.num_clients", num_clients, "must be an integer >= 1")
    users, inverse = np.unique(groups, return_inverse=True)
    by_user = np.argsort(inverse, kind="stable")
    parts = np.split(by_user, np.cumsum(np.bincount(inverse, minlength=len(users)))[:-1])
    if num_clients < len(users):
        keep = np.sort(rng.choice(len(users), size=num_clients, replace=False))
        parts = [parts[i] for i in keep]
    return [np.sort(p) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skew split: each class's samples are divided by proportions drawn from Dir(alpha).

    Clients left empty receive one sample from the largest client, so every client can train.
    """
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda j: len(parts[j]))
            parts[client].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_stats(parts: list[np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Clients, samples per client (min/median/max) and label skew (mean total-variation distance
    between each client's label distribution and the global one)."""
    sizes = np.array([len(p) for p in parts])
    idx = np.concatenate(parts)
    classes, codes = np.unique(labels[idx], return_inverse=True)
    owner = np.repeat(np.arange(len(parts)), sizes)
    counts = np.bincount(owner * len(classes) + codes, minlength=len(parts) * len(classes))
    counts = counts.reshape(len(parts), len(classes)).astype(np.float64)
    global_dist = counts.sum(0) / counts.sum()
    tv = 0.5 * np.abs(counts / np.maximum(sizes, 1)[:, None] - global_dist).sum(1)
    return {"clients": len(parts), "samples_min": int(sizes.min()), "samples_median": float(np.median(sizes)),
            "samples_max": int(sizes.max()), "label_skew_tv": float(np.mean(tv))}
