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
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qafel.errors import ConfigError

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


class IdentityQuantizer(Quantizer):
    """No compression: the payload is v as little-endian fp32 (4*d bytes); ``quantize`` returns v itself."""

    name = "identity"
    is_identity = True

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """v as little-endian fp32 bytes."""
        return _f32_bytes(self._check_vec(v))

    def decode(self, payload: bytes) -> torch.Tensor:
        """The fp32 values of the payload."""
        self._check_len(payload)
        return _f32_from(payload, self.d)

    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(v, 4*d)``: the very tensor passed in."""
        self._check_vec(v)
        return v, 4 * self.d

    def quantize_batch(
        self, V: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """``(V, [4*d] * N)``."""
        self._check_batch(V, generators)
        return V, [4 * self.d] * V.shape[0]

    def payload_bytes(self) -> int:
        """4*d."""
        return 4 * self.d


class QSGDQuantizer(Quantizer):
    """QSGD (Alistarh et al. 2017) with ``levels`` s, stochastic rounding, per-bucket l2 norms.

    Per bucket b with norm ||v_b|| (a pairwise tree sum of squares, then sqrt): r_i = s|v_i|/||v_b||,
    l_i = floor(r_i) + [u_i < r_i - floor(r_i)] with u = torch.rand(d, generator) drawn in one call (levels are
    clamped to s against rounding); a bucket with norm < 1e-10 gets norm 0 and all levels 0. The value is
    Q_i = T[l_i + s] * ||v_b|| where T[j] = float32((j - s) / s), i.e. sign(v_i)*||v_b||*l_i/s.

    Wire: the num_buckets fp32 norms (4 bytes each, bucket order), then one bit stream over all coordinates.
    ``coding='fixed'``: each signed level as the unsigned l + s in w = ceil(log2(2s+1)) bits, so
    nbytes = 4*num_buckets + ceil(d*w/8). ``coding='elias_gamma'``: per coordinate the Elias-gamma code of
    |l| + 1 followed by a sign bit (1 = negative) when l != 0 (see :func:`_elias_gamma_encode`), padded to a
    whole byte; nbytes = 4*num_buckets + ceil(sum_i (2*floor(log2(|l_i|+1)) + 1 + [l_i != 0]) / 8).
    """

    name = "qsgd"
    deterministic = False

    def __init__(self, layout: Layout, levels: int, bucket: str = "vector", bucket_size: int | None = None,
                 coding: str = "fixed") -> None:
        super().__init__(layout)
        self.s = int(levels)
        self.bucket = bucket
        self.coding = coding
        self.width = (2 * self.s).bit_length()  # = ceil(log2(2s + 1))
        self._buckets = _Buckets(self.layout, bucket, bucket_size)
        self.num_buckets = self._buckets.n
        table = (np.arange(2 * self.s + 1, dtype=np.float64) - self.s) / self.s
        self._table = torch.from_numpy(table.astype(np.float32))
        self._tables: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"QSGDQuantizer(d={self.d}, levels={self.s}, bucket={self.bucket!r}, coding={self.coding!r})"

    def _table_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self._table.to(device)
        return self._tables[device]

    def _levels(self, V: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms (N, nb) with tiny norms set to 0, unsigned levels l + s (N, d) as int64)."""
        if V.device.type == "cpu" and V.numel() <= _NUMPY_MAX_ELEMENTS:
            norms_np, u_np = self._levels_numpy(V.numpy(), U.numpy())
            return torch.from_numpy(norms_np), torch.from_numpy(u_np)
        s = self.s
        norms = self._buckets.sums(V * V).sqrt()
        small = norms < _ZERO_NORM
        norms = torch.where(small, torch.zeros_like(norms), norms)
        safe = torch.where(small, torch.full_like(norms, math.inf), norms)  # r = 0 -> level 0 in tiny buckets
        r = (V.abs() * s) / self._buckets.expand(safe)
        low = r.floor()
        lvl = (low + (r - low > U).to(V.dtype)).clamp_(max=s)  # Bernoulli(r - floor r) from one uniform
        u = torch.where(V < 0, s - lvl, s + lvl).to(torch.int64)
        return norms, u

    def _levels_numpy(self, V: np.ndarray, U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_levels`` in NumPy, operation for operation (the same float32 IEEE operations in the same order, so
        the same bits): for small CPU vectors, where each torch call's overhead is several times numpy's."""
        s = self.s
        norms = torch.from_numpy(self._buckets.sums_numpy(V * V)).sqrt().numpy()  # torch's float32 sqrt on the
        # CPU is not always numpy's (1 ulp apart in about 1 of 3 values seen): take torch's, as the torch path does
        small = norms < np.float32(_ZERO_NORM)
        norms[small] = 0
        safe = np.where(small, np.float32(np.inf), norms)
        r = (np.abs(V) * np.float32(s)) / self._buckets.expand_numpy(safe)
        low = np.floor(r)
        lvl = np.minimum(low + (r - low > U).astype(np.float32), np.float32(s))
        u = np.where(V < 0, np.float32(s) - lvl, np.float32(s) + lvl).astype(np.int64)
        return norms, u

    def _value(self, norms: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if u.device.type == "cpu" and u.numel() <= _NUMPY_MAX_ELEMENTS:
            table = self._table.numpy()
            return torch.from_numpy(table[u.numpy()] * self._buckets.expand_numpy(norms.numpy()))
        return self._table_on(u.device)[u] * self._buckets.expand(norms)

    def _nbytes(self, u: torch.Tensor) -> list[int]:
        if self.coding == "fixed":
            return [self.payload_bytes()] * u.shape[0]  # type: ignore[list-item]
        mag = (u - self.s).abs()
        exp = torch.frexp((mag + 1).to(torch.float64)).exponent.to(torch.int64)  # floor(log2(n)) + 1
        bits = torch.where(mag > 0, 2 * exp, torch.ones_like(exp)).sum(dim=1)
        return [4 * self.num_buckets + (b + 7) // 8 for b in bits.tolist()]

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """Norms as fp32, then the levels (fixed width or Elias-gamma); see the class docstring."""
        v = self._check_vec(v)
        norms, u = self._levels(v[None], _uniform(self.d, generator, v.device)[None])
        head = norms[0].cpu().numpy().astype("<f4").tobytes()
        u_np = u[0].cpu().numpy()
        if self.coding == "fixed":
            return head + _pack_uint(u_np, self.width)
        return head + _elias_gamma_encode(u_np - self.s)

    def decode(self, payload: bytes) -> torch.Tensor:
        """Rebuild Q(v) from the norms and levels."""
        nb = self.num_buckets
        if len(payload) < 4 * nb:
            raise ValueError(f"qsgd: payload has {len(payload)} bytes, fewer than the {4 * nb} bytes of norms")
        norms = _f32_from(payload, nb)[None]
        body = payload[4 * nb:]
        if self.coding == "fixed":
            u = _unpack_uint(body, self.d, self.width)
        else:
            u = _elias_gamma_decode(body, self.d) + self.s
        if u.size and (u.min() < 0 or u.max() > 2 * self.s):
            raise ValueError("qsgd: a level in the payload is out of range")
        return self._value(norms, torch.from_numpy(u)[None])[0]

    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Q(v) on v's device and the payload size."""
        v = self._check_vec(v)
        norms, u = self._levels(v[None], _uniform(self.d, generator, v.device)[None])
        return self._value(norms, u)[0], self._nbytes(u)[0]

    def quantize_batch(
        self, V: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Vectorised over rows (one uniform draw per row from its generator)."""
        V = self._check_batch(V, generators)
        if V.shape[0] == 0:
            return V.new_zeros((0, self.d)), []
        U = torch.stack([_uniform(self.d, g, V.device) for g in generators])
        norms, u = self._levels(V, U)
        return self._value(norms, u), self._nbytes(u)

    def payload_bytes(self) -> int | None:
        """4*num_buckets + ceil(d*w/8) for fixed-width coding; None for Elias-gamma."""
        if self.coding == "fixed":
            return 4 * self.num_buckets + math.ceil(self.d * self.width / 8)
        return None


class MinMaxQuantizer(Quantizer):
    """FLSim's per-tensor affine scalar quantization ("n-bit QSGD" in the paper's neural-network tables).

    For each quantized tensor t (with ``weights_only``, only tensors with ndim > 1; others travel as fp32),
    following torch's MinMaxObserver / per-tensor affine convention (the range is widened to contain 0, so
    that 0 is exactly representable): lo = min(min t, 0), hi = max(max t, 0), scale = max((hi - lo)/(2^b - 1),
    float32 eps) in float32, zero_point = clamp(-round(lo/scale), 0, 2^b - 1), q = clamp(round(t/scale) +
    zero_point, 0, 2^b - 1) (round half to even) and the value is (q - zero_point)*scale in float32. A constant
    tensor c gets scale |c| (1 if c = 0) and zero point 1 if c < 0 else 0, so it round-trips exactly.

    Wire, tensor by tensor in layout order: a quantized tensor is its scale as fp64 (8 bytes), its zero point
    as int32 (4 bytes), then its q values in b bits each packed into ceil(numel*b/8) bytes; an unquantized
    tensor is numel fp32 values. Hence nbytes = sum over quantized tensors of (ceil(numel*b/8) + 12) plus
    4 bytes per unquantized parameter (FLSim's count, rounded up to whole bytes per tensor).
    """

    name = "minmax"

    def __init__(self, layout: Layout, bits: int, weights_only: bool = True) -> None:
        super().__init__(layout)
        self.bits = int(bits)
        self.weights_only = bool(weights_only)
        self.qmax = 2 ** self.bits - 1
        self._segments: list[tuple[int, int, bool]] = []
        start = 0
        for _, shape in self.layout:
            n = math.prod(shape)
            self._segments.append((start, start + n, len(shape) > 1 or not self.weights_only))
            start += n

    def __repr__(self) -> str:
        return f"MinMaxQuantizer(d={self.d}, bits={self.bits}, weights_only={self.weights_only})"

    def _core(self, V: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...] | None]]:
        """(dequantized values (N, d), per segment (scale (N,), zero point (N,), q (N, n)) or None)."""
        parts: list[torch.Tensor] = []
        aux: list[tuple[torch.Tensor, ...] | None] = []
        qmax_t = _const(float(self.qmax), V.device)
        eps = torch.finfo(torch.float32).eps
        for a, b, quantized in self._segments:
            X = V[:, a:b]
            if not quantized:
                parts.append(X)
                aux.append(None)
                continue
            mn, mx = X.amin(dim=1), X.amax(dim=1)
            lo, hi = mn.clamp(max=0.0), mx.clamp(min=0.0)
            scale = ((hi - lo) / qmax_t).clamp(min=eps)
            zp = (0.0 - (lo / scale).round()).clamp(0.0, float(self.qmax))
            const = mn == mx
            const_scale = torch.where(mn == 0, torch.ones_like(mn), mn.abs())
            scale = torch.where(const, const_scale, scale)
            zp = torch.where(const, (mn < 0).to(V.dtype), zp)
            q = ((X / scale[:, None]).round() + zp[:, None]).clamp(0.0, float(self.qmax))
            parts.append((q - zp[:, None]) * scale[:, None])
            aux.append((scale, zp, q))
        return torch.cat(parts, dim=1), aux

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """Per tensor: fp64 scale, int32 zero point, b-bit codes; or fp32 values when not quantized."""
        v = self._check_vec(v)
        _, aux = self._core(v[None])
        out: list[bytes] = []
        for (a, b, _), seg in zip(self._segments, aux, strict=True):
            if seg is None:
                out.append(_f32_bytes(v[a:b]))
                continue
            scale, zp, q = (t[0].cpu() for t in seg)
            out.append(np.array([float(scale)], dtype="<f8").tobytes())
            out.append(np.array([int(zp)], dtype="<i4").tobytes())
            out.append(_pack_uint(q.numpy().astype(np.int64), self.bits))
        return b"".join(out)

    def decode(self, payload: bytes) -> torch.Tensor:
        """Dequantize every tensor: (q - zero_point)*scale in float32."""
        self._check_len(payload)
        parts: list[torch.Tensor] = []
        off = 0
        for a, b, quantized in self._segments:
            n = b - a
            if not quantized:
                parts.append(_f32_from(payload, n, off))
                off += 4 * n
                continue
            scale = torch.tensor(np.frombuffer(payload, dtype="<f8", count=1, offset=off)[0], dtype=torch.float32)
            zp = torch.tensor(float(np.frombuffer(payload, dtype="<i4", count=1, offset=off + 8)[0]),
                              dtype=torch.float32)
            nq = math.ceil(n * self.bits / 8)
            q_np = _unpack_uint(payload[off + 12: off + 12 + nq], n, self.bits)
            q = torch.from_numpy(q_np.astype(np.float32))[None]
            parts.append(((q - zp.reshape(1, 1)) * scale.reshape(1, 1))[0])
            off += 12 + nq
        return torch.cat(parts)

    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Dequantized values on v's device and the (fixed) payload size."""
        v = self._check_vec(v)
        return self._core(v[None])[0][0], self.payload_bytes()

    def quantize_batch(
        self, V: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Vectorised over rows (min/max and elementwise operations only)."""
        V = self._check_batch(V, generators)
        if V.shape[0] == 0:
            return V.new_zeros((0, self.d)), []
        return self._core(V)[0], [self.payload_bytes()] * V.shape[0]

    def payload_bytes(self) -> int:
        """sum over quantized tensors of ceil(numel*b/8) + 12, plus 4 bytes per unquantized parameter."""
        total = 0
        for a, b, quantized in self._segments:
            total += math.ceil((b - a) * self.bits / 8) + 12 if quantized else 4 * (b - a)
        return total


class _SparseQuantizer(Quantizer):
    """Shared wire format of top-k and random-k: the cheapest of three, which the decoder infers from d and k.

    Sparse: k fp32 values, then their ascending positions as k int32 values (4k bytes) or a d-bit mask (ceil(d/8)
    bytes), whichever is smaller; dense: the d fp32 coordinates with zeros off the support (4d bytes), used when
    it is no larger (k near d: top-k with fraction 1.0 costs what identity costs).
    nbytes = min(4k + min(4k, ceil(d/8)), 4d).
    """

    def __init__(self, layout: Layout, k: int) -> None:
        super().__init__(layout)
        self.k = int(k)
        self.use_mask = 4 * self.k >= math.ceil(self.d / 8)
        self.dense = 4 * self.d <= 4 * self.k + min(4 * self.k, math.ceil(self.d / 8))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, k={self.k})"

    @abstractmethod
    def _select(self, v: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ascending indices, values to send) on v's device."""

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """k fp32 values then the positions (int32 indices or a d-bit mask), or the dense vector."""
        v = self._check_vec(v)
        idx, vals = self._select(v, generator)
        if self.dense:
            out = torch.zeros(self.d, dtype=torch.float32)
            out[idx.cpu()] = vals.cpu()
            return _f32_bytes(out)
        idx_np = idx.cpu().numpy()
        if self.use_mask:
            mask = np.zeros(self.d, dtype=np.uint8)
            mask[idx_np] = 1
            pos = np.packbits(mask).tobytes()
        else:
            pos = idx_np.astype("<i4").tobytes()
        return _f32_bytes(vals) + pos

    def decode(self, payload: bytes) -> torch.Tensor:
        """Scatter the k values into a zero vector (or read the dense vector)."""
        self._check_len(payload)
        if self.dense:
            return _f32_from(payload, self.d)
        vals = _f32_from(payload, self.k)
        if self.use_mask:
            mask = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, offset=4 * self.k), count=self.d)
            idx = np.flatnonzero(mask)
        else:
            idx = np.frombuffer(payload, dtype="<i4", count=self.k, offset=4 * self.k).astype(np.int64)
        if idx.size != self.k or (idx.size and (idx.min() < 0 or idx.max() >= self.d)):
            raise ValueError(f"{self.name}: the payload's positions are not {self.k} valid indices")
        out = torch.zeros(self.d, dtype=torch.float32)
        out[torch.from_numpy(idx)] = vals
        return out

    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The sparse vector on v's device and the (fixed) payload size."""
        v = self._check_vec(v)
        idx, vals = self._select(v, generator)
        out = torch.zeros_like(v)
        out[idx] = vals
        return out, self.payload_bytes()

    def payload_bytes(self) -> int:
        """min(4k + min(4k, ceil(d/8)), 4d)."""
        return min(4 * self.k + min(4 * self.k, math.ceil(self.d / 8)), 4 * self.d)


