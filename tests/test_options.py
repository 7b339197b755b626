"""One option schema: stage-file sections, modality options and scorer options are declared
the same way, checked by one checker and refused in one format; old class names still load;
the model, not the trainer, says which weights AdamW leaves undecayed."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import oneencoder
from oneencoder.errors import ConfigError
from oneencoder.modality import MODALITIES, Modality, ModalitySpec, create_modality
from oneencoder.model.losses import LOSSES, create_loss
from oneencoder.model.parts import AdapterConfig, ProjectionConfig, build_model
from oneencoder.options import (AT_LEAST_1, NON_NEGATIVE, OPEN_SHARE, POSITIVE, Declared, Range, declarations,
                                declare, option, parse_options, parse_section)
from oneencoder.training.config import parse_stage
from oneencoder.training.curriculum.scorers import create_scorer
from oneencoder.training.trainer import _param_groups

#: ``<where> <option> must <requirement>, got <value>``: the one format of a value that is not allowed.
ONE_FORMAT = re.compile(r"^(?P<where>.*\S) (?P<option>\w+) must (?P<need>.+), got (?P<value>.+)$")


def _message(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# ----- the schema --------------------------------------------------------------------------


def test_range_membership_and_words() -> None:
    lr = Range(0, False, 1, True)
    assert 1 in lr and 0.5 in lr and 0 not in lr and 1.5 not in lr and math.nan not in lr and math.inf not in lr
    assert lr.words() == "in (0, 1]" and OPEN_SHARE.words() == "in [0, 1)"
    assert POSITIVE.words() == "> 0" and NON_NEGATIVE.words() == ">= 0" and AT_LEAST_1.words() == ">= 1"
    assert Range(hi=5, hi_in=False).words() == "< 5" and -1e9 in Range(hi=5)


@dataclass
class _Shape:
    width: int = option(8, range=AT_LEAST_1)
    rate: float = option(0.5, range=OPEN_SHARE)
    pool: str = option("mean", choices=("mean", "token"))
    kind: str = option("infonce", choices=LOSSES.names)  # names read when checked
    table: dict = option({"a": 1.0})
    flag: bool = False


@pytest.mark.parametrize("raw, need", [
    ({"width": 0}, "width must be >= 1 (a finite number), got 0"),
    ({"width": 2.0}, "width must be an integer, got 2.0"),
    ({"width": True}, "width must be an integer, got True"),
    ({"rate": 1.0}, "rate must be in [0, 1) (a finite number), got 1.0"),
    ({"rate": math.nan}, "rate must be in [0, 1) (a finite number), got nan"),
    ({"pool": "max"}, "pool must be one of 'mean', 'token', got 'max'"),
    ({"kind": "nope"}, "kind must be one of 'hnnce', 'infonce', 'margin', 'sigmoid', got 'nope'"),
    ({"table": {"a": math.inf}}, "table must hold finite numbers, got {'a': inf}"),
    ({"table": [1]}, "table must be a table, got [1]"),
    ({"flag": 1}, "flag must be true or false, got 1"),
])
def test_parse_section_refuses_in_one_format(raw: dict, need: str) -> None:
    message = _message(parse_section, _Shape, raw, "s.toml: [shape]")
    assert message == f"s.toml: [shape] {need}" and ONE_FORMAT.match(message)


def test_parse_section_builds_checked_values_and_names_unknown_keys() -> None:
    shape = parse_section(_Shape, {"width": 3, "rate": 0, "pool": "token"}, "[shape]")
    assert (shape.width, shape.rate, shape.pool, shape.table) == (3, 0, "token", {"a": 1.0})
    assert shape.table is not _Shape().table  # a table default is copied per instance
    assert _message(parse_section, _Shape, {"widht": 3}, "[shape]") == \
        "[shape]: unknown option(s) ['widht']; known: ['flag', 'kind', 'pool', 'rate', 'table', 'width']"
    assert _message(parse_section, _Shape, 3, "[shape]") == "[shape] must be a table"


def test_plain_defaults_are_judged_by_their_defaults() -> None:
    """A plugin's plain dict: positive stays positive, zero stays non-negative, lists keep their length."""
    plain = {"cells": 4, "threshold": 0.0, "offset": -1.0, "mean": [0.5, 0.5], "name": "x", "extra": None}
    where = "[modalities.plain]"
    assert parse_options(where, plain, {"offset": -7, "extra": [1, "a"]})["offset"] == -7
    for given, need in [({"cells": 0}, "cells must be > 0 (a finite number), got 0"),
                        ({"threshold": -0.1}, "threshold must be >= 0 (a finite number), got -0.1"),
                        ({"offset": math.inf}, "offset must be finite, got inf"),
                        ({"mean": [1.0]}, "mean must be a list of 2 finite numbers (like its default [0.5, 0.5]), "
                                          "got [1.0]"),
                        ({"name": 3}, "name must be a string, got 3")]:
        assert _message(parse_options, where, plain, given) == f"{where} {need}"


