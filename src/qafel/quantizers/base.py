"""Quantizers with real wire payloads and a matching fast simulated path (ALGORITHMS.md section 5).

Every quantizer works on a flat float32 vector of length ``d`` whose layout (tensor names and shapes, in flat
order) is known to both ends. ``encode`` builds the real payload and ``decode`` turns it back into a float32
CPU vector; ``quantize`` is the fast path the engine uses: it returns ``decode(encode(v, g))`` bit for bit,
on ``v``'s device, together with ``len(encode(v, g))``, without building the bytes, and it consumes the
generator exactly as ``encode`` does.

Bit-exactness across devices and batch sizes rests on three rules followed throughout:

* reductions whose result depends on the summation order (norms, means) are computed by a fixed pairwise
  halving tree (:func:`_tree_sum`), built only from elementwise IEEE operations, so a row gives the same bits
  alone or inside a batch, on the CPU or on a GPU;
* the dequantized value is computed from what travels on the wire (levels, norms, scales) by the same
  elementwise float32 operations in ``quantize`` and in ``decode``; no division by a Python scalar is used
  there (CUDA turns ``x / c`` into ``x * (1/c)``, the CPU does not);
* randomness is drawn with one call over the whole vector on the generator's own device, then moved.

Byte order: scalars and values are little-endian; bit streams are packed most significant bit first
(``numpy.packbits`` with ``bitorder='big'``) and padded with zero bits to a whole byte.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Layout = Sequence[tuple[str, tuple[int, ...]]]

QUANTIZER_NAMES: tuple[str, ...] = ("identity", "qsgd", "minmax", "topk", "randk", "sign", "fp16", "bf16")
BUCKETS: tuple[str, ...] = ("vector", "tensor", "fixed")
CODINGS: tuple[str, ...] = ("fixed", "elias_gamma")

_QSGD_MAX_BITS = 16
_QSGD_MAX_LEVELS = 2 ** (_QSGD_MAX_BITS - 1) - 1
_MINMAX_MAX_BITS = 16
_ZERO_NORM = 1e-10


# ----------------------------------------------------------------------------------------------------------
# numeric and bit-packing helpers


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension by pairwise halving after zero-padding to a power of two.

    The order of additions depends only on the length of the last dimension, so the result is the same bit for
    bit for every row of a batch and on every device (each step is an elementwise IEEE addition).
    """
    n = x.shape[-1]
    p = 1 << max(n - 1, 0).bit_length()
    if p != n:
        x = F.pad(x, (0, p - n))
    while p > 1:
        p //= 2
        x = x[..., :p] + x[..., p:]
    return x[..., 0]


def _tree_sum_numpy(x: np.ndarray) -> np.ndarray:
    """``_tree_sum`` in NumPy (the same pairwise additions, so the same bits)."""
    n = x.shape[-1]
    p = 1 << max(n - 1, 0).bit_length()
    if p != n:
        padded = np.zeros((*x.shape[:-1], p), dtype=x.dtype)
        padded[..., :n] = x
        x = padded
    while p > 1:
        p //= 2
        x = x[..., :p] + x[..., p:]
    return x[..., 0]


#: Up to this many elements a quantizer's arithmetic on the CPU runs in NumPy (bit-identical; each torch call
#: costs several microseconds more, which dominates for the paper's 113-parameter logistic regression).
_NUMPY_MAX_ELEMENTS = 1 << 16

