"""Building a quantizer from a config mapping: option checks naming the key at fault.

See :mod:`qafel.quantizers.base` for the interface, the wire rules and the bit-packing helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

from qafel.errors import ConfigError
from qafel.quantizers.base import (
    _MINMAX_MAX_BITS,
    _QSGD_MAX_BITS,
    _QSGD_MAX_LEVELS,
    BUCKETS,
    CODINGS,
    QUANTIZER_NAMES,
    Layout,
    Quantizer,
    _normalize_layout,
)
from qafel.quantizers.floats import CastQuantizer
from qafel.quantizers.identity import IdentityQuantizer
from qafel.quantizers.minmax import MinMaxQuantizer
from qafel.quantizers.qsgd import QSGDQuantizer
from qafel.quantizers.sign import SignQuantizer
from qafel.quantizers.sparse import RandKQuantizer, TopKQuantizer

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
