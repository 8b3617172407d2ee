"""Bad files, beside test_config's bad overrides: each stops with one line naming the file and the problem, the
documented exit code, and nothing already written lost or changed.

Data files are planted in format-identical fixtures (qafel.data.fixtures) and then damaged; every case runs
in-process, a representative subset also through ``python run.py``. Run directories and checkpoints are
damaged copies of one real run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, compose_cfg

import qafel.experiment.checkpoint
import qafel.experiment.tracking
from qafel.data import load_raw
from qafel.data.fixtures import (
    write_celeba_leaf,
    write_celeba_torchvision,
    write_cifar10,
    write_fashion_mnist,
    write_libsvm,
    write_shakespeare_leaf,
)
from qafel.data.readers import write_cifar10_batch, write_idx, write_leaf_json
from qafel.errors import EXIT_BAD_INPUT, EXIT_OUTPUT, EXIT_RUN_DIR, OutputError, QafelError
from qafel.experiment.checkpoint import load_checkpoint, save_checkpoint
from qafel.experiment.runner import run_experiment

TINY = ("tracking=none", "run.progress=false", "dataset.num_clients=10", "run.server_steps=20")


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256), to show that nothing was changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_py(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The stderr of a refused run: exactly one line, ``error: ...``."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


class Evil:
    """Unpickling this runs ``touch <marker>``: what a crafted file would do if it were fully unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------- data files
def _libsvm_lines(root: Path) -> tuple[Path, list[str]]:
    path = write_libsvm(root)
    return path, path.read_text().splitlines()


def stray_label(root):
    path, lines = _libsvm_lines(root)
    lines[7] = "3" + lines[7][1:]
    path.write_text("\n".join(lines) + "\n")
    return {"name": "mushrooms"}, f"{path}:8: label 3"


def libsvm_cut_mid_token(root):
    path = write_libsvm(root)
    text = path.read_text().rstrip()
    path.write_text(text[:text.rindex(":") + 1])  # "... 107:" : the last value is missing
    return {"name": "mushrooms"}, f"{path}:40: the file ends mid-line (no final newline): it looks truncated"


def libsvm_cut_between_tokens(root):
    path = write_libsvm(root)
    text = path.read_text().rstrip()
    path.write_text(text[:text.rindex(" ")])
    return {"name": "mushrooms"}, f"{path}:40: the file ends mid-line"


def feature_index_zero(root):
    path, lines = _libsvm_lines(root)
    lines[2] = lines[2].replace(" ", " 0:1 ", 1)
    path.write_text("\n".join(lines) + "\n")
    return {"name": "mushrooms"}, f"{path}:3: feature index 0 is outside 1..112"


def one_class(root):
    path, lines = _libsvm_lines(root)
    path.write_text("\n".join("1" + line[1:] for line in lines) + "\n")
    return {"name": "mushrooms"}, f"{path}: 1 distinct label(s)"


def nan_feature(root):
    path, lines = _libsvm_lines(root)
    lines[4] = lines[4].replace(":1", ":nan", 1)
    path.write_text("\n".join(lines) + "\n")
    return {"name": "mushrooms"}, f"{path}:5: feature"


def empty_libsvm(root):
    path = write_libsvm(root)
    path.write_text("")
    return {"name": "mushrooms"}, f"{path}: no samples"


def fmnist_test_shape(root):
    folder = write_fashion_mnist(root, n_train=20, n_test=10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((10, 30, 30), dtype=np.uint8))
    return {"name": "fashion_mnist"}, f"{folder / 't10k-images-idx3-ubyte.gz'}: test images are 30x30, the training " \
        "images 28x28"


def fmnist_label_range(root):
    folder = write_fashion_mnist(root, n_train=20, n_test=10)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(20, dtype=np.uint8) % 11)
    return {"name": "fashion_mnist"}, f"{folder / 'train-labels-idx1-ubyte.gz'}: label 10 at sample 10 is outside 0..9"


def fmnist_count_vs_header(root):
    folder = write_fashion_mnist(root, n_train=20, n_test=10, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return {"name": "fashion_mnist"}, f"{path}: IDX header says shape (20, 28, 28)"


def fmnist_label_count(root):
    folder = write_fashion_mnist(root, n_train=20, n_test=10)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(9, dtype=np.uint8))
    return {"name": "fashion_mnist"}, f"{folder / 't10k-labels-idx1-ubyte.gz'}: 9 labels for the 10 images"


