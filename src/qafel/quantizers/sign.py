"""Sign compression: one bit per value and one scale (the mean magnitude) per bucket.

See :mod:`qafel.quantizers.base` for the interface, the wire rules and the bit-packing helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from qafel.quantizers.base import (
    Layout,
    Quantizer,
    _Buckets,
    _f32_bytes,
    _f32_from,
)


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
