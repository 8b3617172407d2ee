"""Datasets, readers and partitioners: ``build_dataset(cfg)`` returns a FederatedData.

Owns the file readers (``readers``), the image and text datasets (``images``, ``text``), their checks, the
partitioning into clients (``partition``), the device-resident result (``federated``) and format-identical test
fixtures (``fixtures``). May import: ``qafel.errors`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qafel.data.checks import check_raw
from qafel.data.federated import FederatedData
from qafel.data.images import load_celeba, load_cifar10, load_fashion_mnist, load_synthetic_images, subsample
from qafel.data.partition import partition, partition_stats
from qafel.data.raw import RawData
from qafel.data.readers import load_digits_arrays, read_libsvm, require_file
from qafel.data.text import load_shakespeare
from qafel.errors import ConfigError, DataFileError

DATASET_NAMES = ("digits", "mushrooms", "fashion_mnist", "cifar10", "celeba", "shakespeare", "synthetic_images")

__all__ = ["DATASET_NAMES", "FederatedData", "RawData", "build_dataset", "load_raw"]


def load_raw(cfg: Mapping[str, Any], data_root: str | Path, seed: int) -> RawData:
    """The dataset named by ``cfg['name']`` as arrays, before the train/test split and the partition.

    Every reader's output is checked (labels, shapes, finite values, counts): a bad file raises a one-line
    DataFormatError naming it, a file that cannot be read a DataFileError.
    """
    try:
        return _load_raw(cfg, data_root, seed)
    except (DataFileError, OSError) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{exc.filename or data_root}: cannot read ({exc.strerror or exc})") from None


def _load_raw(cfg: Mapping[str, Any], data_root: str | Path, seed: int) -> RawData:
    name = cfg.get("name")
    if name == "digits":
        X, y = load_digits_arrays()
        return RawData(X.reshape(-1, 1, 8, 8) if cfg.get("as_images", False) else X, y, 10)
    if name == "mushrooms":
        path = require_file(Path(data_root) / str(cfg.get("file") or "mushrooms.libsvm"),
                            "download 'mushrooms' from the LIBSVM binary datasets page and put it there")
        X, labels = read_libsvm(path, num_features=112, classes=2)
        X = np.concatenate([X, np.ones((len(X), 1), dtype=np.float32)], axis=1)  # bias column: d = 113
        raw = RawData(X, (labels == labels.max()).astype(np.int64), 2)  # {1, 2} -> {0, 1}
        check_raw(raw, str(path))
        return raw
    if name == "fashion_mnist":
        return load_fashion_mnist(cfg, data_root)
    if name == "cifar10":
        return load_cifar10(cfg, data_root)
    if name == "celeba":
        return load_celeba(cfg, data_root, seed)
    if name == "shakespeare":
        return load_shakespeare(cfg, data_root, seed)
    if name == "synthetic_images":
        return load_synthetic_images(cfg, seed)
    raise ConfigError("dataset.name", name, f"must be one of {', '.join(DATASET_NAMES)}")


def build_dataset(cfg: Mapping[str, Any], data_root: str | Path, seed: int) -> FederatedData:
    """Load ``cfg['name']`` and split it across ``cfg['num_clients']`` clients with ``cfg['partition']``.

    Datasets with an official test split (Fashion-MNIST, CIFAR-10, LEAF's files) keep it; the others hold out
    a stratified ``test_fraction``. ``test_samples`` evaluates on a seeded subset of the test set.
    """
    raw = load_raw(cfg, data_root, seed)
    if raw.X_test is None or raw.y_test is None:
        X_train, y_train, X_test, y_test, groups = *_train_test_split(
            raw.X, raw.y, float(cfg.get("test_fraction") or 0.0), seed), None
    else:
        X_train, y_train, X_test, y_test, groups = raw.X, raw.y, raw.X_test, raw.y_test, raw.groups
    keep = subsample(len(y_test), cfg.get("test_samples"), seed)
    if len(keep) < len(y_test):
        X_test, y_test = X_test[keep], y_test[keep]
    if len(y_test) == 0:
        raise ConfigError("dataset.test_fraction", cfg.get("test_fraction"),
                          f"leaves {cfg.get('name')} without test samples")
    parts = partition(y_train, int(cfg.get("num_clients", 1)), cfg, seed, groups=groups)
    stats = partition_stats(parts, y_train)
    return FederatedData.from_partition(str(cfg.get("name")), torch.as_tensor(X_train), torch.as_tensor(y_train),
                                        parts, torch.as_tensor(X_test), torch.as_tensor(y_test), raw.num_classes,
                                        stats)


def _train_test_split(X: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Stratified seeded split; ``test_fraction == 0`` evaluates on the training set (the paper's LR runs)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError("dataset.test_fraction", test_fraction, "must be in [0, 1)")
    if test_fraction == 0.0:
        return X, y, X, y
    from sklearn.model_selection import train_test_split

    # scikit-learn takes seeds below 2^32; a larger one seeds a RandomState through a SeedSequence instead
    state = seed if seed < 2**32 else np.random.RandomState(np.random.SeedSequence(seed).generate_state(4))
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction, random_state=state, stratify=y)
    return X_tr, y_tr, X_te, y_te