def fmnist_corrupt_gzip(root):
    folder = write_fashion_mnist(root, n_train=20, n_test=10)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    return {"name": "fashion_mnist"}, f"{path}: corrupt or truncated gzip file"


def cifar_malicious(root):
    folder = write_cifar10(root, per_batch=4, n_test=6)
    marker = Path(root).parent / "MARKER"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2))
    return {"name": "cifar10"}, f"{folder / 'data_batch_1'}: refused: not a readable CIFAR-10 python batch " \
        "(refused to load posix.system"


def cifar_label_range(root):
    folder = write_cifar10(root, per_batch=4, n_test=6)
    write_cifar10_batch(folder / "test_batch", np.zeros((6, 3, 32, 32), dtype=np.uint8), np.array([0, 1, 2, 3, 4, 10]))
    return {"name": "cifar10"}, f"{folder / 'test_batch'}: label 10 at sample 5 is outside 0..9"


def cifar_wrong_shape(root):
    folder = write_cifar10(root, per_batch=4, n_test=6)
    blob = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(blob, protocol=2))
    return {"name": "cifar10"}, f"{folder / 'data_batch_2'}: data must be a uint8 array of shape (N, 3072)"


def cifar_truncated(root):
    folder = write_cifar10(root, per_batch=4, n_test=6)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    return {"name": "cifar10"}, f"{path}: refused: not a readable CIFAR-10 python batch"


def cifar_missing_batch(root):
    folder = write_cifar10(root, per_batch=4, n_test=6)
    (folder / "data_batch_4").unlink()
    return {"name": "cifar10"}, f"{folder}: lacks data_batch_4"


def leaf_bad_json(root):
    base = write_shakespeare_leaf(root, users=2, train=5, test=2)
    path = next((base / "train").glob("*.json"))
    path.write_text(path.read_text()[:-40])
    return {"name": "shakespeare", "source": "leaf"}, f"{path}: not valid JSON"


def leaf_xy_mismatch(root):
    base = write_shakespeare_leaf(root, users=2, train=5, test=2)
    path = next((base / "test").glob("*.json"))
    blob = json.loads(path.read_text())
    user = blob["users"][0]
    blob["user_data"][user]["y"].pop()
    path.write_text(json.dumps(blob))
    return {"name": "shakespeare", "source": "leaf"}, f"{path}: user '{user}' has 2 x but 1 y"


def celeba_label_range(root):
    base = write_celeba_leaf(root, users=4, per_user=6)
    path = base / "train" / "all_data_train.json"
    blob = json.loads(path.read_text())
    names, labels = blob["user_data"]["celeb0"]["x"], blob["user_data"]["celeb0"]["y"]
    write_leaf_json(path, {"celeb0": (names, [2, *labels[1:]]), **{u: (d["x"], d["y"]) for u, d in
                                                                     blob["user_data"].items() if u != "celeb0"}})
    return {"name": "celeba"}, f"{Path(root) / 'celeba'}: label 2 at sample 0 is outside 0..1"


def celeba_corrupt_image(root):
    base = write_celeba_leaf(root, users=4, per_user=6)
    path = base / "raw" / "img_align_celeba" / "000003.jpg"
    path.write_bytes(b"not a jpeg")
    return {"name": "celeba"}, f"{path}: cannot decode the image"


def celeba_bad_attribute_line(root):
    base = write_celeba_torchvision(root)
    path = base / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    return {"name": "celeba", "source": "torchvision"}, f"{path}:5: expected an image name and 4 values"


@dataclass(frozen=True)
class BadFile:
    plant: Callable[[Path], tuple[dict, str]]
    cli: bool = False  # also run through `python run.py`


BAD_FILES = {
    "libsvm-stray-label": BadFile(stray_label, cli=True),
    "libsvm-cut-mid-token": BadFile(libsvm_cut_mid_token),
    "libsvm-cut-between-tokens": BadFile(libsvm_cut_between_tokens),
    "libsvm-feature-index-0": BadFile(feature_index_zero),
    "libsvm-one-class": BadFile(one_class),
    "libsvm-nan-feature": BadFile(nan_feature),
    "libsvm-empty": BadFile(empty_libsvm),
    "idx-test-shape": BadFile(fmnist_test_shape, cli=True),
    "idx-label-range": BadFile(fmnist_label_range),
    "idx-count-vs-header": BadFile(fmnist_count_vs_header),
    "idx-label-count": BadFile(fmnist_label_count),
    "idx-corrupt-gzip": BadFile(fmnist_corrupt_gzip),
    "cifar-malicious-pickle": BadFile(cifar_malicious, cli=True),
    "cifar-label-range": BadFile(cifar_label_range),
    "cifar-wrong-shape": BadFile(cifar_wrong_shape),
    "cifar-truncated": BadFile(cifar_truncated),
    "cifar-missing-batch": BadFile(cifar_missing_batch),
    "leaf-bad-json": BadFile(leaf_bad_json),
    "leaf-x-y-mismatch": BadFile(leaf_xy_mismatch),
    "celeba-label-range": BadFile(celeba_label_range),
    "celeba-corrupt-image": BadFile(celeba_corrupt_image),
    "celeba-bad-attribute-line": BadFile(celeba_bad_attribute_line),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_data_file_stops_with_one_line_naming_it(tmp_path, name):
    root = tmp_path / "data"
    cfg, expected = BAD_FILES[name].plant(root)
    before = digest(root)
    with pytest.raises(QafelError) as info:
        load_raw(cfg, root, 0)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message and info.value.exit_code == EXIT_BAD_INPUT
    assert digest(root) == before
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow  # new Python processes: start-up dominates
@pytest.mark.parametrize("name", [n for n, case in BAD_FILES.items() if case.cli])
def test_bad_data_file_through_run_py(tmp_path, name):
    root = tmp_path / "data"
    cfg, expected = BAD_FILES[name].plant(root)
    before = digest(root)
    overrides = [f"dataset={cfg['name']}", *(f"dataset.{k}={v}" for k, v in cfg.items() if k != "name")]
    proc = run_py(f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_root={root}", *TINY, *overrides)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert one_error_line(proc.stderr).startswith(f"error: {expected}"), proc.stderr
    assert digest(root) == before
    assert not any((tmp_path / "run" / f).exists() for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt"))
    assert not (tmp_path / "MARKER").exists()


# ----------------------------------------------------------------------------------- run directories, checkpoints
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One completed tiny run (config.yaml, metrics.jsonl, summary.json, checkpoint.pt)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_py(f"hydra.run.dir={run_dir}", *TINY, "run.checkpoint_every=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def malicious_checkpoint(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps({"engine": Evil(run_dir.parent / "MARKER")}, protocol=2))
    return [f"resume={run_dir}"], f"{run_dir / 'checkpoint.pt'}: refused: it holds more than tensors, numbers, " \
        "strings, lists and dicts (it would load posix.system); nothing from it was run"


def truncated_checkpoint(run_dir):
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:2000])
    return [f"resume={run_dir}"], f"{path}: refused: corrupt or truncated checkpoint"


def edited_config(run_dir):
    path = run_dir / "config.yaml"
    path.write_text(path.read_text().replace("\n  lr: 0.1\n", "\n  lr: 0.3\n", 1))
    return [f"resume={run_dir}"], f"{run_dir / 'checkpoint.pt'}: refused: config.yaml differs from the config " \
        "saved in the checkpoint at client.lr (0.3 there, 0.1 in the checkpoint)"


def edited_config_new_key(run_dir):
    path = run_dir / "config.yaml"
    path.write_text(path.read_text().replace("\n  lr: 0.1\n", "\n  lr: 0.1\n  lrr: 2\n", 1))
    return [f"resume={run_dir}"], f"{run_dir / 'checkpoint.pt'}: refused: config.yaml differs from the config " \
        "saved in the checkpoint at client.lrr (2 there, None in the checkpoint)"


def extra_override(run_dir):
    return [f"resume={run_dir}", "seed=5", "run.progress=false"], f"resume={run_dir}: refused: seed=5"


def no_checkpoint(run_dir):
    (run_dir / "checkpoint.pt").unlink()
    return [f"resume={run_dir}"], f"resume={run_dir}: no checkpoint.pt in that directory"


def rerun_into_it(run_dir):
    return [f"hydra.run.dir={run_dir}", *TINY], f"{run_dir}: already holds a run (config.yaml, metrics.jsonl, " \
        f"summary.json, checkpoint.pt); continue it with resume={run_dir}"


RUN_DIR_CASES = {
    "malicious-checkpoint": malicious_checkpoint,
    "truncated-checkpoint": truncated_checkpoint,
    "config-edited-after-checkpoint": edited_config,
    "config-edited-with-an-unknown-key": edited_config_new_key,
    "resume-dir-with-overrides": extra_override,
    "resume-dir-without-checkpoint": no_checkpoint,
    "rerun-into-a-finished-run": rerun_into_it,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUN_DIR_CASES))
def test_run_directory_refusals_exit_4_and_change_nothing(tmp_path, finished_run, name):
    run_dir = _copy(finished_run, tmp_path)
    args, expected = RUN_DIR_CASES[name](run_dir)
    before = digest(run_dir)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'hydra'}")  # where Hydra puts its own files for resume=DIR
    proc = run_py(*args)
    assert proc.returncode == EXIT_RUN_DIR, proc.stderr[-3000:]
    assert one_error_line(proc.stderr).startswith(f"error: {expected}"), proc.stderr
    assert digest(run_dir) == before
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key, expected", [("paths.output_dir", "run/config.yaml: cannot write (Not a directory)"),
                                           ("hydra.run.dir", "run: cannot create the run directory")])
