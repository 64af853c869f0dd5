"""User modules for fault tests, imported by rank processes (tests/multiproc is put on
PYTHONPATH by the tests)."""

import os
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
    """Sleeps ``seconds`` per call; when ``FAULTY_BUSY`` names a file, creates it first, so that
    a test knows the rank is in the middle of a computation."""

    def __init__(self, seconds: float = 0.2) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        busy = os.environ.get("FAULTY_BUSY")
        if busy:
            open(busy, "a").close()
        time.sleep(self.seconds)
        return x + 1
