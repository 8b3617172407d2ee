"""Quantizers: what travels on the wire between clients and the server.

Owns the :class:`Quantizer` interface, the bit packing and bucket helpers (``base``), one module per codec family
(``identity``, ``qsgd``, ``minmax``, ``sparse`` for top-k and random-k, ``sign``, ``floats`` for fp16/bf16) and
:func:`build_quantizer` (``build``), which turns a config mapping into a quantizer.

May import: ``qafel.errors`` only (nothing above it: not sim, experiment, sweep or report).
"""

from qafel.quantizers.base import BUCKETS, CODINGS, QUANTIZER_NAMES, Layout, Quantizer
from qafel.quantizers.build import build_quantizer
from qafel.quantizers.floats import CastQuantizer
from qafel.quantizers.identity import IdentityQuantizer
from qafel.quantizers.minmax import MinMaxQuantizer
from qafel.quantizers.qsgd import QSGDQuantizer
from qafel.quantizers.sign import SignQuantizer
from qafel.quantizers.sparse import RandKQuantizer, TopKQuantizer

__all__ = [
    "BUCKETS", "CODINGS", "QUANTIZER_NAMES", "CastQuantizer", "IdentityQuantizer", "Layout", "MinMaxQuantizer",
    "QSGDQuantizer", "Quantizer", "RandKQuantizer", "SignQuantizer", "TopKQuantizer", "build_quantizer",
]
