"""Stage files: the shipped one loads; every mistake is a ConfigError that names the key."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from oneencoder.errors import ConfigError
from oneencoder.training.config import StageConfig, load_stage, parse_stage, resolve_stage_path

REPO = Path(__file__).resolve().parent.parent
STAGE_FILE = REPO / "stages" / "image_text.toml"


def _raw() -> dict[str, Any]:
    return tomllib.loads(STAGE_FILE.read_text(encoding="utf-8"))


def _without_source(config: StageConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("source")
    return d


def test_shipped_stage_by_name_and_by_path_agree() -> None:
    by_name = load_stage("image_text")
    by_path = load_stage(STAGE_FILE)
    by_str_path = load_stage(str(STAGE_FILE))
    assert _without_source(by_name) == _without_source(by_path) == _without_source(by_str_path)
    assert Path(by_name.source).name == "image_text.toml"
    assert resolve_stage_path("image_text").resolve() == STAGE_FILE.resolve()


def test_shipped_stage_values_come_from_the_file() -> None:
    raw = _raw()
    config = load_stage("image_text")
    assert config.name == raw["stage"]["name"]
    assert list(config.modalities) == raw["stage"]["modalities"]
    assert config.trainable == raw["stage"]["trainable"]
    data = dataclasses.asdict(config.data)
    assert {k: data[k] for k in raw["data"]} == raw["data"]
    assert config.modality_options == raw["modalities"]
    cur = dataclasses.asdict(config.curriculum)
    assert {k: cur[k] for k in raw["curriculum"]} == raw["curriculum"]
    for section, obj in (("model", config.model), ("adapter", config.adapter), ("loss", config.loss),
                         ("train", config.train)):
        for key, value in raw[section].items():
            assert getattr(obj, key) == value, (section, key)
    # Keys the file leaves out take the dataclass defaults.
    assert config.train.grad_clip == type(config.train)().grad_clip
    json.dumps(config.to_dict())  # recorded in oneencoder.json: must be JSON


def test_overrides_win_and_none_means_keep() -> None:
    raw = _raw()
    config = load_stage("image_text", {"train": {"epochs": 2, "seed": None},
                                       "data": {"manifest": "m.jsonl", "cache_dir": None}})
    assert config.train.epochs == 2
    assert config.train.seed == raw["train"]["seed"]
    assert config.data.manifest == "m.jsonl" and config.data.cache_dir == raw["data"]["cache_dir"]


def _expect_error(raw: dict[str, Any], *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_stage(raw, "test.toml")
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return err.value


def test_unknown_section() -> None:
    raw = _raw()
    raw["trainer"] = {"epochs": 3}
    _expect_error(raw, "trainer")


@pytest.mark.parametrize("section", ["data", "model", "adapter", "loss", "train"])
def test_unknown_key_in_section(section: str) -> None:
    raw = _raw()
    raw.setdefault(section, {})["not_a_key"] = 1
    _expect_error(raw, "not_a_key", f"[{section}]")


def test_unknown_key_in_stage_section() -> None:
    raw = _raw()
    raw["stage"]["epochs"] = 3
    _expect_error(raw, "epochs", "[stage]")


@pytest.mark.parametrize("key", ["name", "modalities", "trainable"])
def test_missing_stage_key(key: str) -> None:
    raw = _raw()
    del raw["stage"][key]
    _expect_error(raw, key)


@pytest.mark.parametrize("pair", [["image"], ["image", "text", "audio"], "image,text", ["image", 3]])
def test_stage_needs_two_modality_names(pair: Any) -> None:
    raw = _raw()
    raw["stage"]["modalities"] = pair
    _expect_error(raw, "modalities")


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("train", "epochs", "ten", "an integer"),
        ("train", "epochs", 2.5, "an integer"),
        ("train", "epochs", True, "an integer"),
        ("train", "lr", "fast", "a number"),
        ("loss", "learn_temperature", 1, "true or false"),
        ("model", "pool", 1, "a string"),
        ("data", "manifest", ["a"], "a string"),
    ],
)
def test_wrong_type_names_the_key(section: str, key: str, value: Any, expected: str) -> None:
    """One format for every option error: where, the option, what it must be, what it got."""
    raw = _raw()
    raw.setdefault(section, {})[key] = value
    _expect_error(raw, f"test.toml: [{section}] {key} must be {expected}, got {value!r}")


@pytest.mark.parametrize("section,key,value,choices", [
    ("model", "pool", "max", "'mean', 'token'"),
    ("loss", "name", "softmax", "'hnnce', 'infonce', 'margin', 'sigmoid'"),
    ("curriculum", "hn_source", "other", "'frozen', 'model'"),
    ("curriculum", "pacer", "easy", "'linear'"),
    ("train", "bank", "ram", "'auto', 'memory', 'disk'"),
    ("train", "precision", "fp8", "'auto', 'fp32', 'bf16'"),
])
def test_a_value_outside_its_choices_lists_them(section: str, key: str, value: str, choices: str) -> None:
    raw = _raw()
    raw.setdefault(section, {})[key] = value
    err = _expect_error(raw, f"test.toml: [{section}] {key} must be one of ", choices, f"got {value!r}")
    assert "\n" not in str(err)


def test_a_loss_registered_by_a_plugin_passes_the_stage_file() -> None:
    """``[loss] name`` accepts what the loss registry holds, not a list of its own."""
    from oneencoder.model.losses import LOSSES, ContrastiveLoss

    class PluginLoss(ContrastiveLoss):
        name = "plugin_test_loss"

    raw = _raw()
    raw["loss"]["name"] = "plugin_test_loss"
    _expect_error(json.loads(json.dumps(raw)), "[loss] name must be one of")
    LOSSES.register(PluginLoss)
    try:
        assert parse_stage(raw, "test.toml").loss.name == "plugin_test_loss"
    finally:
        LOSSES.unregister("plugin_test_loss")


def test_rules_between_two_options_stay_next_to_their_dataclass() -> None:
    raw = _raw()
    raw["model"].update(d_model=30, heads=4)
    _expect_error(raw, "test.toml: [model] d_model must be a multiple of heads = 4, got 30")
    raw = _raw()
    raw["curriculum"]["scorers"] = {"text_nouns": -1.0}
    _expect_error(raw, "test.toml: [curriculum] scorers must map scorer names to non-negative weights")


def test_int_is_accepted_where_a_float_is_expected() -> None:
    raw = _raw()
    raw["train"]["lr"] = 1
    raw["loss"]["max_logit_scale"] = 50
    config = parse_stage(raw)
    assert config.train.lr == 1 and config.loss.max_logit_scale == 50


def test_section_that_is_not_a_table() -> None:
    raw = _raw()
    raw["train"] = 5
    _expect_error(raw, "[train]", "table")


def test_missing_stage_file_lists_shipped_stages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_text") as err:
        load_stage(tmp_path / "nope.toml")
    assert "nope.toml" in str(err.value)


def test_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[stage\nname = ", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_stage(bad)


def test_stage_file_from_disk_with_a_typo(tmp_path: Path) -> None:
    text = STAGE_FILE.read_text(encoding="utf-8").replace("weight_decay", "wieght_decay")
    path = tmp_path / "typo.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="wieght_decay"):
        load_stage(path)


def _typo_in_modality_section(raw: dict) -> None:
    raw["modalities"]["imgae"] = {"tokens": "grid"}


def _typo_in_curriculum(raw: dict) -> None:
    raw["curriculum"]["pacr"] = "linear"


def _unknown_loss_name(raw: dict) -> None:
    raw["loss"]["name"] = "softmax"


def _trainable_as_string(raw: dict) -> None:
    raw["stage"]["trainable"] = "projection"


def _modality_options_not_a_table(raw: dict) -> None:
    raw["modalities"]["text"] = 5


@pytest.mark.parametrize("mistake", [_typo_in_modality_section, _typo_in_curriculum, _unknown_loss_name,
                                     _trainable_as_string, _modality_options_not_a_table])
def test_silent_config_mistakes_are_errors(mistake) -> None:
    raw = _raw()
    mistake(raw)
    with pytest.raises(ConfigError):
        parse_stage(raw, "test.toml")


def test_adapter_tables_per_modality_override_the_shared_adapter() -> None:
    raw = _raw()
    raw["adapter"] = {"hidden": 0, "dropout": 0.3, "text": {"language_only": True}}
    config = parse_stage(raw, "test.toml")
    assert config.adapter_for("image") == config.adapter and not config.adapter.language_only
    text = config.adapter_for("text")
    assert text.language_only and text.hidden == 0 and text.dropout == 0.3
    raw["adapter"]["text"] = {"language_onyl": True}
    _expect_error(raw, "test.toml: [adapter.text]")


def test_the_demo_stage_is_shipped_and_trains_the_stage_demo_all_extends() -> None:
    from oneencoder.cli.demo import DEMO_STAGE

    config = load_stage(DEMO_STAGE)
    assert config.name == "image_text"  # demo-all looks for runs/image_text
    assert config.model.language_blend == "sum" and config.adapter_for("text").language_only
