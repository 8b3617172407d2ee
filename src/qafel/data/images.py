"""Image datasets: Fashion-MNIST (IDX), CIFAR-10 (python pickles), CelebA (LEAF or torchvision layout), synthetic.

Every loader returns a :class:`RawData` with float32 images shaped (N, C, H, W), normalised as FLSim's examples
do, and int64 labels. Missing files raise a one-line DataFileError naming the expected paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qafel.data.checks import check_labels, check_raw
from qafel.data.raw import RawData
from qafel.data.readers import find_one, read_cifar10, read_idx, read_leaf_dir
from qafel.errors import ConfigError, DataFileError, DataFormatError

FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # FLSim's cifar10 example
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CELEBA_TV_FILES = ("img_align_celeba/", "list_attr_celeba.txt", "identity_CelebA.txt")
CELEBA_MIN_IMAGES = 5  # LEAF keeps celebrities with at least 5 images


def _resolve(data_root: str | Path, file: str | None) -> Path | None:
    """``dataset.file`` relative to the data root (absolute paths stay as they are)."""
    return None if not file else Path(data_root) / str(file)


def _check_shape(cfg: Mapping[str, Any], name: str, channels: int, size: int, classes: int) -> None:
    """A real dataset's shape is fixed: reject ``dataset.channels/image_size/num_classes`` that disagree."""
    for key, actual in (("channels", channels), ("image_size", size), ("num_classes", classes)):
        want = cfg.get(key)
        if want is not None and int(want) != actual:
            raise ConfigError(f"dataset.{key}", want, f"{name} has {key}={actual} (leave it null)")


# --- Fashion-MNIST -----------------------------------------------------------------------------------------------

def fashion_mnist_dirs(data_root: str | Path, file: str | None = None) -> list[Path]:
    """Folders searched for the four IDX files, in order (``dataset.file`` replaces the list)."""
    if file:
        return [_resolve(data_root, file)]  # type: ignore[list-item]
    root = Path(data_root)
    return [root / "fashion-mnist", root / "fashion_mnist", root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST]


