"""Server-side update rules on flat vectors: staleness weights, buffer reduction, server optimizers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qafel.errors import ConfigError

ALGORITHMS = ("qafel", "fedbuff", "naive")
STALENESS_WEIGHTS = ("constant", "polynomial", "threshold")
OPTIMIZERS = ("sgd", "adam")
REDUCTIONS = ("sum", "mean")


class StalenessWeight:
    """w(τ): ``constant`` 1; ``polynomial`` (1+τ)^(−a), or ((1+1)/(1+τ))^a with ``normalize`` (FLSim's
    convention, w(1) = 1); ``threshold`` 1 if τ ≤ cutoff else ``value``."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.kind = cfg.get("weight", "constant")
        self.exponent = float(cfg.get("exponent") if cfg.get("exponent") is not None else 0.5)
        self.normalize = bool(cfg.get("normalize", False))
        self.cutoff = cfg.get("cutoff")
        self.value = float(cfg.get("value") or 0.0)
        if self.kind not in STALENESS_WEIGHTS:
            raise ConfigError("server.staleness.weight", self.kind, f"must be one of {', '.join(STALENESS_WEIGHTS)}")
        if self.kind == "polynomial" and self.exponent < 0:
            raise ConfigError("server.staleness.exponent", self.exponent, "must be >= 0")
        if self.kind == "threshold" and (self.cutoff is None or int(self.cutoff) < 0):
            raise ConfigError("server.staleness.cutoff", self.cutoff, "must be an integer >= 0 for weight=threshold")

    def __call__(self, tau: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return ((2.0 / (1.0 + tau)) if self.normalize else 1.0 / (1.0 + tau)) ** self.exponent
        return 1.0 if tau <= int(self.cutoff) else self.value


class ServerOptimizer:
    """Treats the reduced buffer g as a gradient: SGD (with momentum β: m ← β·m + g; x ← x − η_g·m) or Adam."""

    def __init__(self, cfg: Mapping[str, Any], d: int, device: torch.device | str = "cpu") -> None:
        self.kind = cfg.get("optimizer", "sgd")
        if self.kind not in OPTIMIZERS:
            raise ConfigError("server.optimizer", self.kind, f"must be one of {', '.join(OPTIMIZERS)}")
        self.lr = float(cfg.get("lr"))
        self.momentum = float(cfg.get("momentum") or 0.0)
        betas = cfg.get("betas") or (0.9, 0.999)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(cfg.get("eps") or 1e-8)
        self.steps = 0
        self.m = torch.zeros(d, device=device) if (self.momentum or self.kind == "adam") else None
        self.v = torch.zeros(d, device=device) if self.kind == "adam" else None

    def step(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return the new server model (``x`` is not modified)."""
        self.steps += 1
        if self.kind == "sgd":
            if self.m is None:
                return x - self.lr * g
            self.m.mul_(self.momentum).add_(g)
            return x - self.lr * self.m
        self.m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        m_hat = self.m / (1 - self.beta1**self.steps)
        v_hat = self.v / (1 - self.beta2**self.steps)
        return x - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def reduce_buffer(buffer: torch.Tensor, k: int, reduction: str) -> torch.Tensor:
    """g from the buffer S of k updates: S (``sum``, FLSim and the paper's NN runs) or S/k (``mean``)."""
    if reduction == "sum":
        return buffer
    if reduction == "mean":
        return buffer / k
    raise ConfigError("server.reduction", reduction, f"must be one of {', '.join(REDUCTIONS)}")


def is_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())  # a tenth of torch's cost for the small vectors of logistic models
    return bool(torch.isfinite(t).all())
