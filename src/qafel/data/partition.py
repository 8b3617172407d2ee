"""Seeded partitions of a dataset's sample indices across clients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qafel.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "contiguous", "shards")


def partition(labels: np.ndarray, num_clients: int, cfg: Mapping[str, Any], seed: int) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` into ``num_clients`` non-empty, disjoint index arrays.

    ``cfg['partition']``: ``iid`` (random equal split), ``dirichlet`` (label skew with concentration
    ``cfg['alpha']``: smaller is more skewed), ``contiguous`` (file order, as the paper's mushrooms split),
    ``shards`` (sort by label, cut into ``cfg['shards_per_client']·num_clients`` shards, deal them out).
    """
    n = len(labels)
    kind = cfg.get("partition", "iid")
    if num_clients < 1 or num_clients > n:
        raise ConfigError("dataset.num_clients", num_clients, f"must be between 1 and the {n} training samples")
    rng = np.random.default_rng(seed)
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
    raise ConfigError("dataset.partition", kind, f"must be one of {', '.join(PARTITIONS)}")


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
    classes = np.unique(labels)
    global_dist = np.array([(labels == c).mean() for c in classes])
    tv = [0.5 * np.abs(np.array([(labels[p] == c).mean() for c in classes]) - global_dist).sum() for p in parts]
    return {"clients": len(parts), "samples_min": int(sizes.min()), "samples_median": float(np.median(sizes)),
            "samples_max": int(sizes.max()), "label_skew_tv": float(np.mean(tv))}
