"""Models as flat parameter vectors: a module template plus functional forward/loss on a flat vector."""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qafel.errors import ConfigError
from qafel.models.kernels import FAST_MIN_ELEMENTS, conv2d_constant_input, group_norm_relu_maxpool

MODEL_NAMES = ("logreg", "mlp", "cnn", "resnet18", "char_lstm")


_dropout_source = threading.local()


@contextlib.contextmanager
def dropout_generator(generator: torch.Generator) -> Iterator[None]:
    """Within the block, ``dropout`` in this thread draws its masks from ``generator`` (a CPU generator).

    Client jobs trained side by side in threads cannot each seed the global generator; with one generator per
    job they draw exactly the masks ``torch.manual_seed(seed)`` then ``F.dropout`` would (tests/test_clients.py).
    """
    previous = getattr(_dropout_source, "generator", None)
    _dropout_source.generator = generator
    try:
        yield
    finally:
        _dropout_source.generator = previous


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, drawing from the thread's ``dropout_generator`` when one is set (CPU, outside vmap)."""
    generator = getattr(_dropout_source, "generator", None)
    if generator is None or not training or not 0.0 < p < 1.0 or x.device.type != "cpu" or _vmapped(x):
        return F.dropout(x, p, training)
    noise = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)  # as ATen's CPU dropout: mask / (1 - p)
    noise.div_(1.0 - p)
    return x * noise


class PaperCNN(nn.Module):
    """The QAFeL/FLSim CNN: 4 x [conv3x3(pad 2) -> GroupNorm -> ReLU -> maxpool2], dropout, linear.

    FLSim reuses one GroupNorm module for all four blocks (``shared_norm=True``), which gives exactly
    29,282 parameters for 3x32x32 inputs and 2 classes, and 31,594 for 10 classes. On the CPU (outside vmap)
    each block's GroupNorm -> ReLU -> max-pool runs as one fused function in channels-last layout
    (``qafel.models.kernels``; same values to rounding); set ``fused_cpu = False`` for the separate ops.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, channels: int = 32,
                 blocks: int = 4, groups: int = 32, dropout: float = 0.1, shared_norm: bool = True) -> None:
        super().__init__()
        convs = []
        c_in, size = in_channels, image_size
        for _ in range(blocks):
            convs.append(nn.Conv2d(c_in, channels, kernel_size=3, padding=2))
            c_in = channels
            size = (size + 2 * 2 - 3 + 1) // 2
        self.convs = nn.ModuleList(convs)
        n_norms = 1 if shared_norm else blocks
        self.norms = nn.ModuleList(nn.GroupNorm(groups, channels) for _ in range(n_norms))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * size * size, num_classes)
        self.fused_cpu = True  # GroupNorm->ReLU->max-pool as one kernel on the CPU (qafel.models.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional_forward(dict(self.named_parameters()), x)

    def functional_forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The forward pass with parameters taken from ``p`` (names as in ``named_parameters``)."""
        n_norms = len(self.norms)
        fused = self.fused_cpu and x.device.type == "cpu" and x.dim() == 4 and not _vmapped(x, *p.values())
        # large batches run channels-last with the fused kernels' fast path; small ones (where its extra small
        # ops cost more than they save) stay NCHW on the general path
        channels_last = fused and (x.shape[0] * self.convs[0].out_channels * (x.shape[-2] + 2) * (x.shape[-1] + 2)
                                   >= FAST_MIN_ELEMENTS)  # the first block's size
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i in range(len(self.convs)):
            if channels_last and not x.requires_grad:  # the first layer, on data
                x = conv2d_constant_input(x, p[f"convs.{i}.weight"], p[f"convs.{i}.bias"], 2)
            else:
                x = F.conv2d(x, p[f"convs.{i}.weight"], p[f"convs.{i}.bias"], padding=2)
            norm = self.norms[i % n_norms]
            weight, bias = p[f"norms.{i % n_norms}.weight"], p[f"norms.{i % n_norms}.bias"]
            if fused:
                x = group_norm_relu_maxpool(x, norm.num_groups, weight, bias, norm.eps, fast=channels_last)
            else:
                x = F.max_pool2d(F.relu(F.group_norm(x, norm.num_groups, weight, bias, norm.eps)), 2)
        x = dropout(torch.flatten(x, -3), self.dropout.p, self.training)
        return F.linear(x, p["fc.weight"], p["fc.bias"])


class FunctionalSequential(nn.Sequential):
    """``nn.Sequential`` of Flatten/Linear/ReLU with a functional forward (no module-call overhead)."""

    def functional_forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The forward pass with parameters taken from ``p``."""
        for name, layer in self.named_children():
            if isinstance(layer, nn.Flatten):
                x = torch.flatten(x, -len(x.shape) + 1) if x.dim() > 2 else x
            elif isinstance(layer, nn.Linear):
                x = F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
            elif isinstance(layer, nn.ReLU):
                x = F.relu(x)
            else:  # pragma: no cover - only the layers built below are used
                raise TypeError(f"unsupported layer {layer!r}")
        return x


@functools.cache
def _resnet18_gn_class() -> type[nn.Module]:
    """The ResNet18GN class (built on first use: importing torchvision costs seconds)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class ResNet18GN(ResNet):
        """torchvision's ResNet-18 with GroupNorm for small (32x32) inputs: a 3x3 stride-1 stem, no max-pool.

        ``reset_parameters`` repeats torchvision's initialisation (Kaiming-normal convolutions, norms at 1/0), so
        ``FlatModel.initial_vector`` reproduces the constructor's init under a seed.
        """

        def __init__(self, in_channels: int, num_classes: int, groups: int = 2) -> None:
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes,
                             norm_layer=lambda c: nn.GroupNorm(groups, c))
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            self.reset_parameters()

        def reset_parameters(self) -> None:
            """torchvision's ResNet init (the linear layer keeps PyTorch's default)."""
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.GroupNorm):
                    nn.init.constant_(m.weight, 1.0)
                    nn.init.constant_(m.bias, 0.0)
                elif isinstance(m, nn.Linear):
                    m.reset_parameters()

    return ResNet18GN


def resnet18_gn(in_channels: int, num_classes: int, groups: int = 2) -> nn.Module:
    """torchvision's ResNet-18 with GroupNorm(``groups``) for 32x32 inputs (CIFAR-style stem)."""
    if groups < 1 or 64 % groups:
        raise ConfigError("model.groups", groups, "must divide 64 for resnet18 (GroupNorm over 64..512 channels)")
    return _resnet18_gn_class()(in_channels, num_classes, groups)


def _vmapped(*tensors: torch.Tensor) -> bool:
    """Whether any tensor is batched by ``torch.func.vmap`` (looking through grad wrappers)."""
    try:
        from torch._C import _functorch as ft
    except ImportError:  # pragma: no cover - older/newer torch: take the vmap-safe path
        return True
    for t in tensors:
        while True:
            if ft.is_batchedtensor(t):
                return True
            if not ft.is_functorch_wrapped_tensor(t):
                break
            t = ft.get_unwrapped(t)
    return False