def find_fashion_mnist(data_root: str | Path, file: str | None = None) -> dict[str, Path] | None:
    """The four Fashion-MNIST IDX files (plain or .gz) from the first folder holding all of them, else None."""
    for folder in fashion_mnist_dirs(data_root, file):
        found = {name: find_one(folder, (name,)) for name in FASHION_MNIST_FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def load_fashion_mnist(cfg: Mapping[str, Any], data_root: str | Path) -> RawData:
    """Fashion-MNIST: 60,000 training and 10,000 test images, 1x28x28, 10 classes."""
    found = find_fashion_mnist(data_root, cfg.get("file"))
    if found is None:
        where = " or ".join(str(d) for d in fashion_mnist_dirs(data_root, cfg.get("file")))
        raise DataFileError(f"Fashion-MNIST not found in {where}: put {', '.join(FASHION_MNIST_FILES)} (.gz or not) "
                            "there, or `apt-get install dataset-fashion-mnist` (Debian); set paths.data_root or "
                            "QAFEL_DATA_ROOT")
    arrays = {name: read_idx(path) for name, path in found.items()}
    check_idx_pairs(arrays, found, 10)

    def images(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)[:, None]

    X, y = images(arrays[FASHION_MNIST_FILES[0]]), arrays[FASHION_MNIST_FILES[1]].astype(np.int64)
    X_test, y_test = images(arrays[FASHION_MNIST_FILES[2]]), arrays[FASHION_MNIST_FILES[3]].astype(np.int64)
    _check_shape(cfg, "fashion_mnist", 1, X.shape[-1], 10)
    raw = RawData(X, y, 10, X_test, y_test)
    check_raw(raw, str(found[FASHION_MNIST_FILES[0]].parent))
    return raw


def check_idx_pairs(arrays: Mapping[str, np.ndarray], paths: Mapping[str, Path], num_classes: int) -> None:
    """The four IDX arrays agree: images (N, rows, cols), labels (N,) in range, train and test images alike."""
    names = FASHION_MNIST_FILES
    for images, labels in ((names[0], names[1]), (names[2], names[3])):
        x, y = arrays[images], arrays[labels]
        if x.ndim != 3:
            raise DataFormatError(f"{paths[images]}: images must be (count, rows, columns), not shaped {x.shape}")
        if y.ndim != 1:
            raise DataFormatError(f"{paths[labels]}: labels must be one number per image, not shaped {y.shape}")
        if len(x) != len(y):
            raise DataFormatError(f"{paths[labels]}: {len(y)} labels for the {len(x)} images of {paths[images]}")
        check_labels(y.astype(np.int64), num_classes, str(paths[labels]))
    if arrays[names[2]].shape[1:] != arrays[names[0]].shape[1:]:
        raise DataFormatError(f"{paths[names[2]]}: test images are {'x'.join(map(str, arrays[names[2]].shape[1:]))}, "
                              f"the training images {'x'.join(map(str, arrays[names[0]].shape[1:]))}")


# --- CIFAR-10 ----------------------------------------------------------------------------------------------------

def cifar10_candidates(data_root: str | Path, file: str | None = None) -> list[Path]:
    """Folders or archives searched for CIFAR-10, in order (``dataset.file`` replaces the list)."""
    if file:
        return [_resolve(data_root, file)]  # type: ignore[list-item]
    root = Path(data_root)
    return [root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py",
            root / "cifar-10-python.tar.gz", root / "cifar10" / "cifar-10-python.tar.gz"]


def normalize_cifar(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, 32, 32) -> float32 normalised with FLSim's CIFAR-10 mean and std."""
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[:, None, None]
    return (images.astype(np.float32) / 255.0 - mean) / std


def load_cifar10(cfg: Mapping[str, Any], data_root: str | Path) -> RawData:
    """CIFAR-10: 50,000 training and 10,000 test images, 3x32x32, 10 classes."""
    candidates = cifar10_candidates(data_root, cfg.get("file"))
    source = next((p for p in candidates if (p.is_dir() and (p / "data_batch_1").is_file()) or p.is_file()), None)
    if source is None:
        raise DataFileError(f"CIFAR-10 not found: put cifar-10-python.tar.gz or the extracted cifar-10-batches-py/ "
                            f"(data_batch_1..5, test_batch) at {candidates[0].parent} (looked for "
                            f"{', '.join(str(p) for p in candidates)}); set paths.data_root or QAFEL_DATA_ROOT")
    X, y, X_test, y_test = read_cifar10(source)
    _check_shape(cfg, "cifar10", 3, 32, 10)
    raw = RawData(normalize_cifar(X), y, 10, normalize_cifar(X_test), y_test)
    check_raw(raw, str(source))
    return raw


# --- CelebA ------------------------------------------------------------------------------------------------------

def load_image_files(paths: Sequence[Path], size: int, workers: int | None = None) -> np.ndarray:
    """Decode images as FLSim's CelebA example does (Resize(size) of the shorter side, CenterCrop(size)).

    Returns uint8 (N, 3, size, size). Decoding runs on a thread pool (PIL releases the GIL).
    """
    from PIL import Image

    def one(path: Path) -> np.ndarray:
        try:
            return decode(path)
        except FileNotFoundError:
            raise DataFileError(f"image not found: {path}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataFormatError(f"{path}: cannot decode the image ({exc})") from None

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            # torchvision's Resize(size) on PIL: shorter side -> size, the other truncated; bilinear, antialiased
            new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            img = img.resize(new, Image.BILINEAR)
            left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))  # CenterCrop
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    if not paths:
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, paths)))


