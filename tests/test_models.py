"""Parameter counts, seeded initial vectors, vmap-compatible forward passes, and FLSim's min-max message sizes."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from qafel.models.networks import CharLSTM, FlatModel, build_module, lstm_unrolled
from qafel.quantizers import build_quantizer


def flat(cfg: dict, shape: tuple[int, ...], classes: int) -> FlatModel:
    return FlatModel(build_module(cfg, shape, classes))


@pytest.mark.parametrize("cfg, shape, classes, count", [
    ({"name": "cnn"}, (3, 32, 32), 2, 29_282),      # CelebA
    ({"name": "cnn"}, (3, 32, 32), 10, 31_594),     # CIFAR-10
    ({"name": "cnn"}, (1, 28, 28), 10, 31_018),     # Fashion-MNIST stand-in
    ({"name": "resnet18", "groups": 2}, (3, 32, 32), 10, 11_173_962),
    ({"name": "char_lstm", "hidden": [256, 256], "embedding_dim": 8}, (80,), 80, 819_920),
])
def test_parameter_counts(cfg, shape, classes, count):
    model = flat(cfg, shape, classes)
    print(f"{cfg['name']} {shape} -> {classes}: {model.d:,} parameters")
    assert model.d == count


@pytest.mark.parametrize("cfg, shape, classes", [
    ({"name": "cnn"}, (3, 32, 32), 10),
    ({"name": "resnet18", "groups": 2}, (3, 32, 32), 10),
    ({"name": "char_lstm", "hidden": [256, 256]}, (80,), 80),
])
def test_initial_vector_is_seeded(cfg, shape, classes):
    model = flat(cfg, shape, classes)
    a, b, c = model.initial_vector(0), model.initial_vector(0), model.initial_vector(1)
    assert a.shape == (model.d,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(model.initial_vector(0, "zeros"), torch.zeros(model.d))


def test_resnet_initial_vector_uses_torchvision_init():
    model = flat({"name": "resnet18", "groups": 2}, (3, 32, 32), 10)
    p = model.unflatten(model.initial_vector(0))
    w = p["layer1.0.conv1.weight"]  # Kaiming normal, fan_out = 64 * 3 * 3
    assert abs(float(w.std()) - (2.0 / (64 * 9)) ** 0.5) < 0.005
    assert torch.equal(p["layer1.0.bn1.weight"], torch.ones(64))
    assert torch.equal(p["layer1.0.bn1.bias"], torch.zeros(64))
    assert isinstance(model.module.layer1[0].bn1, torch.nn.GroupNorm) and model.module.layer1[0].bn1.num_groups == 2
    out = model.logits(model.initial_vector(0), torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_char_lstm_fused_and_unrolled_paths_agree():
    model = flat({"name": "char_lstm", "hidden": [64, 64], "embedding_dim": 8}, (20,), 80)
    w = model.initial_vector(0)
    X = torch.randint(0, 80, (5, 20), dtype=torch.int64)
    fused = model.logits(w, X)
    p = model.unflatten(w)
    module: CharLSTM = model.module  # type: ignore[assignment]
    emb = torch.nn.functional.embedding(X, p["embedding.weight"])
    unrolled = torch.nn.functional.linear(lstm_unrolled(emb, module._weights(p), 2), p["fc.weight"], p["fc.bias"])
    assert fused.shape == (5, 80)
    torch.testing.assert_close(fused, unrolled, rtol=1e-5, atol=1e-6)
    reference, _ = torch.nn.LSTM(8, 64, num_layers=2, batch_first=True).eval(), None
    for name, value in p.items():
        if name.startswith("lstm."):
            getattr(reference, name.removeprefix("lstm.")).data.copy_(value)
    torch.testing.assert_close(reference(emb)[0][:, -1], lstm_unrolled(emb, module._weights(p), 2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg, shape, classes", [
    ({"name": "cnn"}, (1, 16, 16), 10),
    ({"name": "resnet18", "groups": 2}, (3, 8, 8), 10),
    ({"name": "char_lstm", "hidden": [32, 32]}, (12,), 80),
])
def test_per_job_gradients_under_vmap_equal_one_by_one(cfg, shape, classes):
    """The engine may batch client jobs with vmap(grad(loss)): every model must give the per-job gradients."""
    model = flat(cfg, shape, classes)
    model.module.eval()  # no dropout: the two paths must see the same function
    W = torch.stack([model.initial_vector(0), model.initial_vector(1)])
    if cfg["name"] == "char_lstm":
        X, y = torch.randint(0, 80, (2, 3, *shape)), torch.randint(0, 80, (2, 3))
    else:
        X, y = torch.randn(2, 3, *shape), torch.randint(0, classes, (2, 3))
    batched = vmap(grad(model.loss))(W, X, y)
    single = torch.stack([grad(model.loss)(W[j], X[j], y[j]) for j in range(2)])
    torch.testing.assert_close(batched, single, rtol=1e-3, atol=2e-4)


def flsim_minmax_bytes(tensors: list[tuple[str, tuple[int, ...]]], bits: int) -> int:
    """FLSim's count (ALGORITHMS.md §5): numel·b/8 + 8 (fp64 scale) + 4 (int32 zero point) for each tensor with
    ndim > 1, plus 4 bytes per parameter of the other (fp32) tensors."""
    total = 0
    for _, shape in tensors:
        numel = 1
        for s in shape:
            numel *= s
        total += numel * bits // 8 + 8 + 4 if len(shape) > 1 else 4 * numel
    return total


PAPER_CNN_TENSORS = {  # written out by hand from the paper's architecture (FLSim shares one GroupNorm)
    2: [("convs.0.weight", (32, 3, 3, 3)), ("convs.0.bias", (32,)), ("convs.1.weight", (32, 32, 3, 3)),
        ("convs.1.bias", (32,)), ("convs.2.weight", (32, 32, 3, 3)), ("convs.2.bias", (32,)),
        ("convs.3.weight", (32, 32, 3, 3)), ("convs.3.bias", (32,)), ("norms.0.weight", (32,)),
        ("norms.0.bias", (32,)), ("fc.weight", (2, 288)), ("fc.bias", (2,))],
}
PAPER_CNN_TENSORS[10] = PAPER_CNN_TENSORS[2][:-2] + [("fc.weight", (10, 288)), ("fc.bias", (10,))]


@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_message_sizes_of_the_paper_cnn_equal_flsim(classes, bits):
    model = flat({"name": "cnn"}, (3, 32, 32), classes)
    assert model.layout == PAPER_CNN_TENSORS[classes]
    q = build_quantizer({"name": "minmax", "bits": bits, "weights_only": True}, model.layout)
    expected = flsim_minmax_bytes(PAPER_CNN_TENSORS[classes], bits)
    assert q.payload_bytes() == expected
    quantized = 29_088 if classes == 2 else 31_392  # parameters in the 5 weight tensors
    assert expected == quantized * bits // 8 + 5 * 12 + 4 * (model.d - quantized)
    v = model.initial_vector(0)
    assert len(q.encode(v)) == expected
    if (classes, bits) == (10, 4):
        assert expected == 16_564  # vs 126,376 bytes in fp32: 7.6x smaller
