"""The fused GroupNorm -> ReLU -> max-pool kernel equals the unfused ops, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qafel.kernels import group_norm_relu_maxpool
from qafel.models import FlatModel, build_module


def unfused(x, groups, weight, bias):
    return F.max_pool2d(F.relu(F.group_norm(x, groups, weight, bias, 1e-5)), 2)


@pytest.mark.parametrize("shape, groups", [
    ((4, 32, 34, 34), 32),  # the paper CNN's first block (batch 4)
    ((3, 32, 19, 19), 32),  # odd size: the last row and column are dropped by the pool
    ((2, 6, 7, 6), 3),      # several channels per group
    ((2, 4, 5, 5), 1),
])
def test_fused_equals_unfused_values_and_gradients(shape, groups):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    ref = unfused(x, groups, weight, bias)
    got = group_norm_relu_maxpool(x, groups, weight, bias)
    assert torch.equal(got, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ref, (x, weight, bias), g), torch.autograd.grad(got, (x, weight, bias), g),
                    strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_ties_inside_a_window_route_the_gradient_as_max_pool2d_does():
    # integer-valued inputs make many equal maxima in a window (and all-negative windows after ReLU)
    x = torch.randint(-2, 3, (2, 4, 6, 6)).double().requires_grad_(True)
    weight, bias = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    g = torch.arange(2 * 4 * 3 * 3, dtype=torch.float64).view(2, 4, 3, 3)
    (a,) = torch.autograd.grad(unfused(x, 4, weight, bias), x, g)
    (b,) = torch.autograd.grad(group_norm_relu_maxpool(x, 4, weight, bias), x, g)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: group_norm_relu_maxpool(a[0], 2, a[1], a[2]), (x, weight, bias))


def test_paper_cnn_fused_path_equals_plain_path_and_works_under_torch_func():
    model = FlatModel(build_module({"name": "cnn", "dropout": 0.0}, (3, 32, 32), 10))
    gen = torch.Generator().manual_seed(2)
    w = model.initial_vector(0)
    X, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    grads = {}
    for fused in (True, False):
        model.module.fused_cpu = fused
        leaf = w.clone().requires_grad_(True)
        grads[fused] = torch.autograd.grad(model.loss(leaf, X, y), leaf)[0]
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    model.module.fused_cpu = True
    torch.testing.assert_close(torch.func.grad(model.loss)(w, X, y), grads[True], rtol=1e-5, atol=1e-7)
