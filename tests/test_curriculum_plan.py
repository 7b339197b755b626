"""The curriculum plan: parts declare what they need, one plan reads it, and a plugin loss trains.

The plan (``oneencoder.training.plan``) is resolved from a stage config alone, so most
checks here need no data. The last test writes a loss plugin into ``tmp_path``, names it
in a stage file's ``[stage] plugins`` and trains it through the CLI on the session's
small cache.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import ConfigError
from oneencoder.model.losses import LOSSES, ContrastiveLoss
from oneencoder.training.config import LossConfig, StageConfig, load_stage
from oneencoder.training.curriculum.pacers import PACERS
from oneencoder.training.curriculum.samplers import CurriculumBatchSampler, RandomBatchSampler
from oneencoder.training.curriculum.scorers import SCORERS, Scorer, ScorerResult, trust_source
from oneencoder.training.curriculum.weights import WEIGHTING_REGISTRY, build_weights
from oneencoder.training.plan import CurriculumPlan, loss_options
from oneencoder.training.trainer import BatchSampler

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "oe_test_focal_loss"  # module and loss name of the plugin written below


def _config(loss: dict[str, Any] | None = None, **curriculum: Any) -> StageConfig:
    """A stage config built in code (as ``run_stage`` accepts), with these ``[loss]`` and ``[curriculum]`` values."""
    config = StageConfig(name="plan", modalities=("a", "b"), trainable=["projection", "a", "b"])
    return dataclasses.replace(config, loss=LossConfig(**(loss or {})),
                               curriculum=dataclasses.replace(config.curriculum, **curriculum))


# ----- declarations read by the plan -----------------------------------------------------------------


def test_beta_reaches_exactly_the_losses_whose_constructor_takes_it() -> None:
    assert "beta" in loss_options(LossConfig(name="hnnce", beta=2.0))
    assert loss_options(LossConfig(name="hnnce", beta=2.0))["beta"] == 2.0
    for name in ("infonce", "margin"):
        options = loss_options(LossConfig(name=name, beta=2.0, max_margin=0.2))
        assert set(options) == {"init_temperature", "max_logit_scale", "learn_temperature"}, name


def test_plan_of_the_shipped_default_reads_no_difficulty() -> None:
    plan = CurriculumPlan.from_config(load_stage("image_text"))
    assert plan.loss == "hnnce" and plan.loss_options["beta"] == 2.0
    assert not plan.needs_table and plan.trust is None and plan.margin_scale is None
    assert plan.margins(None) is None and not plan.loss_predictor
    assert plan.build_loss().beta == 2.0


def test_margin_loss_builds_margins_from_difficulty() -> None:
    plan = CurriculumPlan.from_config(_config({"name": "margin", "max_margin": 0.2}))
    assert plan.needs_difficulty and plan.needs_table and plan.margin_scale == 0.2
    difficulty = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(plan.margins(difficulty), 0.2 * difficulty)
    with pytest.raises(ValueError):
        plan.margins(None)


def test_trust_weighting_reads_the_table_but_no_difficulty() -> None:
    plan = CurriculumPlan.from_config(_config(weighting="trust"))
    assert plan.trust == ("pair_agreement", "clean_probability")
    assert plan.needs_table and not plan.needs_difficulty
    assert plan.required_scorers == {"text_nouns", "pair_agreement"}
    assert CurriculumPlan.from_config(_config(weighting="superloss")).required_scorers == {"text_nouns"}


@pytest.mark.parametrize("pacer", sorted(PACERS.names()))
def test_every_pacer_declares_its_needs_from_its_order(pacer: str) -> None:
    cls = PACERS.get(pacer)
    plan = CurriculumPlan.from_config(_config(pacer=pacer))
    assert plan.needs_difficulty == cls.needs_difficulty == (cls.order != "none")
    assert plan.loss_predictor == plan.needs_per_pair_losses == (cls.order == "online")
    assert not CurriculumPlan.from_config(_config(pacer=pacer, loss_predictor=False)).loss_predictor


def test_weightings_are_registered_parts_that_declare_their_needs() -> None:
    needs = {n: (WEIGHTING_REGISTRY.get(n).needs_trust, WEIGHTING_REGISTRY.get(n).needs_per_pair_losses)
             for n in WEIGHTING_REGISTRY.names()}
    assert needs == {"none": (False, False), "trust": (True, False), "superloss": (False, True),
                     "trust+superloss": (True, True)}
    losses = torch.tensor([0.1, 5.0])
    only_superloss = build_weights("superloss", None, 1.0, 0.0).batch(torch.arange(2))(losses)
    assert only_superloss[1] < 1 < only_superloss[0]  # a loss far above the batch mean counts less
    with pytest.raises(ConfigError, match="sideways"):
        CurriculumPlan.from_config(_config(weighting="sideways"))


class _NoPerPairLoss(ContrastiveLoss):
    name = "oe_test_no_per_pair"
    gives_per_pair_losses = False


def test_a_part_needing_per_pair_losses_refuses_a_loss_without_them() -> None:
    LOSSES.register(_NoPerPairLoss)
    try:
        assert CurriculumPlan.from_config(_config({"name": _NoPerPairLoss.name})).loss == _NoPerPairLoss.name
        for curriculum in ({"pacer": "self_paced"}, {"weighting": "superloss"}):
            with pytest.raises(ConfigError, match="per-pair losses") as error:
                CurriculumPlan.from_config(_config({"name": _NoPerPairLoss.name}, **curriculum))
            assert len(str(error.value).splitlines()) == 1
    finally:
        LOSSES.unregister(_NoPerPairLoss.name)


class _OtherTrust(Scorer):
    name = "oe_test_other_trust"
    provides_trust = "p_correct"

    def __call__(self, ctx: Any) -> ScorerResult:  # never called here
        raise NotImplementedError


def test_the_trust_source_is_the_scorer_that_declares_it() -> None:
    assert trust_source() == ("pair_agreement", "clean_probability")
    SCORERS.register(_OtherTrust)
    try:
        with pytest.raises(ConfigError, match="several scorers"):
            trust_source()
        assert trust_source({_OtherTrust.name: 1.0}) == (_OtherTrust.name, "p_correct")
        plan = CurriculumPlan.from_config(_config(weighting="trust", scorers={_OtherTrust.name: 1.0}))
        assert plan.trust == (_OtherTrust.name, "p_correct") and plan.required_scorers == {_OtherTrust.name}
    finally:
        SCORERS.unregister(_OtherTrust.name)


def test_samplers_have_everything_the_batch_sampler_protocol_declares() -> None:
    declared = set(BatchSampler.__annotations__) | {n for n in vars(BatchSampler) if not n.startswith("_")}
    assert {"batch_size", "steps_per_epoch", "batch", "observe", "state_dict", "load_state_dict"} <= declared
    for sampler in (RandomBatchSampler(10, 4), CurriculumBatchSampler(torch.rand(10), "linear", 4)):
        missing = {n for n in declared if not hasattr(sampler, n)}
        assert not missing, (type(sampler).__name__, missing)


# ----- a plugin loss, end to end -------------------------------------------------------------------

_PLUGIN_SOURCE = f'''
"""Focal InfoNCE: each pair's loss scaled by (1 - p)^beta, p its probability of the positive."""
import torch
from oneencoder.model.losses import LOSSES, ContrastiveLoss

