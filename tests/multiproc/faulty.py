"""User modules for fault tests, imported by rank processes (tests/multiproc is put on
PYTHONPATH by the tests)."""

import time

import torch
from torch import nn


class FailOnNegative(nn.Module):
    """Raises when the first input value is negative; otherwise doubles its input."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.reshape(-1)[0] < 0:
            raise ValueError("negative input refused")
        return 2 * x


class Slow(nn.Module):
    def __init__(self, seconds: float = 0.2) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x + 1