class CharLSTM(nn.Module):
    """The LEAF/FLSim Shakespeare model: embedding (vocab -> 8), stacked LSTM (2 x 256), linear to the vocab.

    Input: int64 tokens (batch, seq); output: logits for the character after the sequence (last time step).
    ``functional_forward`` runs the fused ``torch.lstm`` kernel, or, under ``torch.func.vmap`` (which has no
    batching rule for it), the same recurrence written with matmuls so that many clients batch together.
    """

    def __init__(self, vocab_size: int, num_classes: int, embedding_dim: int = 8, hidden_size: int = 256,
                 num_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional_forward(dict(self.named_parameters()), x)

    def _weights(self, p: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [p[f"lstm.{kind}_l{layer}"] for layer in range(self.lstm.num_layers)
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def functional_forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The forward pass with parameters taken from ``p`` (names as in ``named_parameters``)."""
        emb = F.embedding(x, p["embedding.weight"])
        weights = self._weights(p)
        if _vmapped(x, emb, *weights):
            last = lstm_unrolled(emb, weights, self.lstm.num_layers)
        else:
            shape = (self.lstm.num_layers, emb.shape[0], self.lstm.hidden_size)
            h0 = emb.new_zeros(shape)
            out = torch.lstm(emb, (h0, h0), weights, True, self.lstm.num_layers, 0.0, self.training, False, True)[0]
            last = out[:, -1]
        return F.linear(last, p["fc.weight"], p["fc.bias"])


def lstm_unrolled(x: torch.Tensor, weights: Sequence[torch.Tensor], num_layers: int) -> torch.Tensor:
    """A stacked LSTM (PyTorch's gate order i, f, g, o) over ``x`` (..., T, E); the last layer's final h."""
    seq = x
    for layer in range(num_layers):
        w_ih, w_hh, b_ih, b_hh = weights[4 * layer: 4 * layer + 4]
        gates_x = F.linear(seq, w_ih, b_ih + b_hh)  # (..., T, 4H): input projections for every step at once
        h = c = seq.new_zeros(seq.shape[:-2] + (w_hh.shape[1],))
        outs = []
        for t in range(seq.shape[-2]):
            i, f, g, o = (gates_x[..., t, :] + F.linear(h, w_hh)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        seq = torch.stack(outs, dim=-2) if layer + 1 < num_layers else h
    return seq


def build_module(cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the ``nn.Module`` template named by ``cfg['name']`` for the given input shape and classes.

    Binary problems (``num_classes == 2`` with ``model.binary_output``) use one logit.
    """
    name = cfg.get("name")
    in_features = int(torch.tensor(list(input_shape)).prod())
    out = 1 if (num_classes == 2 and cfg.get("binary_output", False)) else num_classes
    if name == "logreg":
        return FunctionalSequential(nn.Flatten(), nn.Linear(in_features, out, bias=bool(cfg.get("bias", True))))
    if name == "mlp":
        hidden = list(cfg.get("hidden") or [])
        if any(int(h) < 1 for h in hidden):
            raise ConfigError("model.hidden", hidden, "every hidden width must be >= 1")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, out))
        return FunctionalSequential(*layers)
    if name == "cnn":
        if len(input_shape) != 3:
            raise ConfigError("model.name", name, f"the CNN needs image inputs (C, H, W), got {tuple(input_shape)}")
        return PaperCNN(in_channels=int(input_shape[0]), image_size=int(input_shape[1]), num_classes=out,
                        channels=int(cfg.get("channels", 32)), blocks=int(cfg.get("blocks", 4)),
                        groups=int(cfg.get("groups", 32)), dropout=float(cfg.get("dropout", 0.1)),
                        shared_norm=bool(cfg.get("shared_norm", True)))
    if name == "resnet18":
        if len(input_shape) != 3:
            raise ConfigError("model.name", name, f"resnet18 needs image inputs (C, H, W), got {tuple(input_shape)}")
        return resnet18_gn(int(input_shape[0]), out, groups=int(cfg.get("groups", 2)))
    if name == "char_lstm":
        if len(input_shape) != 1:
            raise ConfigError("model.name", name, f"char_lstm needs token sequences (seq,), got {tuple(input_shape)}")
        hidden = [int(h) for h in (cfg.get("hidden") or [256, 256])]
        if len(set(hidden)) != 1 or hidden[0] < 1:
            raise ConfigError("model.hidden", hidden, "char_lstm: equal LSTM widths >= 1, one per layer")
        return CharLSTM(vocab_size=num_classes, num_classes=out, embedding_dim=int(cfg.get("embedding_dim", 8)),
                        hidden_size=hidden[0], num_layers=len(hidden))
    raise ConfigError("model.name", name, f"must be one of {', '.join(MODEL_NAMES)}")


class FlatModel:
    """A module template driven by a flat float32 parameter vector (the only thing the server touches).

    ``loss(w, X, y)`` is the mean training loss plus ``(l2/2)·‖w‖²``; ``logits(w, X)`` the forward pass.
    """

    def __init__(self, module: nn.Module, l2: float = 0.0) -> None:
        self.module = module
        self.l2 = float(l2)
        params = dict(module.named_parameters())
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.d = sum(self.numels)
        self.layout = list(zip(self.names, self.shapes, strict=True))
        self.binary = self.shapes[-1][0] == 1  # the output layer's weight or bias leads with out_features
        self._linear = self._single_linear(module)
        self.has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())

    @staticmethod
    def _single_linear(module: nn.Module) -> nn.Linear | None:
        """The Linear layer of a (multinomial) logistic regression, else None."""
        if isinstance(module, FunctionalSequential):
            layers = [m for m in module.children() if not isinstance(m, nn.Flatten)]
            if len(layers) == 1 and isinstance(layers[0], nn.Linear):
                return layers[0]
        return None

    def linear_sgd_step(self, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                        lr: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For logistic regression, a function taking stacked parameters ``W`` (n, d) to ``W − lr·∇masked_loss``
        on the batches ``X`` (n, B, ...) in closed form (None for other models: use autograd).

        The logistic loss's gradient is Xᵀ(σ(Xw) − y)/count (softmax − one-hot for several classes), plus l2·w;
        the step is one fused ``baddbmm`` per step: W ← (1 − lr·l2)·W − lr·Xᵀr. The per-batch quantities are
        prepared once, so full-batch local steps reuse them.
        """
        lin = self._linear
        if lin is None:
            return None
        n, batch = X.shape[0], X.shape[1]
        out, inp = lin.out_features, lin.in_features
        Xf = X.reshape(n, batch, inp)
        scale = (mask / mask.sum(1, keepdim=True).clamp_min(1.0)).unsqueeze(-1)
        target = y.to(X.dtype).unsqueeze(-1) if self.binary else F.one_hot(y, out).to(X.dtype)
        decay, split = 1.0 - lr * self.l2, out * inp
        has_bias, binary = lin.bias is not None, self.binary

        def step(W: torch.Tensor) -> torch.Tensor:
            weight = W[:, :split].view(n, out, inp)
            z = torch.bmm(Xf, weight.transpose(1, 2))  # (n, B, out); einsum picks a far slower path here
            if has_bias:
                z += W[:, split:].unsqueeze(1)
            r = (torch.sigmoid_(z) if binary else torch.softmax(z, -1)).sub_(target).mul_(scale)
            new = torch.baddbmm(weight, r.transpose(1, 2), Xf, beta=decay, alpha=-lr).view(n, split)
            if not has_bias:
                return new
            return torch.cat([new, torch.add(W[:, split:] * decay, r.sum(1), alpha=-lr)], 1)

        return step

    def initial_vector(self, seed: int, init: str = "default") -> torch.Tensor:
        """x⁰: the module's default init under ``torch.manual_seed(seed)`` (or all zeros)."""
        if init == "zeros":
            return torch.zeros(self.d)
        if init != "default":
            raise ConfigError("model.init", init, "must be one of default, zeros")
        module = self.module
        if any(p.device.type != "cpu" for p in module.parameters()):
            # initialise on the CPU: a CUDA module would draw from the CUDA generator, giving another x⁰
            module = copy.deepcopy(module).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if hasattr(module, "reset_parameters"):  # the module's own init (e.g. torchvision's ResNet)
                module.reset_parameters()
            else:
                for m in module.modules():
                    if hasattr(m, "reset_parameters") and m is not module:
                        m.reset_parameters()
            return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``w`` shaped as the module's parameters."""
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(w, self.numels), self.shapes, strict=True)}

    def logits(self, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Forward pass with parameters ``w``."""
        params = self.unflatten(w)
        if hasattr(self.module, "functional_forward"):
            out = self.module.functional_forward(params, X)
        else:
            out = functional_call(self.module, params, (X,))
        return out.squeeze(-1) if self.binary else out

    def data_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (logistic loss for a single logit)."""
        if self.binary:
            return nn.functional.binary_cross_entropy_with_logits(out, y.to(out.dtype))
        return nn.functional.cross_entropy(out, y)

    def loss(self, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The client objective: mean data loss plus ``(l2/2)·‖w‖²``."""
        value = self.data_loss(self.logits(w, X), y)
        if self.l2:
            value = value + 0.5 * self.l2 * torch.dot(w, w)
        return value

    def masked_loss(self, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean data loss over the samples where ``mask`` is 1, plus ``(l2/2)·‖w‖²`` (for padded batches)."""
        out = self.logits(w, X)
        if self.binary:
            per = nn.functional.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")
        else:
            per = nn.functional.cross_entropy(out, y, reduction="none")
        value = (per * mask).sum() / mask.sum().clamp_min(1.0)
        if self.l2:
            value = value + 0.5 * self.l2 * torch.dot(w, w)
        return value

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Number of correct predictions in a batch of logits."""
        pred = (out > 0).long() if self.binary else out.argmax(-1)
        return (pred == y).sum()
