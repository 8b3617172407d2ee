"""``RawData``: what a dataset loader returns before the federated split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RawData:
    """Training and (optionally) test arrays, with a user id per training sample for natural partitions.

    ``X_test is None`` means the dataset has no official test split: ``build_dataset`` carves one out with
    ``dataset.test_fraction``. ``groups`` (one id per training sample) is set for datasets with real users
    (CelebA celebrities, Shakespeare roles) and drives ``partition: natural``.
    """

    X: np.ndarray
    y: np.ndarray
    num_classes: int
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    groups: np.ndarray | None = None
