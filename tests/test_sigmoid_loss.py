"""The SigLIP-style sigmoid loss against a direct sum over the batch's pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oneencoder.model.losses import create_loss


def _reference(a: torch.Tensor, b: torch.Tensor, scale: float, bias: float, groups: list[int]) -> float:
    """-1/B Σ_i Σ_j log σ(z_ij (scale·a_i·b_j + bias)), same-group pairs (i ≠ j) left out (the paper's eq. 1)."""
    total = 0.0
    n = a.shape[0]
    for i in range(n):
        for j in range(n):
            if i != j and groups[i] == groups[j]:
                continue
            z = 1.0 if i == j else -1.0
            logit = scale * float(a[i] @ b[j]) + bias
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


def test_sigmoid_loss_equals_the_pairwise_sum() -> None:
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 5), dim=-1), F.normalize(torch.randn(6, 5), dim=-1)
    loss = create_loss("sigmoid", init_temperature=0.1, init_bias=-10.0)
    groups = [0, 1, 2, 2, 3, 4]
    out = loss(a, b, torch.tensor(groups))
    assert float(out["loss"]) == pytest.approx(_reference(a, b, 10.0, -10.0, groups), rel=1e-5)
    assert out["per_sample"].shape == (6,) and float(out["bias"]) == -10.0
    no_groups = loss(a, b)
    assert float(no_groups["loss"]) == pytest.approx(_reference(a, b, 10.0, -10.0, list(range(6))), rel=1e-5)


def test_sigmoid_loss_learns_its_bias_and_temperature() -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(8, 4), dim=-1).requires_grad_()
    loss = create_loss("sigmoid", init_bias=-10.0)
    loss(a, a.detach())["loss"].backward()
    assert loss.bias.grad is not None and loss.log_scale.grad is not None
    assert torch.isfinite(a.grad).all()
