"""Readers for the datasets we ship or that users put under the data root."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import tarfile
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


# --- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format, optionally gzip-compressed) into a numpy array."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    shape = tuple(struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape} but holds {data.size} values")
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed if ``path`` ends in .gz); used by the tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)


def find_one(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` (or its .gz) that exists in ``folder``."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


# --- CIFAR-10 (python pickles) ---------------------------------------------------------------------------------

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def _cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.loads(blob, encoding="bytes")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise ValueError(f"{where}: not a CIFAR-10 python batch (no b'data'/b'labels')")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_cifar10(source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``: uint8 (N, 3, 32, 32) images, labels.

    Returns ``(X_train, y_train, X_test, y_test)`` (50,000 and 10,000 samples for the real files).
    """
    blobs: dict[str, bytes] = {}
    if source.is_dir():
        for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
            blobs[name] = (source / name).read_bytes()
    else:
        with tarfile.open(source, "r:*") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in (*CIFAR10_TRAIN, CIFAR10_TEST):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        blobs[base] = fh.read()
        missing = [n for n in (*CIFAR10_TRAIN, CIFAR10_TEST) if n not in blobs]
        if missing:
            raise DataFileError(f"{source}: archive lacks {', '.join(missing)} (expected cifar-10-python.tar.gz)")
    train = [_cifar_batch(blobs[n], f"{source}/{n}") for n in CIFAR10_TRAIN]
    X_test, y_test = _cifar_batch(blobs[CIFAR10_TEST], f"{source}/{CIFAR10_TEST}")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), X_test, y_test)


def write_cifar10_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one CIFAR-10 python batch (uint8 (N, 3, 32, 32) images); used by the tests."""
    blob = {b"batch_label": path.name.encode(), b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1),
            b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
    Path(path).write_bytes(pickle.dumps(blob, protocol=2))


# --- LEAF JSON ---------------------------------------------------------------------------------------------------

def read_leaf_dir(folder: Path) -> dict[str, tuple[list, list]]:
    """Merge every LEAF ``*.json`` file in ``folder`` ({"users", "num_samples", "user_data": {u: {"x", "y"}}}).

    Returns ``{user: (xs, ys)}`` in the files' user order (files sorted by name).
    """
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataFileError(f"no LEAF *.json files in {folder}")
    out: dict[str, tuple[list, list]] = {}
    for path in files:
        with open(path) as fh:
            blob = json.load(fh)
        try:
            users, user_data = blob["users"], blob["user_data"]
        except KeyError as exc:
            raise ValueError(f"{path}: not a LEAF JSON file (missing {exc})") from None
        for user in users:
            xs, ys = out.setdefault(str(user), ([], []))
            xs.extend(user_data[user]["x"])
            ys.extend(user_data[user]["y"])
    return out


def write_leaf_json(path: Path, user_data: dict[str, tuple[list, list]]) -> None:
    """Write one LEAF JSON file; used by the tests."""
    blob = {"users": list(user_data), "num_samples": [len(x) for x, _ in user_data.values()],
            "user_data": {u: {"x": list(x), "y": list(y)} for u, (x, y) in user_data.items()}}
    Path(path).write_text(json.dumps(blob))
