"""A user's own nn.Module, referenced from specs as 'user_modules:Scale' (tests/unit on sys.path)."""

import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self, dim: int, factor: float = 2.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight
