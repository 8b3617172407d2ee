"""Quantizers: wire payload == simulated value bit for bit, sizes == closed formulas, statistics (ALGORITHMS.md §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qafel.errors import ConfigError
from qafel.quantizers import QUANTIZER_NAMES, Quantizer, build_quantizer

LAYOUT = [("w1", (16, 8)), ("b1", (16,)), ("w2", (3, 16)), ("b2", (3,))]
D = 128 + 16 + 48 + 3

CNN_LAYOUT = (
    [("conv1.weight", (32, 3, 3, 3)), ("conv1.bias", (32,))]
    + [item for i in (2, 3, 4) for item in ((f"conv{i}.weight", (32, 32, 3, 3)), (f"conv{i}.bias", (32,)))]
    + [("norm.weight", (32,)), ("norm.bias", (32,)), ("fc.weight", (2, 288)), ("fc.bias", (2,))]
)

CONFIGS: list[dict] = (
    [{"name": "identity"}]
    + [
        {"name": "qsgd", "bits": b, "bucket": bucket, "bucket_size": 20 if bucket == "fixed" else None,
         "coding": coding}
        for b in (2, 4, 8) for bucket in ("vector", "tensor", "fixed") for coding in ("fixed", "elias_gamma")
    ]
    + [{"name": "qsgd", "levels": 1}, {"name": "qsgd", "levels": 5, "coding": "elias_gamma"},
       {"name": "qsgd", "bits": 16, "bucket": "fixed", "bucket_size": 7}]
    + [{"name": "minmax", "bits": b, "weights_only": wo} for b in (2, 4, 8) for wo in (True, False)]
    + [{"name": "minmax", "bits": 1}, {"name": "minmax", "bits": 16, "weights_only": False}]
    + [{"name": "topk", "fraction": 0.01}, {"name": "topk", "fraction": 0.5}, {"name": "topk", "k": 6},
       {"name": "randk", "fraction": 0.1}, {"name": "randk", "k": 3},
       {"name": "topk", "fraction": 1.0}, {"name": "topk", "fraction": 0.97}]
    + [{"name": "sign"}, {"name": "sign", "bucket": "tensor"}, {"name": "sign", "bucket": "fixed", "bucket_size": 64}]
    + [{"name": "fp16"}, {"name": "bf16"}]
)


def cfg_id(cfg: dict) -> str:
    return "-".join(f"{v}" for v in cfg.values() if v is not None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns (distinguishes -0.0 from +0.0)."""
    return (a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            and torch.equal(a.cpu().view(torch.int32), b.cpu().view(torch.int32)))


def vectors() -> dict[str, torch.Tensor]:
    g = gen(123)
    plain = torch.randn(D, generator=g) * torch.exp(torch.randn(D, generator=g))
    special = torch.randn(D, generator=g)
    special[::7] = 0.0
    special[3::11] = -0.0
    special[192:] = -0.75  # b2: a constant tensor
    special[144:150] = 2.5  # a run of ties in w2
    return {"plain": plain, "special": special}


VECTORS = vectors()


# ------------------------------------------------------------------------------------------------------------
# 1. payload round trip == simulated value, bit for bit


