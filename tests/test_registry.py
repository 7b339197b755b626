"""The modality registry: every registered modality is well formed and strict about options."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from oneencoder.errors import ConfigError
from oneencoder.modality import (
                                 Modality,
                                 ModalitySpec,
                                 create_modality,
                                 get_modality_class,
                                 list_modalities,
                                 register_modality,
                                 )

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
NAMES = list_modalities()


def test_builtins_are_registered() -> None:
    assert {"image", "text"} <= set(NAMES)
    assert NAMES == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_spec_fields_are_sane(name: str) -> None:
    cls = get_modality_class(name)
    spec = cls.spec
    assert isinstance(spec, ModalitySpec)
    assert spec.name == name
    assert isinstance(spec.backbone, str) and spec.backbone
    assert spec.metric_style in ("recall", "ranking") and isinstance(spec.reads_files, bool)
    assert isinstance(spec.preprocess_version, str) and spec.preprocess_version
    assert isinstance(spec.record_key, str) and spec.record_key
    assert spec.default_anchor is None or (spec.default_anchor in NAMES and spec.default_anchor != name)
    assert isinstance(spec.extra_deps, tuple)
    # The default backbone option agrees with the spec.
    assert cls.default_options.get("backbone", spec.backbone) == spec.backbone


@pytest.mark.parametrize("name", NAMES)
def test_create_with_defaults(name: str) -> None:
    m = create_modality(name)
    assert isinstance(m, Modality)
    assert m.spec.name == name
    assert m.options == m.default_options
    assert m.backbone_id == m.spec.backbone
    assert m.feature_dim > 0 and m.max_tokens > 0
    fp = m.fingerprint()
    # The fingerprint is stored as JSON in every cache: it must serialise and identify the modality.
    assert json.loads(json.dumps(fp, sort_keys=True)) == fp
    assert fp["modality"] == name
    assert fp["feature_dim"] == m.feature_dim and fp["max_tokens"] == m.max_tokens
    assert len(fp["weights_sha256"]) == 64
    # Same options, same fingerprint (caches are reusable across processes).
    assert create_modality(name).fingerprint() == fp


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="definitely_not_an_option"):
        create_modality(name, definitely_not_an_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_option_of_the_wrong_type_is_a_config_error(name: str) -> None:
    """Options are typed by their defaults: a string where a number or a table belongs names the option."""
    cls = get_modality_class(name)
    key, default = next((k, v) for k, v in cls.default_options.items() if not isinstance(v, str))
    with pytest.raises(ConfigError, match=key):
        create_modality(name, **{key: "not-a-" + type(default).__name__})


def test_builtins_are_found_through_their_entry_points() -> None:
    """The built-ins are declared like any plugin: entry point name = modality, value = its class."""
    from importlib.metadata import entry_points

    from oneencoder.registry import class_path

    declared = {ep.name: ep.value for ep in entry_points(group="oneencoder.modalities")}
    for name in NAMES:
        assert declared.get(name) == class_path(get_modality_class(name))


def test_one_registry_serves_losses_pacers_and_scorers() -> None:
    from oneencoder.training.curriculum.pacers import PACERS
    from oneencoder.training.curriculum.scorers import SCORERS
    from oneencoder.model.losses import LOSSES
    from oneencoder.modality import MODALITIES
    from oneencoder.registry import Registry

    for registry in (LOSSES, PACERS, SCORERS, MODALITIES):
        assert isinstance(registry, Registry) and registry.names()
    with pytest.raises(ConfigError, match="init_temperature"):
        LOSSES.create("infonce", init_temperature="warm")
    with pytest.raises(ConfigError, match="unknown pacer 'nope'"):
        PACERS.create("nope")
    assert PACERS.create("linear", start=1).start == 1.0  # an int where a float belongs is fine


def test_unknown_modality_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no-such-modality"):
        create_modality("no-such-modality")


def test_registering_a_second_class_under_a_taken_name_fails() -> None:
    existing = get_modality_class("text")

    class Impostor(existing):  # type: ignore[misc, valid-type]
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_modality(Impostor)
    assert get_modality_class("text") is existing
    # Re-registering the same class is a no-op.
    assert register_modality(existing) is existing


@pytest.mark.parametrize("name,bad", [("text", {"tokens": "bogus"}), ("image", {"tokens": "bogus"})])
def test_invalid_option_value_is_a_config_error(name: str, bad: dict) -> None:
    with pytest.raises(ConfigError, match="tokens"):
        create_modality(name, **bad)


def _run_outside_checkout(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_PYTHON), "-c", code], cwd="/tmp", capture_output=True, text=True, timeout=120)


def test_top_level_modalities_package_is_not_importable() -> None:
    """The installed package exposes ``oneencoder.modalities`` only; ``modalities`` must not leak."""
    proc = _run_outside_checkout("import modalities")
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr and "modalities" in proc.stderr


def test_namespaced_modalities_import_outside_checkout() -> None:
    proc = _run_outside_checkout(
        "import oneencoder.modalities.text, oneencoder.modalities.image, oneencoder.cli.main; print('ok')"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_installed_package_works_outside_checkout() -> None:
    proc = _run_outside_checkout(
        "import oneencoder; from oneencoder.training.config import load_stage; "
        "assert callable(oneencoder.load); print(load_stage('image_text').name)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "image_text"
