"""Fused CPU kernel for the paper CNN's block tail: GroupNorm -> ReLU -> 2x2 max-pool, forward and backward.

On the CPU, PyTorch's NCHW ``max_pool2d`` and the full-size ReLU passes and their backward cost more than the
GroupNorm itself in the paper CNN (measured: ~45% of a local step at batch 32 on 32x32 inputs, more than the
convolutions' backward). This function gives the same values in fewer passes over memory:

- ReLU commutes with max, so it is applied after pooling, on a quarter of the elements (and its backward
  is folded into the pooled gradient);
- the max-pool runs in channels-last layout, where the CPU kernel vectorises over channels (about 4x faster
  than NCHW at these sizes), and returns the same indices as NCHW ``max_pool2d``;
- GroupNorm forward and backward are ATen's own kernels (``native_group_norm`` and its backward).

Forward values and gradients equal the unfused ops exactly (tests/test_models.py compares in float64; ties
inside a pooling window go to the same element as in ``max_pool2d``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _max_pool_2x2(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2/stride-2 max-pool of ``y`` (N, C, H, W) with ``max_pool2d``'s indices, both NCHW-contiguous."""
    m, index = F.max_pool2d(y.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
    return m.contiguous(), index.contiguous()


class _GroupNormReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                eps: float) -> tuple[torch.Tensor, ...]:
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, eps)
        m, index = _max_pool_2x2(y)
        return F.relu(m), index, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, _, groups, _ = inputs
        out, index, mean, rstd = output
        ctx.save_for_backward(x, weight, out, index, mean, rstd)
        ctx.groups = groups
        ctx.mark_non_differentiable(index, mean, rstd)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        x, weight, out, index, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        grad_pooled = torch.where(out > 0, grad_out, 0.0)  # ReLU's backward, on the pooled elements
        grad_y = torch.ops.aten.max_pool2d_with_indices_backward(grad_pooled, x, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                 False, index)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad_y, x, mean, rstd, weight, n, c, h * w, ctx.groups, mask)
        return grad_x, grad_weight, grad_bias, None, None


def group_norm_relu_maxpool(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5) -> torch.Tensor:
    """``max_pool2d(relu(group_norm(x, groups, weight, bias, eps)), 2)`` for ``x`` of shape (N, C, H, W)."""
    return _GroupNormReluMaxPool.apply(x.contiguous(), weight, bias, groups, eps)[0]
