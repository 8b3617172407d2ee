"""Sparsification: top-k (largest magnitudes) and random-k (a seeded random subset), indices plus values.

See :mod:`qafel.quantizers.base` for the interface, the wire rules and the bit-packing helpers.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
import torch

from qafel.quantizers.base import (
    Layout,
    Quantizer,
    _const,
    _f32_bytes,
    _f32_from,
)


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
