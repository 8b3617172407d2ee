"""f* for convex objectives: a full-batch float64 solver on exactly the clients' regularised loss."""

from __future__ import annotations

import numpy as np
import torch

from qafel.models.networks import FlatModel


def solve_optimum(model: FlatModel, X: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    """Minimise mean loss + (l2/2)‖w‖² over all training samples with L-BFGS in float64.

    Returns (f*, w*). Used for logistic regression, where the optimum is unique (l2 > 0) or at least finite.
    """
    from scipy.optimize import minimize  # here: importing scipy.optimize costs every process ~0.4 s at start-up

    Xd, yd = X.double().cpu(), y.cpu()

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        wt = torch.from_numpy(w).requires_grad_(True)
        loss = model.loss(wt, Xd, yd)
        (g,) = torch.autograd.grad(loss, wt)
        return float(loss.detach()), g.numpy()

    res = minimize(fun, np.zeros(model.d), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 50})
    return float(res.fun), res.x


def objective(model: FlatModel, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """The same objective evaluated in float64 at ``w`` (pass X already in float64 to avoid a copy)."""
    with torch.no_grad():
        return float(model.loss(w.double().to(X.device), X.double(), y))