class TopKQuantizer(_SparseQuantizer):
    """Top-k sparsification: keep the k largest |v_i| (torch.topk on |v|, indices sorted ascending).

    Biased but contractive: ||top_k(v) - v||^2 <= (1 - k/d)||v||^2. Wire format: see :class:`_SparseQuantizer`.
    """

    name = "topk"

    def _select(self, v: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.topk(v.abs(), self.k, sorted=False).indices.sort().values
        return idx, v[idx]


class RandKQuantizer(_SparseQuantizer):
    """Random-k sparsification: k coordinates chosen uniformly without replacement, values scaled by d/k.

    Unbiased. The coordinates are the first k of ``torch.randperm(d, generator=g)`` (drawn on the generator's
    device), sorted ascending; the scaled fp32 values travel on the wire (format of :class:`_SparseQuantizer`).
    """

    name = "randk"
    deterministic = False

    def _select(self, v: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if generator is None:
            perm = torch.randperm(self.d, device=v.device)
        else:
            perm = torch.randperm(self.d, generator=generator, device=generator.device)
        idx = perm[: self.k].to(v.device).sort().values
        return idx, v[idx] * _const(self.d / self.k, v.device)


class SignQuantizer(Quantizer):
    """Scaled sign: per bucket the mean |v_i| (a tree sum / bucket size, fp32) times the sign of each v_i.

    Zeros (and -0.0) map to +scale. Wire: the num_buckets fp32 scales, then one bit per coordinate
    (1 = negative) packed into ceil(d/8) bytes: nbytes = 4*num_buckets + ceil(d/8) (4 + ceil(d/8) for the
    default whole-vector bucket).
    """

    name = "sign"

    def __init__(self, layout: Layout, bucket: str = "vector", bucket_size: int | None = None) -> None:
        super().__init__(layout)
        self.bucket = bucket
        self._buckets = _Buckets(self.layout, bucket, bucket_size)
        self.num_buckets = self._buckets.n

    def __repr__(self) -> str:
        return f"SignQuantizer(d={self.d}, bucket={self.bucket!r})"

    def _core(self, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scales = self._buckets.sums(V.abs()) / self._buckets.counts(V.device)
        neg = V < 0
        return self._value(scales, neg), scales, neg

    def _value(self, scales: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        per = self._buckets.expand(scales)
        return torch.where(neg, -per, per)

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """fp32 scales, then the sign bits."""
        v = self._check_vec(v)
        _, scales, neg = self._core(v[None])
        return _f32_bytes(scales[0]) + np.packbits(neg[0].cpu().numpy().astype(np.uint8)).tobytes()

    def decode(self, payload: bytes) -> torch.Tensor:
        """+scale or -scale per coordinate."""
        self._check_len(payload)
        nb = self.num_buckets
        scales = _f32_from(payload, nb)[None]
        neg = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, offset=4 * nb), count=self.d).astype(bool)
        return self._value(scales, torch.from_numpy(neg)[None])[0]

    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Scaled signs on v's device and the (fixed) payload size."""
        v = self._check_vec(v)
        return self._core(v[None])[0][0], self.payload_bytes()

    def quantize_batch(
        self, V: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Vectorised over rows."""
        V = self._check_batch(V, generators)
        if V.shape[0] == 0:
            return V.new_zeros((0, self.d)), []
        return self._core(V)[0], [self.payload_bytes()] * V.shape[0]

    def payload_bytes(self) -> int:
        """4*num_buckets + ceil(d/8)."""
        return 4 * self.num_buckets + math.ceil(self.d / 8)


class CastQuantizer(Quantizer):
    """Cast to fp16 or bf16 (round to nearest even) and back: 2 bytes per coordinate, little-endian."""

    def __init__(self, layout: Layout, name: str) -> None:
        super().__init__(layout)
        self.name = name
        self.dtype = torch.float16 if name == "fp16" else torch.bfloat16

    def __repr__(self) -> str:
        return f"CastQuantizer(d={self.d}, name={self.name!r})"

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """The 16-bit values, little-endian."""
        v = self._check_vec(v)
        raw = v.to(self.dtype).view(torch.int16).cpu().numpy()
        return raw.astype("<i2").tobytes()

    def decode(self, payload: bytes) -> torch.Tensor:
        """The 16-bit values cast back to float32."""
        self._check_len(payload)
        raw = np.frombuffer(payload, dtype="<i2", count=self.d).astype(np.int16)
        return torch.from_numpy(raw).view(self.dtype).to(torch.float32)

    def quantize(self, v: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """v cast to 16 bits and back, and 2*d."""
        v = self._check_vec(v)
        return v.to(self.dtype).to(torch.float32), 2 * self.d

    def quantize_batch(
        self, V: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Vectorised over rows."""
        V = self._check_batch(V, generators)
        return V.to(self.dtype).to(torch.float32), [2 * self.d] * V.shape[0]

    def payload_bytes(self) -> int:
        """2*d."""
        return 2 * self.d


# ----------------------------------------------------------------------------------------------------------
# construction from config


_OPTIONS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "qsgd": ("levels", "bits", "bucket", "bucket_size", "coding"),
    "minmax": ("bits", "weights_only"),
    "topk": ("fraction", "k"),
    "randk": ("fraction", "k"),
    "sign": ("bucket", "bucket_size"),
    "fp16": (),
    "bf16": (),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _int_in(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        allowed = f"must be an integer in [{lo}, {hi}]" if hi is not None else f"must be an integer >= {lo}"
        raise ConfigError(key, value, allowed)
    return int(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise ConfigError(key, value, "must be one of " + ", ".join(repr(a) for a in allowed))
    return str(value)


def _buckets_opts(key: str, opts: Mapping[str, Any]) -> tuple[str, int | None]:
    bucket = _choice(f"{key}.bucket", opts.get("bucket"), BUCKETS, "vector")
    size = None
    if bucket == "fixed":
        if opts.get("bucket_size") is None:
            raise ConfigError(f"{key}.bucket_size", None, "must be an integer >= 1 when bucket='fixed'")
        size = _int_in(f"{key}.bucket_size", opts["bucket_size"], 1)
    elif opts.get("bucket_size") is not None:
        _int_in(f"{key}.bucket_size", opts["bucket_size"], 1)  # validated, unused unless bucket='fixed'
    return bucket, size


def _sparse_k(key: str, opts: Mapping[str, Any], d: int) -> int:
    fraction, k = opts.get("fraction"), opts.get("k")
    if (fraction is None) == (k is None):
        if fraction is None:
            raise ConfigError(f"{key}.fraction", None, f"set exactly one of fraction (0 < f <= 1) or k (1..{d})")
        raise ConfigError(f"{key}.k", k, f"set exactly one of fraction or k, not both (fraction={fraction!r})")
    if k is not None:
        return _int_in(f"{key}.k", k, 1, d)
    if not isinstance(fraction, Real) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConfigError(f"{key}.fraction", fraction, "must be a number with 0 < fraction <= 1")
    kk = int(float(fraction) * d)
    if kk < 1:
        raise ConfigError(f"{key}.fraction", fraction, f"gives k = int(fraction*d) = 0 with d={d}; must give k >= 1")
    return kk


def _qsgd_levels(key: str, opts: Mapping[str, Any]) -> int:
    levels, bits = opts.get("levels"), opts.get("bits")
    if levels is None and bits is None:
        raise ConfigError(f"{key}.bits", None, "set exactly one of bits (integer >= 2) or levels (integer >= 1)")
    s_bits = None
    if bits is not None:
        s_bits = 2 ** (_int_in(f"{key}.bits", bits, 2, _QSGD_MAX_BITS) - 1) - 1
    if levels is None:
        assert s_bits is not None
        return s_bits
    s = _int_in(f"{key}.levels", levels, 1, _QSGD_MAX_LEVELS)
    if s_bits is not None and s != s_bits:
        raise ConfigError(f"{key}.levels", levels,
                          f"inconsistent with bits={bits} (which means levels={s_bits}); set only one of them")
    return s


def build_quantizer(cfg: Mapping[str, Any], layout: Layout, key: str = "quantizer") -> Quantizer:
    """Build a quantizer from a config mapping (plain dict or OmegaConf DictConfig) with key ``name``.

    ``key`` prefixes the config keys in error messages (e.g. ``client_quantizer``). Options that do not apply
    to the named quantizer may be present with value None; a non-None value for one of them, an unknown name,
    or an out-of-range value raises :class:`ConfigError` naming ``f'{key}.<option>'`` and what is allowed.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(key, cfg, "must be a mapping with a 'name' key")
    opts = {str(k): cfg[k] for k in cfg}
    name = opts.pop("name", None)
    if not isinstance(name, str) or name not in _OPTIONS:
        raise ConfigError(f"{key}.name", name, "must be one of " + ", ".join(repr(n) for n in QUANTIZER_NAMES))
    for opt, value in opts.items():
        if value is not None and opt not in _OPTIONS[name]:
            takes = ", ".join(_OPTIONS[name]) or "none"
            raise ConfigError(f"{key}.{opt}", value, f"not an option of the {name!r} quantizer (its options: {takes})")
    lay = _normalize_layout(layout)
    d = sum(math.prod(shape) for _, shape in lay)
    if name == "identity":
        return IdentityQuantizer(lay)
    if name == "qsgd":
        s = _qsgd_levels(key, opts)
        bucket, size = _buckets_opts(key, opts)
        coding = _choice(f"{key}.coding", opts.get("coding"), CODINGS, "fixed")
        return QSGDQuantizer(lay, s, bucket, size, coding)
    if name == "minmax":
        if opts.get("bits") is None:
            raise ConfigError(f"{key}.bits", None, f"must be an integer in [1, {_MINMAX_MAX_BITS}]")
        bits = _int_in(f"{key}.bits", opts["bits"], 1, _MINMAX_MAX_BITS)
        wo = opts.get("weights_only")
        if wo is None:
            wo = True
        if not isinstance(wo, bool):
            raise ConfigError(f"{key}.weights_only", wo, "must be true or false")
        return MinMaxQuantizer(lay, bits, wo)
    if name in ("topk", "randk"):
        k = _sparse_k(key, opts, d)
        return TopKQuantizer(lay, k) if name == "topk" else RandKQuantizer(lay, k)
    if name == "sign":
        bucket, size = _buckets_opts(key, opts)
        return SignQuantizer(lay, bucket, size)
    return CastQuantizer(lay, name)
