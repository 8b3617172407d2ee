"""QSGD: stochastic rounding to ``s`` levels of the norm per bucket, fixed-width or Elias-gamma coded.

See :mod:`qafel.quantizers.base` for the interface, the wire rules and the bit-packing helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from qafel.quantizers.base import (
    _NUMPY_MAX_ELEMENTS,
    _ZERO_NORM,
    Layout,
    Quantizer,
    _Buckets,
    _elias_gamma_decode,
    _elias_gamma_encode,
    _f32_from,
    _pack_uint,
    _uniform,
    _unpack_uint,
)


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
            with np.errstate(all="ignore"):  # overflow and NaN propagate silently, as in torch (divergence tests)
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
            with np.errstate(all="ignore"):
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