def test_declare_mixes_declarations_and_plain_defaults_and_reads_as_defaults() -> None:
    table = declare({"radius": option(2, range=NON_NEGATIVE), "cells": 4, "mode": option("a", choices=("a", "b"))})
    assert isinstance(table, Declared) and table == {"radius": 2, "cells": 4, "mode": "a"}
    specs = declarations(table)
    assert specs["radius"].range == NON_NEGATIVE and specs["cells"].range == POSITIVE
    assert specs["mode"].names() == ["a", "b"]
    assert parse_options("[m]", table, {"radius": 0}) == {"radius": 0, "cells": 4, "mode": "a"}
    assert _message(parse_options, "[m]", table, {"mode": "c"}) == "[m] mode must be one of 'a', 'b', got 'c'"


# ----- one checker, one format, everywhere -----------------------------------------------------


def _stage(stage_raw: dict, section: str, **values: Any) -> None:
    raw = json.loads(json.dumps(stage_raw))
    raw.setdefault(section, {}).update(values)
    parse_stage(raw, "test.toml")


@pytest.mark.parametrize("call", [
    lambda raw: _stage(raw, "train", lr=0),
    lambda raw: _stage(raw, "train", epochs="ten"),
    lambda raw: _stage(raw, "model", pool="max"),
    lambda raw: _stage(raw, "loss", name="softmax"),
    lambda raw: _stage(raw, "curriculum", pacer_options={"start": math.nan}),
    lambda raw: _stage(raw, "modalities", text={"max_tokens": math.inf}),
    lambda raw: create_modality("molecule", radius=-1),
    lambda raw: create_modality("text", tokens="bogus"),
    lambda raw: create_modality("image", std=[0.5, 0.0, 0.5]),
    lambda raw: create_modality("depth", fov=180.0),
    lambda raw: create_modality("video", fps=-1.0),
    lambda raw: create_modality("audio", max_windows=0),
    lambda raw: create_scorer("cross_modal_density", k=0),
    lambda raw: LOSSES.create("infonce", init_temperature="warm"),
], ids=["range", "type", "choice", "registry-choice", "nested-nan", "modality-table-inf", "molecule", "text",
        "image", "depth", "video", "audio", "scorer", "registry-type"])
def test_every_option_error_has_one_format(stage_raw: dict, call: Any) -> None:
    message = _message(call, stage_raw)
    assert ONE_FORMAT.match(message) and "\n" not in message, message


def test_molecule_radius_follows_its_declaration() -> None:
    """The base once refused a radius of 0 that the modality's own check meant to allow."""
    assert _message(create_modality, "molecule", radius=-1) == \
        "[modalities.molecule] radius must be >= 0 (a finite number), got -1"
    atoms = create_modality("molecule", radius=0)
    assert atoms.preprocess(atoms.load("CC(=O)OC1=CC=CC=C1C(=O)O")).shape[1] == atoms.feature_dim


