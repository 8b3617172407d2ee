"""Readers for the datasets we ship or that users put under the data root."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qafel.errors import DataFileError


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 samples, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def read_libsvm(path: Path, num_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a LIBSVM/SVMlight text file into a dense float32 matrix (1-based feature indices) and raw labels."""
    labels: list[float] = []
    rows: list[list[tuple[int, float]]] = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                labels.append(float(parts[0]))
                rows.append([(int(k), float(v)) for k, v in (p.split(":") for p in parts[1:])])
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: not LIBSVM format ({exc})") from exc
    width = num_features or max((k for r in rows for k, _ in r), default=0)
    X = np.zeros((len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        for k, v in r:
            X[i, k - 1] = v
    return X, np.asarray(labels)


def require_file(path: Path, how_to_get: str) -> Path:
    """Return ``path`` if it exists, else raise a one-line DataFileError saying where to put it."""
    if not path.is_file():
        raise DataFileError(f"data file not found: {path} ({how_to_get}; set paths.data_root or QAFEL_DATA_ROOT)")
    return path
