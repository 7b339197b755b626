"""Adapters, the Universal Projection, locking, and the contrastive loss (tiny random inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oneencoder.errors import ConfigError
from oneencoder.model.losses import ContrastiveLoss, same_group_mask
from oneencoder.model.parts import Adapter, AdapterConfig, OneEncoderModel, ProjectionConfig, UniversalProjection

D_MODEL = 32


def _model(pool: str = "mean") -> OneEncoderModel:
    torch.manual_seed(0)
    model = OneEncoderModel(ProjectionConfig(d_model=D_MODEL, layers=2, heads=4, pool=pool))
    model.add_modality("image", 20, 6, AdapterConfig(hidden=16))
    model.add_modality("text", 12, 9, AdapterConfig(hidden=0))
    return model


def test_adapter_shapes_and_modality_token() -> None:
    torch.manual_seed(0)
    adapter = Adapter(20, D_MODEL, max_tokens=6, config=AdapterConfig(hidden=16))
    tokens = torch.randn(3, 4, 20)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    x, m = adapter(tokens, mask)
    assert x.shape == (3, 5, D_MODEL) and m.shape == (3, 5)
    assert m[:, 0].all() and torch.equal(m[:, 1:], mask)  # modality token is always real
    assert torch.equal(x[:, 0], adapter.modality_token[0].expand(3, -1))
    assert adapter.positions.shape == (1, 6, D_MODEL)


def test_adapter_without_positions_or_hidden() -> None:
    adapter = Adapter(12, D_MODEL, max_tokens=4, config=AdapterConfig(hidden=0, positions=False))
    assert adapter.positions is None
    x, m = adapter(torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool))
    assert x.shape == (2, 4, D_MODEL)


@pytest.mark.parametrize("pool", ["mean", "token"])
def test_projection_output_is_unit_norm(pool: str) -> None:
    model = _model(pool).eval()
    out = model("image", torch.randn(5, 3, 20), torch.ones(5, 3, dtype=torch.bool))
    assert out.shape == (5, D_MODEL)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    out = model("text", torch.randn(2, 9, 12), torch.ones(2, 9, dtype=torch.bool))
    assert out.shape == (2, D_MODEL)


def test_projection_rejects_unknown_pool() -> None:
    with pytest.raises(ValueError, match="pool"):
        UniversalProjection(ProjectionConfig(d_model=D_MODEL, pool="max"))


@pytest.mark.parametrize("pool", ["mean", "token"])
def test_padding_tokens_do_not_change_the_embedding(pool: str) -> None:
    model = _model(pool).eval()
    torch.manual_seed(1)
    real = torch.randn(4, 5, 12)
    lengths = torch.tensor([5, 3, 2, 1])
    mask = torch.arange(5)[None] < lengths[:, None]
    with torch.no_grad():
        base = model("text", real, mask)
        # Garbage in the masked slots and three extra padded slots: nothing may change.
        garbage = real.clone()
        garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), 12)
        padded = torch.cat([garbage, 1e3 * torch.randn(4, 3, 12)], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
        out = model("text", padded, padded_mask)
        # Each sample alone, trimmed to its real tokens, agrees as well.
        alone = torch.cat([model("text", real[i : i + 1, : lengths[i]], mask[i : i + 1, : lengths[i]])
                           for i in range(4)])
    assert torch.allclose(base, out, atol=1e-5)
    assert torch.allclose(base, alone, atol=1e-5)


def test_train_mode_uses_dropout_and_eval_is_deterministic() -> None:
    model = _model()
    x, m = torch.randn(3, 4, 20), torch.ones(3, 4, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model("image", x, m), model("image", x, m))
        model.train()
        assert not torch.equal(model("image", x, m), model("image", x, m))


# ----- locking ---------------------------------------------------------------------------


def test_locked_parts_stay_frozen_and_in_eval() -> None:
    model = _model()
    model.lock_projection()
    model.lock_adapter("text")
    model.train()
    for module in (model.projection, model.adapters["text"]):
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not sub.training for sub in module.modules())
    assert all(p.requires_grad for p in model.adapters["image"].parameters())
    assert all(sub.training for sub in model.adapters["image"].modules())
    # A gradient step only reaches the unlocked adapter.
    out = model("image", torch.randn(3, 2, 20), torch.ones(3, 2, dtype=torch.bool))
    out.sum().backward()
    assert all(p.grad is None for p in model.projection.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters["image"].parameters())
    # And still after switching modes back and forth.
    model.eval()
    model.train()
    assert not model.projection.training and not model.adapters["text"].training
    assert model.adapters["image"].training


def test_locked_projection_is_deterministic_in_train_mode() -> None:
    model = _model()
    model.lock_projection()
    model.lock_adapter("text")
    model.train()
    x, m = torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(model("text", x, m), model("text", x, m))  # no dropout anywhere on this path


# ----- contrastive loss -----------------------------------------------------------------


def _unit(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_aligned_pairs_have_lower_loss_than_shuffled() -> None:
    loss = ContrastiveLoss(init_temperature=0.07)
    a = _unit(8)
    with torch.no_grad():
        aligned = float(loss(a, a)["loss"])
        shuffled = float(loss(a, a[torch.roll(torch.arange(8), 1)])["loss"])
    assert aligned < shuffled
    assert aligned < 0.1 < math.log(8) < shuffled


def test_loss_matches_symmetric_infonce_by_hand() -> None:
    loss = ContrastiveLoss(init_temperature=0.1)
    a, b = _unit(6, seed=1), _unit(6, seed=2)
    logits = 10.0 * a @ b.T
    ab = -torch.log_softmax(logits, dim=1).diag().mean()
    ba = -torch.log_softmax(logits.T, dim=1).diag().mean()
    out = loss(a, b)
    assert torch.allclose(out["loss"], (ab + ba) / 2, atol=1e-5)
    assert float(out["logit_scale"]) == pytest.approx(10.0, rel=1e-5)


def test_same_group_pairs_are_not_negatives() -> None:
    loss = ContrastiveLoss(init_temperature=0.1)
    a, b = _unit(5, seed=3), _unit(5, seed=4)
    groups = torch.tensor([0, 0, 1, 2, 3])  # items 0 and 1 share a caption
    scale = float(loss.logit_scale.detach())
    sims = scale * a @ b.T

    def row_loss(scores: torch.Tensor, i: int, exclude: set[int]) -> torch.Tensor:
        keep = [j for j in range(5) if j == i or j not in exclude]
        return -torch.log_softmax(scores[i, keep], dim=0)[keep.index(i)]

    partners = {0: {1}, 1: {0}}
    by_hand_ab = torch.stack([row_loss(sims, i, partners.get(i, set())) for i in range(5)]).mean()
    by_hand_ba = torch.stack([row_loss(sims.T, i, partners.get(i, set())) for i in range(5)]).mean()
    got = loss(a, b, groups)["loss"]
    assert torch.allclose(got, (by_hand_ab + by_hand_ba) / 2, atol=1e-5)
    assert not torch.allclose(got, loss(a, b)["loss"], atol=1e-3)  # the exclusion matters here
    # Only the shared-group pair is masked, never the positives on the diagonal.
    mask = same_group_mask(groups)
    assert mask.tolist()[0][1] and mask.tolist()[1][0] and not mask.diagonal().any()
    assert int(mask.sum()) == 2


def test_no_shared_groups_means_no_mask() -> None:
    assert same_group_mask(torch.arange(4)) is None
    assert same_group_mask(None) is None
    loss = ContrastiveLoss()
    a, b = _unit(4, seed=5), _unit(4, seed=6)
    assert torch.equal(loss(a, b, torch.arange(4))["loss"], loss(a, b)["loss"])


def test_logit_scale_clamps_at_max() -> None:
    loss = ContrastiveLoss(init_temperature=0.001, max_logit_scale=100.0)
    assert float(loss.logit_scale.detach()) == pytest.approx(100.0)
    with torch.no_grad():
        loss.log_scale.fill_(50.0)
    assert float(loss.logit_scale.detach()) == pytest.approx(100.0)
    # Beyond the clamp the temperature gets no gradient, so it cannot drift further.
    out = loss(_unit(4, seed=7), _unit(4, seed=8))
    out["loss"].backward()
    assert float(loss.log_scale.grad) == 0.0
    # Below the clamp it learns.
    free = ContrastiveLoss(init_temperature=0.07)
    free(_unit(4, seed=7), _unit(4, seed=8))["loss"].backward()
    assert float(free.log_scale.grad) != 0.0


def test_fixed_temperature_is_not_trainable() -> None:
    loss = ContrastiveLoss(init_temperature=0.05, learn_temperature=False)
    assert not loss.log_scale.requires_grad
    assert float(loss.logit_scale.detach()) == pytest.approx(20.0)


def test_language_prior_blends_a_frozen_sentence_space_vector() -> None:
    torch.manual_seed(0)
    cfg = ProjectionConfig(d_model=32, layers=1, heads=4, language_prior=0.65, language_dim=8)
    model = OneEncoderModel(cfg).eval()
    model.add_modality("withprior", 20, 3, AdapterConfig(hidden=0), language_slice=(12, 20))
    model.add_modality("without", 20, 3, AdapterConfig(hidden=0))
    tokens, mask = torch.randn(4, 3, 20), torch.ones(4, 3, dtype=torch.bool)
    out = model("withprior", tokens, mask)
    assert out.shape == (4, 32 + 8) and model.embed_dim == 40
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
    # The prior part is the normalised slice of the first token, weighted by sqrt(w).
    expected = torch.nn.functional.normalize(tokens[:, 0, 12:20], dim=-1) * 0.65**0.5
    assert torch.allclose(out[:, 32:], expected, atol=1e-6)
    # A modality without a language slice contributes zeros there: its rankings use the learned part only.
    without = model("without", tokens, mask)
    assert torch.count_nonzero(without[:, 32:]) == 0
    assert torch.allclose(without.norm(dim=-1), torch.ones(4), atol=1e-5)  # still unit norm
    with pytest.raises(ConfigError, match="model.s language space is 8 wide"):
        model.add_modality("bad", 20, 3, AdapterConfig(hidden=0), language_slice=(0, 5))


def test_language_head_predicts_the_sentence_space_part_and_trains_with_its_adapter() -> None:
    torch.manual_seed(0)
    cfg = ProjectionConfig(d_model=32, layers=1, heads=4, language_prior=0.65, language_dim=8)
    model = OneEncoderModel(cfg)
    model.add_modality("frozen_side", 20, 1, AdapterConfig(hidden=0), language_slice=(12, 20))
    head = model.add_modality("new", 10, 4, AdapterConfig(hidden=0, language_head=True))
    model.lock_projection()
    model.lock_adapter("frozen_side")
    assert head.language_head is not None and head.language_head.out_features == 8
    # A modality with its own frozen slice never gets a head, even if asked for one.
    assert model.add_modality("sliced", 20, 1, AdapterConfig(language_head=True), (12, 20)).language_head is None
    tokens, mask = torch.randn(6, 4, 10), torch.ones(6, 4, dtype=torch.bool)
    mask[0, 2:] = False
    model.eval()
    out = model("new", tokens, mask)
    assert torch.allclose(out.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.count_nonzero(out[:, 32:]) > 0  # predicted, not zeros
    assert torch.allclose(out[:, 32:].norm(dim=-1), torch.full((6,), 0.65**0.5), atol=1e-5)
    # Padding does not change the prediction.
    padded = model("new", torch.cat([tokens[:1, :2], torch.randn(1, 2, 10)], 1), mask[:1])
    assert torch.allclose(padded, out[:1], atol=1e-5)
    # Gradients reach the head (it is part of the trainable adapter), not the locked parts.
    model.train()
    target = F.normalize(torch.randn(6, 40), dim=-1)
    (1 - (model("new", tokens, mask) * target).sum(-1)).mean().backward()
    assert head.language_head.weight.grad is not None and head.language_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.projection.parameters())
    assert all(p.grad is None for p in model.adapters["frozen_side"].parameters())


def test_summed_language_prior_lives_in_the_sentence_space_and_locks_a_language_only_modality() -> None:
    torch.manual_seed(0)
    cfg = ProjectionConfig(d_model=32, layers=1, heads=4, language_prior=0.45, language_dim=8, language_blend="sum")
    model = OneEncoderModel(cfg)
    model.add_modality("image", 20, 3, AdapterConfig(hidden=0), language_slice=(12, 20))
    model.add_modality("text", 8, 1, AdapterConfig(hidden=0, language_only=True), language_slice=(0, 8))
    model.add_modality("depth", 20, 3, AdapterConfig(hidden=0))  # no vector: the learned part alone
    model.eval()
    assert model.embed_dim == 8 and model.projection.head.out_features == 8
    tokens, mask = torch.randn(4, 3, 20), torch.ones(4, 3, dtype=torch.bool)
    # Locked text: the frozen sentence vector itself, whatever its adapter holds.
    sentence = torch.randn(4, 1, 8)
    assert torch.allclose(model("text", sentence, mask[:, :1]), F.normalize(sentence[:, 0], dim=-1), atol=1e-6)
    # Image: normalize(sqrt(1 - w) * learned + sqrt(w) * its label-semantics slice).
    adapted, adapted_mask = model.adapters["image"](tokens, mask)
    learned = model.projection(adapted, adapted_mask)
    expected = F.normalize(learned * 0.55**0.5 + F.normalize(tokens[:, 0, 12:20], dim=-1) * 0.45**0.5, dim=-1)
    assert torch.allclose(model("image", tokens, mask), expected, atol=1e-6)
    assert torch.allclose(model("depth", tokens, mask), model.projection(*model.adapters["depth"](tokens, mask)))
    # Training reaches the image side only; the locked text adapter gets no gradient.
    model.train()
    loss = -(model("image", tokens, mask) * model("text", sentence[:, :, :8].expand(4, 1, 8), mask[:, :1])).sum()
    loss.backward()
    assert all(p.grad is None for p in model.adapters["text"].parameters())
    assert model.adapters["image"].mlp[-1].weight.grad.abs().sum() > 0


def test_language_only_needs_the_summed_blend() -> None:
    model = OneEncoderModel(ProjectionConfig(d_model=32, layers=1, heads=4, language_prior=0.45, language_dim=8))
    with pytest.raises(ConfigError, match="language_only needs"):
        model.add_modality("text", 8, 1, AdapterConfig(language_only=True), language_slice=(0, 8))
