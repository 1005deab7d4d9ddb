"""The LAION aesthetic / ImageReward head as a torch module: the one definition that both the
curation filter (:mod:`imagegen.filters.aesthetic`) and the evaluation scorers
(:mod:`imagegen.evaluate.rewards`, ``RewardMLP``) use (imported lazily: importing torch is slow).

``Linear(D,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1),
Linear(64,16), Linear(16,1)``: the ReLUs are commented out in both published definitions
(improved-aesthetic-predictor, ImageReward), so the head is affine; state-dict keys
``layers.{0,2,4,6,7}``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

MLP_WIDTHS = (1024, 128, 64, 16)


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP: linear layers with dropout between, no activations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.input_size = int(dim)
        w = (self.input_size, *MLP_WIDTHS)
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]), nn.Dropout(0.2), nn.Linear(w[1], w[2]), nn.Dropout(0.2),
            nn.Linear(w[2], w[3]), nn.Dropout(0.1), nn.Linear(w[3], w[4]), nn.Linear(w[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
