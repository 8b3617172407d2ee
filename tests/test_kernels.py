"""The fused GroupNorm -> ReLU -> max-pool kernels equal the unfused ops, values and gradients.

The general path (several channels per group, or a weight <= 0) is exact; the channels-last fast path
(per-channel norm, positive weights) equals the unfused ops to rounding: 1e-12 relative in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qafel.models.kernels import FAST_MIN_ELEMENTS, conv2d_constant_input, group_norm_relu_maxpool
from qafel.models.networks import FlatModel, build_module


def relative(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def unfused(x, groups, weight, bias):
    return F.max_pool2d(F.relu(F.group_norm(x, groups, weight, bias, 1e-5)), 2)


@pytest.mark.parametrize("shape, groups", [
    ((4, 32, 34, 34), 32),  # the paper CNN's first block (batch 4)
    ((3, 32, 19, 19), 32),  # odd size: the last row and column are dropped by the pool
    ((2, 6, 7, 6), 3),      # several channels per group
    ((2, 4, 5, 5), 1),
])
@pytest.mark.parametrize("positive_weight", [False, True])
def test_fused_equals_unfused_values_and_gradients(shape, groups, positive_weight):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    if positive_weight:
        weight = 0.5 + weight.abs()
    weight.requires_grad_(True)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    ref = unfused(x, groups, weight, bias)
    got = group_norm_relu_maxpool(x, groups, weight, bias, fast=True)
    fast = positive_weight and groups == shape[1]
    if fast:
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(got, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ref, (x, weight, bias), g), torch.autograd.grad(got, (x, weight, bias), g),
                    strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_fast_path_takes_channels_last_input_and_a_zero_weight_falls_back():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)
    weight, bias = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    # a zero weight makes the normalised channel constant: every window ties, so the general path is taken
    assert torch.equal(group_norm_relu_maxpool(x, 4, weight, bias, fast=True), unfused(x, 4, weight, bias))
    weight[3] = 3.0
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    got = group_norm_relu_maxpool(xcl, 4, weight, bias, fast=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, unfused(x, 4, weight, bias), rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got.sum(), xcl)
    (ref,) = torch.autograd.grad(unfused(xcl, 4, weight, bias).sum(), xcl)
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-12)


def test_without_gradients_the_fast_path_gives_the_training_forwards_exact_bits():
    """Evaluation (no_grad, or inputs needing no gradient) skips the pool's indices and autograd: same bits."""
    from qafel.models.kernels import _CHANNEL

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, 19, 19, generator=gen).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(32, generator=gen) + 0.1, torch.randn(32, generator=gen)
    trained = _CHANNEL[1].apply(x.clone().requires_grad_(True), weight, bias, 1e-5)[0].detach()
    with torch.no_grad():
        assert torch.equal(group_norm_relu_maxpool(x, 32, weight, bias, fast=True), trained)
    assert torch.equal(group_norm_relu_maxpool(x, 32, weight, bias, fast=True), trained)
    assert group_norm_relu_maxpool(x, 32, weight, bias, fast=True).is_contiguous(memory_format=torch.channels_last)
    with_grad = group_norm_relu_maxpool(x.clone().requires_grad_(True), 32, weight, bias, fast=True)
    assert with_grad.grad_fn is not None and torch.equal(with_grad.detach(), trained)


@pytest.mark.parametrize("fast", [False, True])
def test_ties_inside_a_window_route_the_gradient_as_max_pool2d_does(fast):
    # integer-valued inputs make many equal maxima in a window (and all-negative windows after ReLU)
    x = torch.randint(-2, 3, (2, 4, 6, 6)).double().requires_grad_(True)
    weight, bias = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    g = torch.arange(2 * 4 * 3 * 3, dtype=torch.float64).view(2, 4, 3, 3)
    (a,) = torch.autograd.grad(unfused(x, 4, weight, bias), x, g)
    (b,) = torch.autograd.grad(group_norm_relu_maxpool(x, 4, weight, bias, fast=fast), x, g)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels, groups, weight_low", [(4, 2, -1.0), (4, 4, 0.5)])  # general, fast path
def test_gradcheck(channels, groups, weight_low):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (weight_low + torch.rand(channels, generator=gen, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: group_norm_relu_maxpool(a[0], groups, a[1], a[2], fast=True),
                                    (x, weight, bias))


def test_the_fast_path_is_the_default_from_a_size_on():
    weight, bias = torch.ones(32), torch.zeros(32)
    small = torch.randn(1, 32, 34, 34)  # 36,992 elements: the general path, NCHW out
    large = torch.randn(2, 32, 34, 34)  # 73,984: the channels-last fast path
    assert small.numel() < FAST_MIN_ELEMENTS <= large.numel()
    out_small, out_large = (group_norm_relu_maxpool(x, 32, weight, bias) for x in (small, large))
    assert out_small.is_contiguous() and not out_large.is_contiguous()
    assert out_large.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 8])  # NCHW with the general path; channels-last with the fast path
def test_paper_cnn_fused_path_equals_plain_path_and_works_under_torch_func(batch):
    model = FlatModel(build_module({"name": "cnn", "dropout": 0.0}, (3, 32, 32), 10))
    gen = torch.Generator().manual_seed(2)
    X, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        model.module.to(dtype)
        w = model.initial_vector(0).to(dtype)
        grads = {}
        for fused in (True, False):
            model.module.fused_cpu = fused
            leaf = w.clone().requires_grad_(True)
            grads[fused] = torch.autograd.grad(model.loss(leaf, X.to(dtype), y), leaf)[0]
        # relative to the whole gradient: the conv biases' gradients are rounding noise around 0 (GroupNorm
        # after each convolution cancels a per-channel constant), so they have no relative accuracy of their own
        assert relative(grads[True], grads[False]) < tol
        model.module.fused_cpu = True
        func_grad = torch.func.grad(model.loss)(w, X.to(dtype), y)
        assert relative(func_grad, grads[True]) < tol


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_first_layer_convolution_gradients(memory_format):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 10, 10, generator=gen).contiguous(memory_format=memory_format)
    weight = torch.randn(8, 3, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(8, generator=gen, requires_grad=True)
    ref = F.conv2d(x, weight, bias, padding=2)
    got = conv2d_constant_input(x, weight, bias, 2)
    assert torch.equal(got, ref)
    g = torch.randn(ref.shape, generator=gen)
    (ref_w, ref_b), (got_w, got_b) = (torch.autograd.grad(out, (weight, bias), g) for out in (ref, got))
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=1e-6)  # oneDNN's weight gradient (here bit for bit)
    torch.testing.assert_close(got_b, ref_b, rtol=1e-5, atol=1e-5)  # the same sum in another order
    with pytest.raises(ValueError, match="must not require a gradient"):
        conv2d_constant_input(x.clone().requires_grad_(True), weight, bias, 2)