_CONSTS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _const(value: float, device: torch.device) -> torch.Tensor:
    """A cached 0-dim float32 tensor on ``device`` (dividing by it is a true division on every device)."""
    key = (value, torch.device(device))
    if key not in _CONSTS:
        _CONSTS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return _CONSTS[key]


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` uniforms in [0, 1) drawn in one call on the generator's device, then moved to ``device``."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _pack_uint(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers, ``width`` bits each, most significant bit first, into one byte string."""
    values = np.asarray(values, dtype=np.int64)
    bits = np.empty((values.size, width), dtype=np.uint8)
    for j in range(width):
        bits[:, j] = (values >> (width - 1 - j)) & 1
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_uint(buf: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_pack_uint`: ``count`` integers of ``width`` bits (int64)."""
    if len(buf) != math.ceil(count * width / 8):
        raise ValueError(f"bit stream has {len(buf)} bytes, expected {math.ceil(count * width / 8)}")
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    out = np.zeros(count, dtype=np.int64)
    for j in range(width):
        out = (out << 1) | bits[:, j]
    return out


def _floor_log2(n: np.ndarray) -> np.ndarray:
    """floor(log2 n) for integers n >= 1 (exact, via frexp)."""
    return np.frexp(n.astype(np.float64))[1].astype(np.int64) - 1


def _elias_gamma_encode(signed: np.ndarray) -> bytes:
    """Elias-gamma code of |l| + 1, then a sign bit (1 = negative) when l != 0, for each signed level l.

    A level 0 is the single bit ``1``; a level l != 0 with n = |l| + 1 and N = floor(log2 n) takes 2N + 2
    bits: N zeros, the N + 1 binary digits of n, the sign bit. Codes are concatenated in coordinate order and
    the stream is padded with zero bits to a whole byte.
    """
    signed = np.asarray(signed, dtype=np.int64)
    mag = np.abs(signed)
    n = mag + 1
    nonzero = mag > 0
    code = np.where(nonzero, (n << 1) | (signed < 0), 1)
    length = np.where(nonzero, 2 * _floor_log2(n) + 2, 1)
    starts = np.cumsum(length) - length
    bits = np.zeros(int(length.sum()), dtype=np.uint8)
    for j in range(int(length.max(initial=0))):
        sel = length > j
        bits[starts[sel] + j] = (code[sel] >> (length[sel] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def _elias_gamma_decode(buf: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`_elias_gamma_encode` for ``count`` levels (int64), vectorised with numpy.

    Each bit position p gets the position where a code starting at p would end; the start of the k-th code is
    then found by pointer doubling, so no Python loop runs over the coordinates.
    """
    if count == 0:
        if buf:
            raise ValueError("Elias-gamma stream has trailing bytes")
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))
    size = bits.size
    ones = np.flatnonzero(bits)
    if ones.size == 0:
        raise ValueError("Elias-gamma stream holds no code")
    pos = np.arange(size)
    nxt_one = np.searchsorted(ones, pos)
    zeros = np.where(nxt_one < ones.size, ones[np.minimum(nxt_one, ones.size - 1)] - pos, size)
    length = 2 * zeros + 1 + (zeros > 0)
    jump = np.append(np.minimum(pos + length, size), size)  # position `size` is a sink
    starts = np.zeros(1, dtype=np.int64)
    while starts.size < count:  # starts holds the first m starts and jump is next^m
        starts = np.concatenate([starts, jump[starts]])
        jump = jump[jump]
    starts = starts[:count]
    if starts[-1] >= size:
        raise ValueError("Elias-gamma stream is truncated")
    nz = zeros[starts]
    end = int(starts[-1] + length[starts[-1]])
    if end > size or math.ceil(end / 8) != len(buf):
        raise ValueError("Elias-gamma stream is truncated or has trailing bytes")
    n = np.zeros(count, dtype=np.int64)
    for j in range(int(nz.max()) + 1):
        sel = nz >= j
        n[sel] = (n[sel] << 1) | bits[starts[sel] + nz[sel] + j]
    mag = n - 1
    neg = np.zeros(count, dtype=bool)
    has_sign = nz > 0
    neg[has_sign] = bits[starts[has_sign] + 2 * nz[has_sign] + 1] == 1
    return np.where(neg, -mag, mag)


def _f32_bytes(x: torch.Tensor) -> bytes:
    """A float32 tensor's values as little-endian fp32 bytes."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def _f32_from(buf: bytes, count: int, offset: int = 0) -> torch.Tensor:
    """``count`` little-endian fp32 values from ``buf`` at ``offset`` as a CPU float32 tensor."""
    arr = np.frombuffer(buf, dtype="<f4", count=count, offset=offset).astype(np.float32)
    return torch.from_numpy(arr)


def _normalize_layout(layout: Layout) -> list[tuple[str, tuple[int, ...]]]:
    """Check a layout and return it as a list of (name, shape-tuple)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for item in layout:
        name, shape = item
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) < 1:
            raise ValueError(f"layout tensor {name!r} has shape {shape}: every tensor needs at least one element")
        out.append((str(name), shape))
    if not out:
        raise ValueError("layout is empty")
    return out


