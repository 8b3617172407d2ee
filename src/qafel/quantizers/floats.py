"""Casts to 16-bit floats: fp16 and bf16.

See :mod:`qafel.quantizers.base` for the interface, the wire rules and the bit-packing helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qafel.quantizers.base import (
    Layout,
    Quantizer,
)


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
