"""Min-max (asymmetric uniform) quantization to ``bits`` bits per value, per tensor.

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
    _const,
    _f32_bytes,
    _f32_from,
    _pack_uint,
    _unpack_uint,
)


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