def test_output_directory_that_cannot_be_created_exits_5(tmp_path, key, expected):
    (tmp_path / "a_file").write_bytes(b"")
    args = [f"{key}={tmp_path / 'a_file' / 'run'}"]
    if key != "hydra.run.dir":
        args.append(f"hydra.run.dir={tmp_path / 'hydra'}")
    proc = run_py(*args, *TINY)
    assert proc.returncode == EXIT_OUTPUT, proc.stderr[-3000:]
    assert one_error_line(proc.stderr).startswith(f"error: {tmp_path / 'a_file'}/{expected}"), proc.stderr
    assert (tmp_path / "a_file").read_bytes() == b""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_exits_5(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        proc = run_py(f"hydra.run.dir={tmp_path / 'hydra'}", f"paths.output_dir={out}", *TINY)
    finally:
        out.chmod(0o700)
    assert proc.returncode == EXIT_OUTPUT, proc.stderr[-3000:]
    assert "cannot write" in one_error_line(proc.stderr)


def _full_after(real_open, path_end: str, good_writes: int):
    """``open`` whose files ending in ``path_end`` accept ``good_writes`` writes, then fail with ENOSPC."""
    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if not str(file).endswith(path_end) or "r" in mode:
            return fh
        left = [good_writes]
        real_write = fh.write

        def write(data):
            if left[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= 1
            return real_write(data)

        fh.write = write
        return fh
    return fake_open


def test_disk_full_while_logging_keeps_the_records_so_far(tmp_path, monkeypatch):
    monkeypatch.setattr(qafel.experiment.tracking, "open", _full_after(open, "metrics.jsonl", 3), raising=False)
    with pytest.raises(OutputError) as info:
        run_experiment(compose_cfg(*FAST, "run.server_steps=60", "run.eval_every=10", "run.checkpoint_every=20"),
                       tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'metrics.jsonl'}: cannot write (No space left on device)")
    assert "\n" not in message and info.value.exit_code == EXIT_OUTPUT
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["server_step"] for line in lines] == [0, 10, 20]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["engine"]["server_step"] == 20  # saved before step 30
    assert not (tmp_path / "summary.json").exists()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = compose_cfg(*FAST)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"server_step": 1, "x": np.arange(3).tolist()}, cfg)
    before = path.read_bytes()
    monkeypatch.setattr(qafel.experiment.checkpoint, "open", _full_after(open, "checkpoint.pt.tmp", 2), raising=False)
    with pytest.raises(OutputError) as info:
        save_checkpoint(path, {"server_step": 2, "x": list(range(100_000))}, cfg)
    assert str(info.value).startswith(f"{path}: cannot write the checkpoint ([Errno 28] No space left on device")
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before and not (tmp_path / "checkpoint.pt.tmp").exists()
