"""Datasets, readers and partitioners: ``build_dataset(cfg)`` returns a FederatedData."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qafel.data.federated import FederatedData
from qafel.data.partition import partition, partition_stats
from qafel.data.readers import load_digits_arrays, read_libsvm, require_file
from qafel.errors import ConfigError

DATASET_NAMES = ("digits", "mushrooms")

__all__ = ["DATASET_NAMES", "FederatedData", "build_dataset"]


def build_dataset(cfg: Mapping[str, Any], data_root: str | Path, seed: int) -> FederatedData:
    """Load ``cfg['name']`` and split it across ``cfg['num_clients']`` clients with ``cfg['partition']``."""
    name = cfg.get("name")
    if name == "digits":
        X, y = load_digits_arrays()
        X = X.reshape(-1, 1, 8, 8) if cfg.get("as_images", False) else X
        num_classes = 10
    elif name == "mushrooms":
        path = require_file(Path(data_root) / str(cfg.get("file", "mushrooms.libsvm")),
                            "download 'mushrooms' from the LIBSVM binary datasets page and put it there")
        X, labels = read_libsvm(path, num_features=112)
        X = np.concatenate([X, np.ones((len(X), 1), dtype=np.float32)], axis=1)  # bias column: d = 113
        y = (labels == labels.max()).astype(np.int64)  # {1, 2} -> {0, 1}
        num_classes = 2
    else:
        raise ConfigError("dataset.name", name, f"must be one of {', '.join(DATASET_NAMES)}")
    X_train, y_train, X_test, y_test = _train_test_split(X, y, float(cfg.get("test_fraction") or 0.0), seed)
    parts = partition(y_train, int(cfg.get("num_clients", 1)), cfg, seed)
    stats = partition_stats(parts, y_train)
    return FederatedData.from_partition(str(name), torch.as_tensor(X_train), torch.as_tensor(y_train), parts,
                                        torch.as_tensor(X_test), torch.as_tensor(y_test), num_classes, stats)


def _train_test_split(X: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Stratified seeded split; ``test_fraction == 0`` evaluates on the training set (the paper's LR runs)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError("dataset.test_fraction", test_fraction, "must be in [0, 1)")
    if test_fraction == 0.0:
        return X, y, X, y
    from sklearn.model_selection import train_test_split

    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)
    return X_tr, y_tr, X_te, y_te