@pytest.mark.parametrize("vec", sorted(VECTORS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_decode_encode_equals_quantize(cfg: dict, vec: str) -> None:
    q = build_quantizer(cfg, LAYOUT)
    v = VECTORS[vec].clone()
    g1, g2 = gen(7), gen(7)
    payload = q.encode(v, g1)
    value, nbytes = q.quantize(v, g2)
    decoded = q.decode(payload)
    assert isinstance(payload, bytes)
    assert decoded.device.type == "cpu" and decoded.shape == (D,)
    assert same_bits(decoded, value)
    assert value.device == v.device
    assert len(payload) == nbytes
    if q.payload_bytes() is not None:
        assert q.payload_bytes() == nbytes
    assert torch.equal(g1.get_state(), g2.get_state())  # generator consumed identically
    assert torch.equal(v, VECTORS[vec])  # input untouched
    assert q.fp32_bytes() == 4 * D and q.d == D and q.name == cfg["name"]


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["name"] in ("qsgd", "randk")], ids=cfg_id)
def test_random_quantizers_use_the_generator(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    assert not q.deterministic
    v = VECTORS["plain"]
    a, _ = q.quantize(v, gen(1))
    b, _ = q.quantize(v, gen(1))
    c, _ = q.quantize(v, gen(2))
    assert same_bits(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_decode_rejects_a_truncated_payload(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    payload = q.encode(VECTORS["plain"], gen(0))
    with pytest.raises(ValueError):
        q.decode(payload[:-1])


# ------------------------------------------------------------------------------------------------------------
# 2. payload sizes == closed formulas


def expected_nbytes(cfg: dict, layout: list, v: torch.Tensor, value: torch.Tensor) -> int:
    """The §5 formulas, written independently of the implementation."""
    numels = [math.prod(shape) for _, shape in layout]
    d = sum(numels)
    name = cfg["name"]
    if name == "identity":
        return 4 * d
    if name in ("fp16", "bf16"):
        return 2 * d
    bucket = cfg.get("bucket") or "vector"
    if bucket == "vector":
        sizes = [d]
    elif bucket == "tensor":
        sizes = numels
    else:
        sizes = [min(cfg["bucket_size"], d - a) for a in range(0, d, cfg["bucket_size"])]
    if name == "sign":
        return 4 * len(sizes) + math.ceil(d / 8)
    if name in ("topk", "randk"):
        k = cfg["k"] if cfg.get("k") is not None else int(cfg["fraction"] * d)
        return min(4 * k + min(4 * k, math.ceil(d / 8)), 4 * d)
    if name == "minmax":
        b = cfg["bits"]
        wo = cfg.get("weights_only", True)
        total = 0
        for (_, shape), n in zip(layout, numels, strict=True):
            total += math.ceil(n * b / 8) + 8 + 4 if (len(shape) > 1 or not wo) else 4 * n
        return total
    assert name == "qsgd"
    s = cfg["levels"] if cfg.get("levels") is not None else 2 ** (cfg["bits"] - 1) - 1
    if (cfg.get("coding") or "fixed") == "fixed":
        return 4 * len(sizes) + math.ceil(d * math.ceil(math.log2(2 * s + 1)) / 8)
    # Elias-gamma: recover each level from the value (l = round(|Q_i| s / ||v_bucket||)), count bits in Python
    nbits = 0
    start = 0
    for size in sizes:
        norm = float(torch.linalg.vector_norm(v[start:start + size].double()))
        for x in value[start:start + size].tolist():
            level = round(abs(x) * s / norm) if norm >= 1e-10 else 0
            nbits += 2 * ((level + 1).bit_length() - 1) + 1 + (level > 0)
        start += size
    return 4 * len(sizes) + math.ceil(nbits / 8)


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_payload_size_formula(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    v = VECTORS["plain"]
    value, nbytes = q.quantize(v, gen(3))
    assert nbytes == expected_nbytes(cfg, LAYOUT, v, value)
    assert len(q.encode(v, gen(3))) == nbytes


@pytest.mark.parametrize("cfg", [{"name": "topk", "fraction": 1.0}, {"name": "topk", "k": D},
                                 {"name": "topk", "fraction": 0.97}, {"name": "randk", "fraction": 1.0}], ids=cfg_id)
def test_sparse_codecs_with_nearly_every_coordinate_cost_no_more_than_identity(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    identity = build_quantizer({"name": "identity"}, LAYOUT)
    v = VECTORS["plain"]
    assert q.dense and len(q.encode(v, gen(1))) == q.payload_bytes() == identity.payload_bytes() == 4 * D
    if cfg["name"] == "topk" and q.k == D:  # every coordinate kept: the very vector, as identity sends it
        assert same_bits(q.decode(q.encode(v)), v)
    sparse = build_quantizer({"name": "topk", "fraction": 0.5}, LAYOUT)
    assert not sparse.dense and sparse.payload_bytes() < 4 * D


def test_cnn_layout_minmax_size() -> None:
    d = sum(math.prod(shape) for _, shape in CNN_LAYOUT)
    assert d == 29282
    q = build_quantizer({"name": "minmax", "bits": 4, "weights_only": True}, CNN_LAYOUT)
    assert q.d == 29282
    formula = sum(math.prod(s) * 4 // 8 + 12 for _, s in CNN_LAYOUT if len(s) > 1)
    formula += sum(4 * math.prod(s) for _, s in CNN_LAYOUT if len(s) <= 1)
    assert formula == (864 // 2 + 3 * 9216 // 2 + 576 // 2 + 5 * 12) + 4 * (4 * 32 + 2 * 32 + 2) == 15380
    v = torch.randn(d, generator=gen(0))
    value, nbytes = q.quantize(v)
    payload = q.encode(v)
    assert nbytes == len(payload) == q.payload_bytes() == formula
    assert same_bits(q.decode(payload), value)
    assert q.fp32_bytes() == 4 * 29282


def test_cnn_layout_qsgd_sizes() -> None:
    v = torch.randn(29282, generator=gen(1))
    q = build_quantizer({"name": "qsgd", "bits": 4}, CNN_LAYOUT)
    assert q.quantize(v, gen(0))[1] == 4 + math.ceil(29282 * 4 / 8) == 14645
    q = build_quantizer({"name": "qsgd", "bits": 8, "bucket": "tensor"}, CNN_LAYOUT)
    assert q.quantize(v, gen(0))[1] == 4 * len(CNN_LAYOUT) + 29282
    q = build_quantizer({"name": "qsgd", "bits": 4, "coding": "elias_gamma"}, CNN_LAYOUT)
    payload = q.encode(v, gen(5))
    value, nbytes = q.quantize(v, gen(5))
    assert len(payload) == nbytes == expected_nbytes({"name": "qsgd", "bits": 4, "coding": "elias_gamma"},
                                                     CNN_LAYOUT, v, value)
    assert same_bits(q.decode(payload), value)


def test_qsgd_wire_layout_by_hand() -> None:
    """v = [0, 1, -2, 2], s = 3: norm 3 and r = |v| are integers, so the levels [0, 1, -2, 2] are certain."""
    v = torch.tensor([0.0, 1.0, -2.0, 2.0])
    layout = [("v", (4,))]
    norm = np.array([3.0], dtype="<f4").tobytes()
    fixed = build_quantizer({"name": "qsgd", "levels": 3}, layout)
    # l + s = [3, 4, 1, 5] in 3 bits: 011 100 001 101 (+0000) -> 0x70 0xD0
    assert fixed.encode(v, gen(0)) == norm + bytes([0x70, 0xD0])
    elias = build_quantizer({"name": "qsgd", "levels": 3, "coding": "elias_gamma"}, layout)
    # 0 -> 1; 1 -> 010 0; -2 -> 011 1; 2 -> 011 0: 1 0100 0111 0110 (+000) -> 0xA3 0xB0
    assert elias.encode(v, gen(0)) == norm + bytes([0xA3, 0xB0])
    for q in (fixed, elias):
        assert torch.equal(q.decode(q.encode(v, gen(0))), v)
        assert torch.equal(q.quantize(v, gen(1))[0], v)


def test_sparse_wire_format_switches_to_mask() -> None:
    layout = [("v", (800,))]  # ceil(d/8) = 100 bytes of mask
    v = torch.randn(800, generator=gen(2))
    idx_q = build_quantizer({"name": "topk", "k": 24}, layout)  # 96 < 100: int32 indices
    mask_q = build_quantizer({"name": "topk", "k": 25}, layout)  # 100 == 100: tie -> mask
    p = idx_q.encode(v)
    assert len(p) == 8 * 24
    kept = np.frombuffer(p, dtype="<i4", offset=96)
    assert np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, np.sort(torch.topk(v.abs(), 24).indices.numpy()))
    p = mask_q.encode(v)
    assert len(p) == 100 + 100
    mask = np.zeros(800, dtype=np.uint8)
    mask[torch.topk(v.abs(), 25).indices.numpy()] = 1
    assert p[100:] == np.packbits(mask).tobytes()


def test_identity_payload_is_fp32() -> None:
    q = build_quantizer({"name": "identity"}, LAYOUT)
    v = VECTORS["special"]
    assert q.encode(v) == v.numpy().astype("<f4").tobytes()


# ------------------------------------------------------------------------------------------------------------
# 3. QSGD is unbiased and within its variance bound


@pytest.mark.parametrize("bucket", ["vector", "fixed"])
def test_qsgd_unbiased_and_variance_bound(bucket: str) -> None:
    d, s, n = 50, 4, 20000
    v = torch.randn(d, generator=gen(11))
    v[:5] *= 10.0  # unequal magnitudes, so levels differ across coordinates
    cfg = {"name": "qsgd", "levels": s, "bucket": bucket, "bucket_size": 16 if bucket == "fixed" else None}
    q = build_quantizer(cfg, [("v", (d,))])
    g = gen(2024)
    Q, sizes = q.quantize_batch(v.repeat(n, 1), [g] * n)
    Q = Q.double()
    vd = v.double()
    mean = Q.mean(0)
    se = Q.std(0) / math.sqrt(n)
    assert torch.all((mean - vd).abs() <= 5 * se + 1e-6 * vd.norm()), (mean - vd).abs().max()
    buckets = [slice(0, d)] if bucket == "vector" else [slice(a, min(a + 16, d)) for a in range(0, d, 16)]
    mse = ((Q - vd) ** 2).sum(1).mean()
    exact = 0.0  # E||Q - v||^2 = sum_i (||v_b||/s)^2 p_i (1 - p_i), p_i = frac(s|v_i|/||v_b||)
    bound = 0.0
    for sl in buckets:
        nb = vd[sl].norm()
        r = s * vd[sl].abs() / nb
        p = r - r.floor()
        exact += float(((nb / s) ** 2 * p * (1 - p)).sum())
        db = vd[sl].numel()
        bound += min(db / s**2, math.sqrt(db) / s) * float(nb**2)
    assert float(mse) <= bound * 1.02
    assert abs(float(mse) - exact) <= 0.05 * exact
    assert sizes == [q.payload_bytes()] * n


def test_randk_unbiased() -> None:
    d, n = 20, 4000
    v = torch.randn(d, generator=gen(5))
    q = build_quantizer({"name": "randk", "k": 5}, [("v", (d,))])
    g = gen(9)
    Q, _ = q.quantize_batch(v.repeat(n, 1), [g] * n)
    Q = Q.double()
    assert torch.all((Q != 0).sum(1) == 5)
    se = Q.std(0) / math.sqrt(n)
    assert torch.all((Q.mean(0) - v.double()).abs() <= 5 * se)


# ------------------------------------------------------------------------------------------------------------
# 4. top-k is contractive


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9, 1.0])
def test_topk_contraction(fraction: float) -> None:
    d = 1000
    q = build_quantizer({"name": "topk", "fraction": fraction}, [("v", (d,))])
    k = int(fraction * d)
    for seed in range(5):
        v = torch.randn(d, generator=gen(seed)).double().float()
        v[v == 0] = 1.0
        t, _ = q.quantize(v)
        assert int((t != 0).sum()) == k
        err = float(((t - v).double() ** 2).sum())
        assert err <= (1 - k / d) * float((v.double() ** 2).sum()) * (1 + 1e-9) + 1e-12
        kept = t != 0
        assert torch.equal(t[kept], v[kept])
        if k < d:
            assert v[kept].abs().min() >= v[~kept].abs().max()


# ------------------------------------------------------------------------------------------------------------
# 5. edge cases: zero vectors and constant tensors


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["name"] in ("qsgd", "sign", "minmax", "topk")], ids=cfg_id)
def test_zero_vector_gives_zeros(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    z = torch.zeros(D)
    value, nbytes = q.quantize(z, gen(0))
    payload = q.encode(z, gen(0))
    assert same_bits(value, z)
    assert same_bits(q.decode(payload), z)
    assert len(payload) == nbytes


def test_qsgd_tiny_bucket_norm_gives_zeros() -> None:
    q = build_quantizer({"name": "qsgd", "bits": 4, "bucket": "tensor"}, LAYOUT)
    v = VECTORS["plain"].clone()
    v[128:144] = 1e-12  # b1's norm is 4e-12 < 1e-10
    value, _ = q.quantize(v, gen(0))
    assert same_bits(value[128:144], torch.zeros(16))
    assert same_bits(q.decode(q.encode(v, gen(0))), value)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("c", [0.0, 1.5, -0.3, 7e-20, -3e30, 0.1])
def test_minmax_constant_tensor_round_trips(bits: int, c: float) -> None:
    layout = [("w", (4, 5)), ("b", (5,))]
    q = build_quantizer({"name": "minmax", "bits": bits, "weights_only": False}, layout)
    v = torch.full((25,), c, dtype=torch.float32)
    v[20:] = -2.0 * v[20:]
    value, _ = q.quantize(v)
    assert torch.equal(value, v)
    assert torch.equal(q.decode(q.encode(v)), v)


def test_minmax_range_contains_zero() -> None:
    """torch's MinMaxObserver convention (FLSim): the range is widened to [min(t, 0), max(t, 0)]."""
    layout = [("w", (2, 8))]
    q = build_quantizer({"name": "minmax", "bits": 3}, layout)
    v = torch.linspace(1.0, 2.0, 16)
    value, _ = q.quantize(v)
    scale = torch.tensor(2.0) / torch.tensor(7.0)
    assert torch.equal(value, torch.round(v / scale) * scale)
    payload = q.encode(v)
    assert np.frombuffer(payload, dtype="<f8", count=1)[0] == float(scale)
    assert np.frombuffer(payload, dtype="<i4", count=1, offset=8)[0] == 0


def test_minmax_error_within_half_step() -> None:
    q = build_quantizer({"name": "minmax", "bits": 4, "weights_only": True}, LAYOUT)
    v = VECTORS["plain"]
    value, _ = q.quantize(v)
    assert torch.equal(value[128:144], v[128:144]) and torch.equal(value[192:], v[192:])  # biases in fp32
    for a, b in ((0, 128), (144, 192)):
        t = v[a:b]
        step = (max(float(t.max()), 0.0) - min(float(t.min()), 0.0)) / 15
        assert float((value[a:b] - t).abs().max()) <= step / 2 * (1 + 1e-5)
        assert len(torch.unique(value[a:b])) <= 16


# ------------------------------------------------------------------------------------------------------------
# 6. config errors


def test_errors() -> None:
    with pytest.raises(ConfigError) as e:
        build_quantizer({"name": "qsgd", "bits": 0}, LAYOUT, key="client_quantizer")
    assert str(e.value).startswith("client_quantizer.bits=0")
    with pytest.raises(ConfigError) as e:
        build_quantizer({"name": "zip"}, LAYOUT, key="client_quantizer")
    assert str(e.value).startswith("client_quantizer.name='zip'")
    assert all(repr(n) in str(e.value) for n in QUANTIZER_NAMES)
    with pytest.raises(ConfigError) as e:
        build_quantizer({"name": "topk", "fraction": 0}, LAYOUT, key="client_quantizer")
    assert str(e.value).startswith("client_quantizer.fraction")


@pytest.mark.parametrize(
    ("cfg", "prefix"),
    [
        ({"name": "qsgd"}, "q.bits=None"),
        ({"name": "qsgd", "bits": 4, "levels": 3}, "q.levels=3"),
        ({"name": "qsgd", "levels": 0}, "q.levels=0"),
        ({"name": "qsgd", "bits": 2.5}, "q.bits=2.5"),
        ({"name": "qsgd", "bits": True}, "q.bits=True"),
        ({"name": "qsgd", "bits": 4, "bucket": "layer"}, "q.bucket='layer'"),
        ({"name": "qsgd", "bits": 4, "bucket": "fixed"}, "q.bucket_size=None"),
        ({"name": "qsgd", "bits": 4, "bucket": "fixed", "bucket_size": 0}, "q.bucket_size=0"),
        ({"name": "qsgd", "bits": 4, "coding": "huffman"}, "q.coding='huffman'"),
        ({"name": "minmax", "bits": 17}, "q.bits=17"),
        ({"name": "minmax"}, "q.bits=None"),
        ({"name": "minmax", "bits": 4, "weights_only": "yes"}, "q.weights_only='yes'"),
        ({"name": "topk", "fraction": 0.001}, "q.fraction=0.001"),
        ({"name": "topk", "fraction": 1.5}, "q.fraction=1.5"),
        ({"name": "topk"}, "q.fraction=None"),
        ({"name": "randk", "k": 0}, "q.k=0"),
        ({"name": "randk", "k": D + 1}, f"q.k={D + 1}"),
        ({"name": "topk", "k": 3, "fraction": 0.5}, "q.k=3"),
        ({"name": "identity", "bits": 4}, "q.bits=4"),
        ({"name": "sign", "coding": "fixed"}, "q.coding='fixed'"),
        ({}, "q.name=None"),
    ],
)
def test_config_errors(cfg: dict, prefix: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_quantizer(cfg, LAYOUT, key="q")
    assert str(e.value).startswith(prefix), str(e.value)


def test_irrelevant_none_options_are_ignored_and_dictconfig_works() -> None:
    full = {"name": "identity", "levels": None, "bits": None, "bucket": None, "bucket_size": None,
            "coding": None, "weights_only": None, "fraction": None, "k": None}
    assert build_quantizer(full, LAYOUT).is_identity
    assert build_quantizer({**full, "name": "qsgd", "levels": 3}, LAYOUT).payload_bytes() == 4 + math.ceil(D * 3 / 8)
    assert build_quantizer({**full, "name": "topk", "k": 2}, LAYOUT).payload_bytes() == 16
    omegaconf = pytest.importorskip("omegaconf")
    dc = omegaconf.OmegaConf.create({**full, "name": "minmax", "bits": 4})
    q = build_quantizer(dc, LAYOUT)
    assert q.payload_bytes() == 64 + 12 + 24 + 12 + 4 * 19


# ------------------------------------------------------------------------------------------------------------
# 7. quantize_batch == row-wise quantize


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_quantize_batch_equals_rowwise(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    V = torch.stack([VECTORS["plain"], VECTORS["special"], torch.zeros(D)]
                    + [torch.randn(D, generator=gen(40 + i)) for i in range(4)])
    V[4, :16] = 0.25  # a partly constant row
    seeds = [100 + i for i in range(V.shape[0])]
    gb = [gen(s) for s in seeds] if not q.deterministic else [None] * V.shape[0]
    values, sizes = q.quantize_batch(V, gb)
    assert values.shape == V.shape and len(sizes) == V.shape[0]
    for i, s in enumerate(seeds):
        row, n = q.quantize(V[i].clone(), gen(s) if not q.deterministic else None)
        assert same_bits(values[i], row), i
        assert sizes[i] == n
    empty, no_sizes = q.quantize_batch(V[:0], [])
    assert empty.shape == (0, D) and no_sizes == []


def test_quantize_batch_checks_generators() -> None:
    q = build_quantizer({"name": "qsgd", "bits": 4}, LAYOUT)
    with pytest.raises(ValueError):
        q.quantize_batch(torch.zeros(2, D), [gen(0)])


# ------------------------------------------------------------------------------------------------------------
# 8. identity


def test_identity() -> None:
    q = build_quantizer({"name": "identity"}, LAYOUT)
    assert isinstance(q, Quantizer) and q.is_identity and q.deterministic
    v = VECTORS["special"]
    value, nbytes = q.quantize(v)
    assert value is v or same_bits(value, v)
    assert nbytes == 4 * D == q.payload_bytes()
    V = torch.stack([v, v * 2])
    values, sizes = q.quantize_batch(V, [None, None])
    assert same_bits(values, V) and sizes == [4 * D, 4 * D]
    assert not any(build_quantizer(c, LAYOUT).is_identity for c in CONFIGS if c["name"] != "identity")


# ------------------------------------------------------------------------------------------------------------
# on a GPU: the device path matches the CPU decoder bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_cuda_quantize_matches_cpu_decode(cfg: dict) -> None:
    q = build_quantizer(cfg, LAYOUT)
    V = torch.stack([VECTORS["plain"], VECTORS["special"]]).cuda()
    for gdev in ("cpu", "cuda"):
        for i in range(2):
            g1 = torch.Generator(device=gdev).manual_seed(i)
            g2 = torch.Generator(device=gdev).manual_seed(i)
            value, nbytes = q.quantize(V[i], g2)
            payload = q.encode(V[i], g1)
            assert value.device.type == "cuda"
            assert same_bits(q.decode(payload), value)
            assert len(payload) == nbytes
        gens = [torch.Generator(device=gdev).manual_seed(i) for i in range(2)]
        values, _ = q.quantize_batch(V, gens if not q.deterministic else [None, None])
        for i in range(2):
            row, _ = q.quantize(V[i], torch.Generator(device=gdev).manual_seed(i))
            assert same_bits(values[i], row)


@pytest.mark.parametrize("bucket, bucket_size", [("vector", None), ("tensor", None), ("fixed", 64), ("fixed", 7)])
@pytest.mark.parametrize("rows", [1, 5])
def test_qsgd_numpy_path_for_small_cpu_vectors_is_bit_identical_to_torch(monkeypatch, bucket, bucket_size, rows):
    import qafel.quantizers.qsgd as quantizers  # where QSGD reads _NUMPY_MAX_ELEMENTS

    layout = [("w", (10, 11)), ("b", (3,)), ("z", (1,))]
    q = build_quantizer({"name": "qsgd", "levels": 8, "bucket": bucket, "bucket_size": bucket_size}, layout)
    gen = torch.Generator().manual_seed(7)
    V = torch.randn(rows, q.d, generator=gen) * torch.tensor([1.0, 1e-14, 3.0, 1e3, 1e-3])[:rows, None]  # tiny norms
    V[0, :5] = 0.0
    V[:, -1] = 0.0  # the last tensor all zero: a zero bucket under bucket=tensor
    V[:, 3] = -V[:, 3].abs()

    def run() -> tuple:
        single = q.quantize(V[0].clone(), torch.Generator().manual_seed(1))
        batch = q.quantize_batch(V.clone(), [torch.Generator().manual_seed(10 + i) for i in range(rows)])
        return single, batch

    (s_np, n_np), (b_np, sizes_np) = run()
    monkeypatch.setattr(quantizers, "_NUMPY_MAX_ELEMENTS", -1)  # every size through torch
    (s_t, n_t), (b_t, sizes_t) = run()
    assert torch.equal(s_np, s_t) and torch.equal(b_np, b_t)
    assert (n_np, sizes_np) == (n_t, sizes_t)
    assert s_np.dtype == torch.float32 and torch.count_nonzero(b_np) > 0
