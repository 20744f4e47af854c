"""The problem every node and the server build identically: a 216-parameter MLP, one full-batch regression loss.

Every client holds the same data and its loss ignores the batch counter, so a round's scalars are the same
whichever clients answer: the mean of identical float32 values, summed in float64 and divided by their count,
is that value exactly. The federation's trajectory therefore does not depend on who was sampled, killed or late,
only on every round having at least one reply, and the test compares it bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import torch

import zo_optim

DIM = 8


def model_fn() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 12), torch.nn.Tanh(), torch.nn.Linear(12, DIM))


def make_opt(model: torch.nn.Module) -> zo_optim.ZOAdam:
    return zo_optim.ZOAdam(model.parameters(), lr=1e-2, backend="reference")


def loss_fn():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(DIM, DIM, generator=g) / DIM**0.5
    x = torch.randn(32, DIM, generator=g)
    y = x @ teacher.T

    def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()

    return loss
