"""The federated dataset: client data stored contiguously by client, plus a test set."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class FederatedData:
    """Training samples grouped by client (client i owns rows ``offsets[i]:offsets[i+1]``) and a test set.

    Tensors are resident on one device; ``client(i)`` returns views, never copies.
    """

    name: str
    X: torch.Tensor
    y: torch.Tensor
    offsets: np.ndarray
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_partition(cls, name: str, X: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray],
                       X_test: torch.Tensor, y_test: torch.Tensor, num_classes: int,
                       stats: dict[str, float] | None = None) -> FederatedData:
        """Reorder the training set so each client's samples are contiguous."""
        order = torch.as_tensor(np.concatenate(parts), dtype=torch.long)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return cls(name, X[order].contiguous(), y[order].contiguous(), offsets, X_test, y_test, num_classes,
                   dict(stats or {}))

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.offsets) - 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.X.shape[1:])

    @property
    def client_sizes(self) -> np.ndarray:
        """Samples per client."""
        return np.diff(self.offsets)

    def client(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``i``'s samples and labels (views)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.X[a:b], self.y[a:b]

    def to(self, device: str | torch.device) -> FederatedData:
        """Move every tensor to ``device``."""
        self.X, self.y = self.X.to(device), self.y.to(device)
        self.X_test, self.y_test = self.X_test.to(device), self.y_test.to(device)
        return self