def normalize_half(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (Normalize((0.5,)*3, (0.5,)*3), FLSim's CelebA example)."""
    return images.astype(np.float32) / 127.5 - 1.0


def celeba_leaf_layout(data_root: str | Path) -> tuple[Path, Path, Path] | None:
    """(train dir, test dir, image dir) of LEAF's CelebA layout under the data root, else None."""
    root = Path(data_root) / "celeba"
    for base in (root / "data", root):
        train, test = base / "train", base / "test"
        if any(train.glob("*.json")) and any(test.glob("*.json")):
            for images in (base / "raw" / "img_align_celeba", base / "img_align_celeba", root / "img_align_celeba"):
                if images.is_dir():
                    return train, test, images
    return None


def celeba_torchvision_layout(data_root: str | Path) -> Path | None:
    """The folder holding torchvision's CelebA files (img_align_celeba/, attributes, identities), else None."""
    base = Path(data_root) / "celeba"
    ok = (base / "img_align_celeba").is_dir() and (base / "list_attr_celeba.txt").is_file() \
        and (base / "identity_CelebA.txt").is_file()
    return base if ok else None


def read_celeba_metadata(base: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image names, celebrity ids and Smiling labels (0/1) from torchvision's ``list_attr_celeba.txt`` and
    ``identity_CelebA.txt``."""
    attr_path, id_path = base / "list_attr_celeba.txt", base / "identity_CelebA.txt"
    with open(attr_path) as fh:
        fh.readline()  # the image count
        header = fh.readline().split()
        if "Smiling" not in header:
            raise DataFormatError(f"{attr_path}: no Smiling attribute in the header")
        col = header.index("Smiling") + 1
        smiling = {}
        for line_no, line in enumerate(fh, 3):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(header) + 1 or parts[col] not in ("1", "-1"):
                raise DataFormatError(f"{attr_path}:{line_no}: expected an image name and {len(header)} values "
                                      "of 1 or -1")
            smiling[parts[0]] = int(parts[col] == "1")
    names, ids = [], []
    with open(id_path) as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.split()
            if parts and parts[0] in smiling:
                if len(parts) != 2 or not parts[1].isdigit():
                    raise DataFormatError(f"{id_path}:{line_no}: expected an image name and an integer identity")
                names.append(parts[0])
                ids.append(int(parts[1]))
    if not names:
        raise DataFormatError(f"{id_path}: no identity for any image of {attr_path.name}")
    return names, np.asarray(ids, dtype=np.int64), np.asarray([smiling[n] for n in names], dtype=np.int64)


def choose_users(users: Sequence[Any], cap: int | None, seed: int) -> list[Any]:
    """At most ``cap`` users, a seeded sample in their original order (all of them when ``cap`` is larger)."""
    users = list(users)
    if cap is None or cap >= len(users):
        return users
    keep = np.sort(np.random.default_rng([seed, 0xC11E]).choice(len(users), size=cap, replace=False))
    return [users[i] for i in keep]


def subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``k`` out of ``n`` (all when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0x7E57]).choice(n, size=int(k), replace=False))


def load_celeba(cfg: Mapping[str, Any], data_root: str | Path, seed: int) -> RawData:
    """CelebA smiling-or-not, one user per celebrity (LEAF), images resized to ``dataset.image_size`` (32).

    ``dataset.source``: ``leaf`` reads LEAF's train/test JSON (x = image file names, y = labels) and its image
    folder; ``torchvision`` builds LEAF's split from torchvision's layout (celebrities with >= 5 images, label =
    Smiling, a seeded ``test_fraction`` of the celebrities held out as test users); ``auto`` takes whichever
    is present, LEAF first. Under ``partition: natural`` only the ``num_clients`` training users kept are decoded.
    """
    size = int(cfg.get("image_size") or 32)
    _check_shape(cfg, "celeba", 3, size, 2)
    source = cfg.get("source") or "auto"
    if source not in ("auto", "leaf", "torchvision"):
        raise ConfigError("dataset.source", source, "must be one of auto, leaf, torchvision for celeba")
    cap = int(cfg["num_clients"]) if cfg.get("partition") == "natural" and cfg.get("num_clients") else None
    leaf = celeba_leaf_layout(data_root) if source in ("auto", "leaf") else None
    tv = celeba_torchvision_layout(data_root) if source in ("auto", "torchvision") and leaf is None else None
    if leaf is not None:
        train_dir, test_dir, image_dir = leaf
        train, test = read_leaf_dir(train_dir), read_leaf_dir(test_dir)
        users = choose_users(list(train), cap, seed)
        tr_names = [name for u in users for name in train[u][0]]
        tr_labels = _int_labels([v for u in users for v in train[u][1]], train_dir)
        groups = np.repeat(np.arange(len(users)), [len(train[u][0]) for u in users])
        te_names = [name for xs, _ in test.values() for name in xs]
        te_labels = _int_labels([v for _, ys in test.values() for v in ys], test_dir)
    elif tv is not None:
        image_dir = tv / "img_align_celeba"
        names, ids, smiling = read_celeba_metadata(tv)
        celebs, counts = np.unique(ids, return_counts=True)
        celebs = celebs[counts >= CELEBA_MIN_IMAGES]
        perm = np.random.default_rng([seed, 0xCE1E]).permutation(len(celebs))
        n_test = int(round(float(cfg.get("test_fraction") or 0.0) * len(celebs)))
        test_set = set(celebs[perm[:n_test]].tolist())
        train_users = choose_users(sorted(set(celebs.tolist()) - test_set), cap, seed)
        index = {c: i for i, c in enumerate(train_users)}
        tr = [j for j, c in enumerate(ids.tolist()) if c in index]
        te = [j for j, c in enumerate(ids.tolist()) if c in test_set]
        tr_names, tr_labels = [names[j] for j in tr], smiling[tr].tolist()
        groups = np.asarray([index[int(ids[j])] for j in tr], dtype=np.int64)
        te_names, te_labels = [names[j] for j in te], smiling[te].tolist()
    else:
        root = Path(data_root) / "celeba"
        raise DataFileError(f"CelebA not found under {root}: put LEAF's data/train/*.json, data/test/*.json and "
                            f"data/raw/img_align_celeba/ there, or torchvision's {', '.join(CELEBA_TV_FILES)}; "
                            "set paths.data_root or QAFEL_DATA_ROOT")
    keep = subsample(len(te_names), cfg.get("test_samples"), seed)
    te_names, te_labels = [te_names[i] for i in keep], [te_labels[i] for i in keep]
    missing = next((n for n in (*tr_names[:1], *te_names[:1]) if not (image_dir / n).is_file()), None)
    if missing is not None:
        raise DataFileError(f"CelebA image not found: {image_dir / missing} (put img_align_celeba/*.jpg there)")
    X = normalize_half(load_image_files([image_dir / n for n in tr_names], size))
    X_test = normalize_half(load_image_files([image_dir / n for n in te_names], size))
    raw = RawData(X, np.asarray(tr_labels, dtype=np.int64), 2, X_test, np.asarray(te_labels, dtype=np.int64),
                  groups=groups)
    check_raw(raw, str(Path(data_root) / "celeba"))
    return raw


def _int_labels(values: Sequence[Any], where: Path) -> list[int]:
    """LEAF's labels as integers (0/1 for CelebA; ``check_raw`` checks the range)."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | str) or not str(v).lstrip("-").isdigit():
            raise DataFormatError(f"{where}: label {v!r} is not an integer")
        out.append(int(v))
    return out


# --- synthetic ---------------------------------------------------------------------------------------------------

def load_synthetic_images(cfg: Mapping[str, Any], seed: int) -> RawData:
    """Seeded random images with the requested shape: ``dataset.channels`` x ``image_size`` x ``image_size``,
    ``num_classes`` classes, ``num_samples`` samples in all (split by ``test_fraction``).

    Each class has a low-frequency prototype (4x4 upsampled); a sample is 0.5·prototype + N(0, 1) noise, so
    models can learn something while every shape matches the paper's datasets.
    """
    def get(key: str, default: int) -> int:
        value = cfg.get(key)
        return default if value is None else int(value)

    channels, size, classes = get("channels", 3), get("image_size", 32), get("num_classes", 10)
    n = get("num_samples", 10_000)
    for key, value, low in (("channels", channels, 1), ("image_size", size, 4), ("num_classes", classes, 2),
                            ("num_samples", n, 2)):
        if value < low:
            raise ConfigError(f"dataset.{key}", value, f"must be an integer >= {low}")
    rng = np.random.default_rng([seed, 0x1A6E])
    coarse = rng.normal(size=(classes, channels, 4, 4)).astype(np.float32)
    rep = -(-size // 4)
    protos = np.kron(coarse, np.ones((1, 1, rep, rep), dtype=np.float32))[..., :size, :size]
    y = rng.integers(classes, size=n).astype(np.int64)
    X = rng.standard_normal(size=(n, channels, size, size), dtype=np.float32)
    half = 0.5 * protos
    for i in range(0, n, 4096):  # in place, in slices: one array of the data's size (CelebA-shaped: 2.4 GB)
        X[i:i + 4096] += half[y[i:i + 4096]]  # the same float32 sums as 0.5·prototype + noise
    return RawData(X, y, classes)
