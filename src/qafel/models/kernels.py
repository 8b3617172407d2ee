"""Fused CPU kernels for the paper CNN's block tail: GroupNorm -> ReLU -> 2x2 max-pool, forward and backward.

On the CPU, PyTorch's NCHW ``max_pool2d``, the full-size ReLU passes and their backward cost more than the
GroupNorm itself in the paper CNN (measured: ~45% of a local step at batch 32 on 32x32 inputs, more than the
convolutions' backward). ``group_norm_relu_maxpool`` gives the same function in fewer passes over memory:

- ReLU commutes with max, so it is applied after pooling, on a quarter of the elements (and its backward is
  folded into the pooled gradient).
- Per-channel norm (groups == channels, as in the paper CNN) with positive weights, the fast path: the
  normalisation y = a·x + c (a = weight/std > 0 per sample and channel) is increasing in x, so the max-pool
  is taken on x itself and the affine map applied to the pooled quarter only; y is never materialised. The
  layout is channels-last throughout (the convolutions run as fast or faster in it, and the CPU max-pool
  vectorises over channels), the statistics come from one sum and one sum of squares per sample and channel
  (a variance below 0 from cancellation is clamped to 0; ``torch.var_mean`` over these strided dimensions
  measured over 20x slower), and the backward is the pool's scatter plus two in-place passes. Without
  gradients (evaluation) it skips the pool's indices and the autograd bookkeeping: the same bits, ~8% faster.
  Equal to the unfused ops to rounding (tests/test_kernels.py: ~1e-15 relative in float64, ~1e-6 in float32).
- Otherwise (several channels per group, or a weight <= 0) the general path: ATen's GroupNorm kernels, the
  max-pool in channels-last layout with ``max_pool2d``'s indices; values and gradients equal the unfused ops
  exactly.

Ties inside a pooling window route the gradient to the first maximal element, as ``max_pool2d`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _max_pool_2x2(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2/stride-2 max-pool of ``y`` (N, C, H, W) with ``max_pool2d``'s indices, both NCHW-contiguous."""
    m, index = F.max_pool2d(y.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
    return m.contiguous(), index.contiguous()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """The (N, H, W, C) contiguous view of a channels-last (N, C, H, W) tensor (elementwise ops on it run with
    channels as the contiguous inner dimension; with (N, C, 1, 1) operands on the NCHW view they may not)."""
    return t.permute(0, 2, 3, 1)


def _group_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float) -> tuple[torch.Tensor, ...]:
    n, c, h, w = x.shape
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, eps)
    m, index = _max_pool_2x2(y)
    return F.relu(m), index, mean, rstd


def _group_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _, groups, _ = inputs
    out, index, mean, rstd = output
    ctx.save_for_backward(x, weight, out, index, mean, rstd)
    ctx.groups = groups
    ctx.mark_non_differentiable(index, mean, rstd)


def _group_backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, out, index, mean, rstd = ctx.saved_tensors
    n, c, h, w = x.shape
    grad_pooled = torch.where(out > 0, grad_out, 0.0)  # ReLU's backward, on the pooled elements
    grad_y = torch.ops.aten.max_pool2d_with_indices_backward(grad_pooled, x, [2, 2], [2, 2], [0, 0], [1, 1],
                                                             False, index)
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
        grad_y, x, mean, rstd, weight, n, c, h * w, ctx.groups, mask)
    return grad_x, grad_weight, grad_bias, None, None


def _channel_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, ...]:
    """Per sample and channel of channels-last ``x``: mean, rstd, and the norm as y = scale·x + shift."""
    n, c, h, w = x.shape
    x3 = _nhwc(x).reshape(n, h * w, c)  # a view: x is channels-last
    mean = x3.sum(1).div_(h * w)
    mean_sq = torch.linalg.vecdot(x3, x3, dim=1).div_(h * w)
    rstd = torch.addcmul(mean_sq, mean, mean, value=-1.0).add_(eps).clamp_min_(eps).rsqrt_()  # var clamped at 0
    scale = rstd * weight
    shift = torch.addcmul(bias, mean, scale, value=-1.0)
    return mean, rstd, scale, shift


def _channel_output(pooled: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    n, c = scale.shape
    out = torch.addcmul(shift.view(n, 1, 1, c), _nhwc(pooled), scale.view(n, 1, 1, c)).clamp_min_(0.0)
    return out.permute(0, 3, 1, 2)


def _channel_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, ...]:
    """Per-channel norm (groups == channels) with weight > 0 on channels-last ``x``; see the module docstring."""
    mean, rstd, scale, shift = _channel_affine(x, weight, bias, eps)
    pooled, index = F.max_pool2d(x, 2, return_indices=True)  # the max of x is the max of scale*x+shift
    return _channel_output(pooled, scale, shift), pooled, index, mean, rstd, scale


def _channel_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``_channel_forward``'s output when no gradient is wanted (evaluation): the same operations on the same
    values, without the pool's indices or the autograd bookkeeping (bit-identical, ~8% faster evaluation)."""
    _, _, scale, shift = _channel_affine(x, weight, bias, eps)
    return _channel_output(F.max_pool2d(x, 2), scale, shift)


def _channel_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    out, pooled, index, mean, rstd, scale = output
    ctx.save_for_backward(inputs[0], out, pooled, index, mean, rstd, scale)
    ctx.mark_non_differentiable(pooled, index, mean, rstd, scale)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs that are not differentiable


