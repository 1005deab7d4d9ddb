"""The LAION aesthetic MLP as a torch module (imported lazily: importing torch is slow)."""

from __future__ import annotations

import torch
import torch.nn as nn

MLP_WIDTHS = (1024, 128, 64, 16)


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP: linear layers with dropout between, no activations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        w = (dim, *MLP_WIDTHS)
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]), nn.Dropout(0.2), nn.Linear(w[1], w[2]), nn.Dropout(0.2),
            nn.Linear(w[2], w[3]), nn.Dropout(0.1), nn.Linear(w[3], w[4]), nn.Linear(w[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
