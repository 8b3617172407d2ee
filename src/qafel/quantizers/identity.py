"""The identity codec: no compression, the payload is the fp32 vector itself.

See :mod:`qafel.quantizers.base` for the interface, the wire rules and the bit-packing helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qafel.quantizers.base import (
    Quantizer,
    _f32_bytes,
    _f32_from,
)


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