BUILT = []  # the options each instance was built with


@LOSSES.register
class FocalInfoNCE(ContrastiveLoss):
    name = "{PLUGIN}"

    def __init__(self, beta: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma = float(beta)
        BUILT.append({{"beta": beta, **kwargs}})

    def row_losses(self, logits):
        ce = super().row_losses(logits)
        return (1 - torch.exp(-ce)).clamp_min(0).pow(self.gamma) * ce
'''


@pytest.fixture
def loss_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A plugin module in ``tmp_path``, importable; forgotten afterwards so no other test sees it."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / f"{PLUGIN}.py").write_text(_PLUGIN_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    LOSSES.unregister(PLUGIN)
    sys.modules.pop(PLUGIN, None)


def _plugin_stage(path: Path) -> Path:
    text = (REPO / "stages" / "image_text.toml").read_text(encoding="utf-8")
    for old, new in (('name = "image_text"', 'name = "focal"'),
                     ('trainable = ["projection", "image", "text"]',
                      f'trainable = ["projection", "image", "text"]\nplugins = ["{PLUGIN}"]'),
                     ('name = "hnnce"\nbeta = 2.0', f'name = "{PLUGIN}"\nbeta = 0.5')):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_plugin_loss_named_in_a_stage_file_trains(loss_plugin: Path, small_manifest: Path, small_cache: Path,
                                                     tmp_path: Path) -> None:
    stage = _plugin_stage(tmp_path / "focal.toml")
    config = load_stage(stage)  # imports the plugin through [stage] plugins
    plan = CurriculumPlan.from_config(config)
    assert plan.loss == PLUGIN and plan.loss_options["beta"] == 0.5  # its constructor takes beta

    model = tmp_path / "model"
    result = CliRunner().invoke(app, ["train", "--stage", str(stage), "--model", str(model), "--manifest",
                                      str(small_manifest), "--cache-dir", str(small_cache), "--epochs", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    built: list[dict] = sys.modules[PLUGIN].BUILT
    assert built and built[-1] == {"beta": 0.5, "init_temperature": 0.07, "max_logit_scale": 100.0,
                                   "learn_temperature": True}
    test = json.loads((model / "runs" / "focal" / "test.json").read_text(encoding="utf-8"))
    metrics = test["test"]["directions"]["image→text"]["metrics"]
    assert test["epochs_run"] == 1 and 0.0 <= metrics["R@1"] <= 1.0 and metrics["n_queries"] > 0
    meta = json.loads((model / "oneencoder.json").read_text(encoding="utf-8"))
    assert meta["stages"][-1]["config"]["loss"]["name"] == PLUGIN
