"""Curriculum losses: per-sample InfoNCE, HN-NCE and the margin loss (tiny random inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oneencoder.errors import ConfigError
from oneencoder.model.losses import ContrastiveLoss, HardNegativeLoss, MarginLoss, create_loss, list_losses

GROUPS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # two shared groups: masked negatives


def _unit(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _pairs(n: int = 8, noise: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    a = _unit(n, seed=seed)
    return a, F.normalize(a + noise * _unit(n, seed=seed + 100), dim=-1)


def _same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return (torch.allclose(x["loss"], y["loss"], atol=atol)
            and torch.allclose(x["per_sample"], y["per_sample"], atol=atol)
            and torch.equal(x["logit_scale"], y["logit_scale"]))


# ----- InfoNCE per-sample ------------------------------------------------------------------


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_infonce_per_sample_is_the_mean_of_both_directions(groups: torch.Tensor | None) -> None:
    loss = ContrastiveLoss(init_temperature=0.1)
    a, b = _pairs()
    out = loss(a, b, groups)
    assert set(out) == {"loss", "per_sample", "logit_scale"}
    assert out["per_sample"].shape == (8,) and not out["per_sample"].requires_grad and out["loss"].requires_grad
    assert torch.allclose(out["per_sample"].mean(), out["loss"], atol=1e-6)
    logits = loss.logits(a, b, groups)
    by_hand = (-logits.log_softmax(1).diag() - logits.t().log_softmax(1).diag()) / 2
    assert torch.allclose(out["per_sample"], by_hand, atol=1e-6)
    # Harder pairs (noisier partner) get a higher per-sample loss.
    b2 = b.clone()
    b2[3] = _unit(1, seed=77)[0]
    assert int(loss(a, b2, groups)["per_sample"].argmax()) == 3


# ----- HN-NCE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_hnnce_with_beta_zero_is_infonce(groups: torch.Tensor | None) -> None:
    a, b = _pairs()
    info = ContrastiveLoss(init_temperature=0.07)(a, b, groups)
    hn = HardNegativeLoss(beta=0.0, init_temperature=0.07)
    assert _same(hn(a, b, groups), info)
    assert _same(HardNegativeLoss(beta=2.0, init_temperature=0.07)(a, b, groups, beta=0.0), info)  # per call


def test_hnnce_matches_the_paper_formula() -> None:
    beta, n = 0.7, 6
    loss = HardNegativeLoss(beta=beta, init_temperature=0.2)
    a, b = _pairs(n, seed=3)
    s = 5.0 * a @ b.T  # temperature-scaled similarities

    def direction(sim: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(n):
            neg = [j for j in range(n) if j != i]
            w = (n - 1) * torch.exp(beta * sim[i, neg]) / torch.exp(beta * sim[i, neg]).sum()
            rows.append(-(sim[i, i] - torch.log(torch.exp(sim[i, i]) + (w * torch.exp(sim[i, neg])).sum())))
        return torch.stack(rows)

    by_hand = (direction(s) + direction(s.T)) / 2
    out = loss(a, b)
    assert torch.allclose(out["per_sample"], by_hand, atol=1e-5)
    assert torch.allclose(out["loss"], by_hand.mean(), atol=1e-5)


def test_hnnce_excludes_same_group_pairs_from_weights_and_denominator() -> None:
    beta, n = 1.0, 5
    groups = torch.tensor([0, 0, 1, 2, 3])
    loss = HardNegativeLoss(beta=beta, init_temperature=0.1)
    a, b = _pairs(n, seed=4)
    s = 10.0 * a @ b.T

    def direction(sim: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(n):
            neg = [j for j in range(n) if groups[j] != groups[i]]
            w = len(neg) * torch.exp(beta * sim[i, neg]) / torch.exp(beta * sim[i, neg]).sum()
            rows.append(torch.log(torch.exp(sim[i, i]) + (w * torch.exp(sim[i, neg])).sum()) - sim[i, i])
        return torch.stack(rows)

    out = loss(a, b, groups)
    assert torch.allclose(out["per_sample"], (direction(s) + direction(s.T)) / 2, atol=1e-5)
    # Moving the masked partner anywhere changes nothing for its group mate.
    b_moved = b.clone()
    b_moved[1] = a[0]
    moved = loss(a, b_moved, groups)["per_sample"]

    def a_to_b(bb: torch.Tensor) -> torch.Tensor:
        return loss.row_losses(loss.logits(a, bb, groups))

    assert torch.allclose(a_to_b(b_moved)[0], a_to_b(b)[0], atol=1e-6)
    assert not torch.allclose(moved, out["per_sample"])  # (row 1 itself did change)


def test_hnnce_grows_with_beta_when_hard_negatives_are_close() -> None:
    a, b = _pairs(8, noise=0.3, seed=5)
    b = b.clone()
    b[1] = F.normalize(a[0] + 0.05 * _unit(1, seed=9)[0], dim=0)  # pair 1's caption nearly describes item 0
    losses = [float(HardNegativeLoss(beta=beta)(a, b)["loss"].detach()) for beta in (0.0, 0.1, 0.5, 1.0)]
    assert all(x < y for x, y in zip(losses, losses[1:])), losses
    # The close negative dominates: the rows/columns that contain it gain the most.
    gain = HardNegativeLoss(beta=1.0)(a, b)["per_sample"] - ContrastiveLoss()(a, b)["per_sample"]
    assert int(gain.argmax()) in (0, 1)


def test_hnnce_gradients_are_finite_even_without_negatives() -> None:
    loss = HardNegativeLoss(beta=0.5)
    a, b = _pairs(4, seed=6)
    a.requires_grad_(True)
    out = loss(a, b, torch.tensor([0, 0, 0, 0]))  # one group: no row has a negative
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(a.grad).all()
    assert torch.allclose(out["loss"], torch.tensor(0.0), atol=1e-6)  # only the positive is left


# ----- margin -----------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_margin_zero_is_infonce(groups: torch.Tensor | None) -> None:
    a, b = _pairs()
    info = ContrastiveLoss(init_temperature=0.07)(a, b, groups)
    assert _same(MarginLoss(margin=0.0, init_temperature=0.07)(a, b, groups), info)
    assert _same(MarginLoss(margin=0.3, init_temperature=0.07)(a, b, groups, margin=torch.zeros(8)), info)


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_margin_increases_the_loss_and_matches_by_hand(groups: torch.Tensor | None) -> None:
    a, b = _pairs()
    loss = MarginLoss(margin=0.2, init_temperature=0.1)
    base = ContrastiveLoss(init_temperature=0.1)(a, b, groups)
    out = loss(a, b, groups)
    assert (out["per_sample"] > base["per_sample"]).all() and out["loss"] > base["loss"]
    logits = ContrastiveLoss(init_temperature=0.1).logits(a, b, groups) - 10.0 * 0.2 * torch.eye(8)
    by_hand = (-logits.log_softmax(1).diag() - logits.t().log_softmax(1).diag()) / 2
    assert torch.allclose(out["per_sample"], by_hand, atol=1e-5)
    assert loss(a, b, groups, margin=0.4)["loss"] > out["loss"]


def test_per_sample_margin_only_moves_its_own_pair() -> None:
    a, b = _pairs()
    loss = MarginLoss(init_temperature=0.1)
    difficulty = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    out = loss(a, b, margin=0.3 * difficulty)  # dynamic margin: max_margin * difficulty
    base = loss(a, b, margin=0.0)
    changed = ~torch.isclose(out["per_sample"], base["per_sample"], atol=1e-7)
    assert changed.tolist() == (difficulty > 0).tolist()
    assert out["per_sample"][2] - base["per_sample"][2] > out["per_sample"][5] - base["per_sample"][5] > 0


# ----- shared temperature and registry ----------------------------------------------------------


def test_losses_share_the_clamped_learned_temperature() -> None:
    for loss in (HardNegativeLoss(beta=0.5, init_temperature=0.001), MarginLoss(init_temperature=0.001)):
        assert isinstance(loss, ContrastiveLoss)
        assert [n for n, _ in loss.named_parameters()] == ["log_scale"]
        assert float(loss.logit_scale.detach()) == pytest.approx(100.0)  # clamped like InfoNCE
        a, b = _pairs(4, seed=8)
        with torch.no_grad():
            loss.log_scale.fill_(2.0)
        loss(a, b)["loss"].backward()
        assert float(loss.log_scale.grad) != 0.0  # and learned below the clamp
    assert not create_loss("margin", learn_temperature=False).log_scale.requires_grad


def test_create_loss_registry() -> None:
    assert {"infonce", "hnnce", "margin"} <= set(list_losses())
    assert type(create_loss("infonce")) is ContrastiveLoss
    hn = create_loss("hnnce", beta=0.25, init_temperature=0.05)
    assert isinstance(hn, HardNegativeLoss) and hn.beta == 0.25
    assert float(hn.logit_scale.detach()) == pytest.approx(20.0)
    assert create_loss("margin", margin=0.3).margin == 0.3
    with pytest.raises(ConfigError, match="unknown loss 'triplet'"):
        create_loss("triplet")
    with pytest.raises(ConfigError, match="unknown option.*'beta'"):
        create_loss("margin", beta=0.5)
    with pytest.raises(ConfigError, match="beta"):
        create_loss("hnnce", beta=-1.0)