def _channel_backward(ctx: Any, grad_out: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
    if grad_out is None:  # the output took no part in the loss
        return None, None, None, None
    x, out, pooled, index, mean, rstd, scale = ctx.saved_tensors
    n, c, h, w = x.shape
    size = h * w
    grad_pooled = torch.ops.aten.threshold_backward(grad_out, out, 0.0)  # ReLU's backward, pooled elements
    # gy (the gradient at the norm's output) is grad_pooled at each window's argmax and 0 elsewhere, so its
    # per-channel sums reduce over the pooled elements only
    sum_g = grad_pooled.sum((2, 3))
    sum_g_xhat = torch.addcmul((grad_pooled * pooled).sum((2, 3)), mean, sum_g, value=-1.0).mul_(rstd)
    # GroupNorm's input gradient: scale * (gy - mean(gy) - x_hat * mean(gy * x_hat)) = scale*gy + k1*x + k0
    k1 = (scale * rstd).mul_(sum_g_xhat).div_(-size)
    k0 = torch.addcmul((scale * sum_g).div_(-size), k1, mean, value=-1.0)
    routed = (_nhwc(grad_pooled) * scale.view(n, 1, 1, c)).permute(0, 3, 1, 2)
    grad_x = torch.ops.aten.max_pool2d_with_indices_backward(routed, x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                             index)  # scale*gy, channels-last like x
    _nhwc(grad_x).addcmul_(_nhwc(x), k1.view(n, 1, 1, c)).add_(k0.view(n, 1, 1, c))
    grad_weight = sum_g_xhat.sum(0) if ctx.needs_input_grad[1] else None
    grad_bias = sum_g.sum(0) if ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias, None


def _conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=padding)


def _conv_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, _, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _conv_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    pad = [ctx.padding, ctx.padding]
    _, grad_weight, _ = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], pad, [1, 1], False,
                                                            [0, 0], 1, [False, ctx.needs_input_grad[1], False])
    grad_bias = grad_out.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
    return None, grad_weight, grad_bias, None


def _autograd_functions(name: str, forward: Callable, setup: Callable,
                        backward: Callable) -> tuple[type[torch.autograd.Function], type[torch.autograd.Function]]:
    """The same kernel as two autograd Functions: one with ``setup_context``, which torch.func transforms need,
    and one in the classic ``forward(ctx, ...)`` style. ``Function.apply`` binds the arguments with
    ``inspect.signature`` on every call when ``setup_context`` is defined (~0.1 ms here, per block and step),
    so calls outside torch.func use the classic one."""

    def classic_forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, ...]:
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    transformable = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup), "backward": staticmethod(backward)})
    classic = type(name + "Classic", (torch.autograd.Function,), {
        "forward": staticmethod(classic_forward), "backward": staticmethod(backward)})
    return transformable, classic


_functorch_active: Callable[[], bool] = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_GROUP = _autograd_functions("_GroupNormReluMaxPool", _group_forward, _group_setup, _group_backward)
_CHANNEL = _autograd_functions("_ChannelNormReluMaxPool", _channel_forward, _channel_setup, _channel_backward)
_CONV = _autograd_functions("_ConvConstantInput", _conv_forward, _conv_setup, _conv_backward)


def conv2d_constant_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=padding)`` for an input that needs no gradient (a first layer).

    The backward asks oneDNN for the weight gradient only and sums the output gradient for the bias: with the
    bias gradient fused in, oneDNN's backward of the paper CNN's first layer (3 input channels, CPU) took
    twice as long (measured 2.0 vs 1.0 ms at batch 32). The weight gradient is oneDNN's (bit for bit the same
    here); the bias gradient is the same sum in another order.
    """
    if x.requires_grad:
        raise ValueError("conv2d_constant_input: the input must not require a gradient")
    return _CONV[0 if _functorch_active() else 1].apply(x, weight, bias, padding)


FAST_MIN_ELEMENTS = 1 << 16
"""Inputs smaller than this take the general path by default: the fast path's extra small ops cost more than
they save below ~65k elements (measured per block here: at batch 2 of 32x30x30 the general path took 407 us
and the fast one 454 us forward and backward; at batch 32, 3.9 ms and 2.5 ms)."""


def group_norm_relu_maxpool(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, fast: bool | None = None) -> torch.Tensor:
    """``max_pool2d(relu(group_norm(x, groups, weight, bias, eps)), 2)`` for ``x`` of shape (N, C, H, W).

    With ``fast`` (default: at least ``FAST_MIN_ELEMENTS`` elements), per-channel norms with positive weights
    take the channels-last fast path (output channels-last); everything else the general path (output
    contiguous).
    """
    if fast is None:
        fast = x.numel() >= FAST_MIN_ELEMENTS
    variant = 0 if _functorch_active() else 1
    if fast and groups == x.shape[1] and bool((weight > 0).all()):
        x = x.contiguous(memory_format=torch.channels_last)
        if variant and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                         or bias.requires_grad)):
            return _channel_inference(x, weight, bias, eps)
        return _CHANNEL[variant].apply(x, weight, bias, eps)[0]
    return _GROUP[variant].apply(x.contiguous(), weight, bias, groups, eps)[0]
