"""Sanity checks on what a reader returns: a bad data file stops the run with one line naming it.

Every check raises DataFormatError with a message that starts with the file (or folder) and says what is wrong.
"""

from __future__ import annotations

import numpy as np

from qafel.data.raw import RawData
from qafel.errors import DataFormatError


def check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Integer labels, at least one, every one in [0, num_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise DataFormatError(f"{where}: no samples" if len(y) == 0 else f"{where}: labels are not one per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(f"{where}: labels are {y.dtype}, not integers")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFormatError(f"{where}: label {int(y[i])} at sample {i} is outside 0..{num_classes - 1} "
                              f"({int(bad.sum())} such labels)")


def check_finite(X: np.ndarray, where: str) -> None:
    """No NaN or infinite feature (integer arrays, e.g. token ids, pass)."""
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.floating) or len(X) == 0:
        return
    with np.errstate(all="ignore"):  # a sum in float64 is finite exactly when no entry is NaN or infinite
        finite = np.isfinite(np.sum(X, dtype=np.float64))
    if not finite:
        i = int(np.argmax(~np.isfinite(X.reshape(len(X), -1)).all(axis=1)))
        raise DataFormatError(f"{where}: sample {i} has a NaN or infinite feature")


def check_pair(X: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """One label per sample, labels in range, finite features."""
    if len(X) != len(y):
        raise DataFormatError(f"{where}: {len(X)} samples but {len(y)} labels")
    check_labels(y, num_classes, where)
    check_finite(X, where)


def check_raw(raw: RawData, where: str) -> None:
    """A loaded dataset: non-empty, labels in range, finite features, train and test samples of one shape,
    one group per training sample, and at least two classes among the training labels."""
    check_pair(raw.X, raw.y, raw.num_classes, where)
    classes = np.unique(raw.y)
    if len(classes) < 2:
        raise DataFormatError(f"{where}: every training sample has label {int(classes[0])}: a classifier needs "
                              "at least two classes")
    if raw.X_test is not None and raw.y_test is not None and len(raw.y_test):  # none: build_dataset says so
        check_pair(raw.X_test, raw.y_test, raw.num_classes, f"{where} (test set)")
        if raw.X_test.shape[1:] != raw.X.shape[1:]:
            raise DataFormatError(f"{where}: test samples are shaped {raw.X_test.shape[1:]}, training samples "
                                  f"{raw.X.shape[1:]}")
    if raw.groups is not None and len(raw.groups) != len(raw.y):
        raise DataFormatError(f"{where}: {len(raw.groups)} user ids for {len(raw.y)} samples")