class _Buckets:
    """Partition of the flat vector into buckets (whole vector, each tensor, or fixed-size chunks)."""

    def __init__(self, layout: list[tuple[str, tuple[int, ...]]], mode: str, size: int | None) -> None:
        numels = [math.prod(shape) for _, shape in layout]
        self.d = sum(numels)
        self.mode = mode
        if mode == "vector":
            self.sizes = [self.d]
        elif mode == "tensor":
            self.sizes = numels
        else:
            assert size is not None
            self.size = size
            nb = math.ceil(self.d / size)
            self.sizes = [size] * (nb - 1) + [self.d - size * (nb - 1)]
        self.n = len(self.sizes)
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self._index = torch.from_numpy(np.repeat(np.arange(self.n), self.sizes))
        self._counts = torch.tensor(self.sizes, dtype=torch.float32)
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _on(self, what: str, device: torch.device) -> torch.Tensor:
        key = (what, device)
        if key not in self._cache:
            self._cache[key] = (self._index if what == "index" else self._counts).to(device)
        return self._cache[key]

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """Per-bucket tree sums of the rows of ``x`` (N, d) -> (N, num_buckets)."""
        if self.mode == "vector":
            return _tree_sum(x)[:, None]
        if self.mode == "fixed":
            pad = self.n * self.size - self.d
            if pad:
                x = F.pad(x, (0, pad))
            return _tree_sum(x.reshape(x.shape[0], self.n, self.size))
        b = self.bounds
        return torch.stack([_tree_sum(x[:, b[i]:b[i + 1]]) for i in range(self.n)], dim=1)

    def sums_numpy(self, x: np.ndarray) -> np.ndarray:
        """``sums`` in NumPy: the same additions in the same order (``_tree_sum_numpy``)."""
        if self.mode == "vector":
            return _tree_sum_numpy(x)[:, None]
        if self.mode == "fixed":
            pad = self.n * self.size - self.d
            if pad:
                padded = np.zeros((x.shape[0], self.d + pad), dtype=x.dtype)
                padded[:, :self.d] = x
                x = padded
            return _tree_sum_numpy(x.reshape(x.shape[0], self.n, self.size))
        b = self.bounds
        return np.stack([_tree_sum_numpy(x[:, b[i]:b[i + 1]]) for i in range(self.n)], axis=1)

    def expand_numpy(self, per_bucket: np.ndarray) -> np.ndarray:
        """``expand`` in NumPy."""
        if self.mode == "vector":
            return per_bucket
        return per_bucket[:, self._index.numpy()]

    def counts(self, device: torch.device) -> torch.Tensor:
        """Bucket sizes as a float32 tensor on ``device``."""
        return self._on("counts", device)

    def expand(self, per_bucket: torch.Tensor) -> torch.Tensor:
        """(N, num_buckets) -> a tensor broadcastable to (N, d) holding each coordinate's bucket value."""
        if self.mode == "vector":
            return per_bucket
        return per_bucket.index_select(1, self._on("index", per_bucket.device))


# ----------------------------------------------------------------------------------------------------------
# the interface


class Quantizer(ABC):
    """A compressor of flat float32 vectors with a real payload (``encode``/``decode``) and a fast path.

    Attributes: ``name``, ``d`` (vector length), ``layout`` (list of (tensor name, shape)), ``is_identity``,
    ``deterministic`` (no randomness used; the generator may be None).
    """

    name: str = ""
    is_identity: bool = False
    deterministic: bool = True

    def __init__(self, layout: Layout) -> None:
        self.layout = _normalize_layout(layout)
        self.d = sum(math.prod(shape) for _, shape in self.layout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d})"

    # -- checks
    def _check_vec(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() != self.d or v.dtype != torch.float32:
            got = (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{self.name}: expected a 1-D float32 tensor of length {self.d}, got {got}")
        return v.detach()

    def _check_batch(self, V: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.d or V.dtype != torch.float32:
            got = (tuple(V.shape), V.dtype) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"{self.name}: expected a (N, {self.d}) float32 tensor, got {got}")
        if len(generators) != V.shape[0]:
            raise ValueError(f"{self.name}: {V.shape[0]} rows but {len(generators)} generators")
        return V.detach()

    # -- API
    @abstractmethod
    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """The wire payload of ``v`` (1-D float32 of length d, on any device)."""

    @abstractmethod
    def decode(self, payload: bytes) -> torch.Tensor:
        """The float32 CPU vector of length d that ``payload`` carries."""

    @abstractmethod
    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(decode(encode(v, g)) on v's device, len(encode(v, g)))`` bit for bit, without building bytes."""

    def quantize_batch(
        self, V: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Quantize each row of ``V`` (N, d) with its own generator; equals row-wise ``quantize`` bit for bit."""
        V = self._check_batch(V, generators)
        rows: list[torch.Tensor] = []
        sizes: list[int] = []
        for i, g in enumerate(generators):
            q, n = self.quantize(V[i], g)
            rows.append(q)
            sizes.append(n)
        if not rows:
            return V.new_zeros((0, self.d)), []
        return torch.stack(rows), sizes

    def fp32_bytes(self) -> int:
        """Bytes of the uncompressed fp32 vector: 4*d."""
        return 4 * self.d

    def payload_bytes(self) -> int | None:
        """The payload size when it does not depend on the vector, else None."""
        return None

    def _check_len(self, payload: bytes) -> None:
        n = self.payload_bytes()
        if n is not None and len(payload) != n:
            raise ValueError(f"{self.name}: payload has {len(payload)} bytes, expected {n}")
