"""Models as flat parameter vectors: a module template plus functional forward/loss on a flat vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qafel.errors import ConfigError

MODEL_NAMES = ("logreg", "mlp", "cnn")


class PaperCNN(nn.Module):
    """The QAFeL/FLSim CNN: 4 x [conv3x3(pad 2) -> GroupNorm -> ReLU -> maxpool2], dropout, linear.

    FLSim reuses one GroupNorm module for all four blocks (``shared_norm=True``), which gives exactly
    29,282 parameters for 3x32x32 inputs and 2 classes, and 31,594 for 10 classes.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional_forward(dict(self.named_parameters()), x)

    def functional_forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The forward pass with parameters taken from ``p`` (names as in ``named_parameters``)."""
        n_norms = len(self.norms)
        for i in range(len(self.convs)):
            x = F.conv2d(x, p[f"convs.{i}.weight"], p[f"convs.{i}.bias"], padding=2)
            j = i % n_norms
            x = F.group_norm(x, self.norms[j].num_groups, p[f"norms.{j}.weight"], p[f"norms.{j}.bias"],
                             self.norms[j].eps)
            x = F.max_pool2d(F.relu(x), 2)
        x = F.dropout(torch.flatten(x, -3), self.dropout.p, self.training)
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
        self.has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())

    def initial_vector(self, seed: int, init: str = "default") -> torch.Tensor:
        """x⁰: the module's default init under ``torch.manual_seed(seed)`` (or all zeros)."""
        if init == "zeros":
            return torch.zeros(self.d)
        if init != "default":
            raise ConfigError("model.init", init, "must be one of default, zeros")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.module.modules():
                if hasattr(m, "reset_parameters") and m is not self.module:
                    m.reset_parameters()
            return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

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

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Number of correct predictions in a batch of logits."""
        pred = (out > 0).long() if self.binary else out.argmax(-1)
        return (pred == y).sum()