def test_built_in_modalities_declare_a_range_for_every_number() -> None:
    """Ranges come from declarations, not from hand-written checks in ``__init__``."""
    for name in ("text", "image", "audio", "molecule", "depth", "video"):
        cls = MODALITIES.get(name)
        assert cls.__name__ == f"{name.capitalize()}Modality"
        assert isinstance(cls.default_options, Declared), name
        for key, spec in cls.default_options.specs.items():
            numbers = spec.default if isinstance(spec.default, list) else [spec.default]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) and key != "mean":
                assert spec.range is not None, (name, key)


def test_a_plugin_with_plain_default_options_works_unchanged() -> None:
    class Plain(Modality):  # as examples/sketch declares its options: a plain dict
        spec = ModalitySpec(name="plain_options_test", backbone="none", preprocess_version="v1", record_key="x")
        default_options = {"cells": 4, "edge_threshold": 0.2}
        feature_dim = max_tokens = 1
        weights_sha256 = load_backbone = load = preprocess = encode = lambda self, *args: None

    assert Plain(cells=2).options == {"cells": 2, "edge_threshold": 0.2}
    assert _message(Plain, cells=0) == "[modalities.plain_options_test] cells must be > 0 (a finite number), got 0"


# ----- renamed classes: old model directories still load ---------------------------------------


def test_old_modality_class_names_stay_importable() -> None:
    from oneencoder.modalities import audio, molecule, text

    assert text.Text is text.TextModality and audio.Audio is audio.AudioModality
    assert molecule.Molecule is molecule.MoleculeModality


def test_a_model_recording_an_old_class_name_still_loads(trained_model, tmp_path: Path) -> None:
    model = tmp_path / "old_names"
    shutil.copytree(trained_model["dir"], model, ignore=shutil.ignore_patterns("runs"))
    meta = json.loads((model / "oneencoder.json").read_text())
    assert meta["modalities"]["text"]["class"] == "oneencoder.modalities.text:TextModality"
    meta["modalities"]["text"]["class"] = "oneencoder.modalities.text:Text"  # as saved before the rename
    (model / "oneencoder.json").write_text(json.dumps(meta))
    old, new = oneencoder.load(model), oneencoder.load(trained_model["dir"])
    assert torch.equal(old.encode("text", ["A badger."]), new.encode("text", ["A badger."]))
    meta["modalities"]["text"]["class"] = "oneencoder.modalities.text:Nope"  # not an alias: refused
    (model / "oneencoder.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="registered by oneencoder.modalities.text:TextModality"):
        oneencoder.load(model).encode("text", ["A badger."])


# ----- weight decay: declared by the model -----------------------------------------------------


def _substring_groups(module: nn.Module) -> tuple[list[int], list[int]]:
    """The rule the trainer used before the model declared its no-decay weights."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "token" not in name and "positions" not in name else no_decay).append(id(p))
    return decay, no_decay


def test_no_weight_decay_gives_exactly_the_groups_of_the_old_name_rule() -> None:
    facts = {"text": {"feature_dim": 12, "max_tokens": 5, "language_slice": [0, 6]},
             "image": {"feature_dim": 10, "max_tokens": 3},
             "depth": {"feature_dim": 8, "max_tokens": 1}}
    adapters = {"text": AdapterConfig(hidden=0), "image": AdapterConfig(positions=False, language_head=True),
                "depth": AdapterConfig(hidden=16)}
    model = build_model(ProjectionConfig(d_model=8, heads=2, language_prior=0.3), facts, adapters)
    model.lock_adapter("depth")
    objective = nn.ModuleDict({"model": model, "loss": create_loss("infonce")})  # as PairObjective holds them
    assert "adapters.text.modality_token" in model.no_weight_decay()
    assert "adapters.image.positions" not in model.no_weight_decay()  # positions off
    groups = _param_groups(objective, 0.05)
    decay, no_decay = _substring_groups(objective)
    assert [id(p) for p in groups[0]["params"]] == decay and [id(p) for p in groups[1]["params"]] == no_decay
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(decay) > 5 and len(no_decay) > 5
