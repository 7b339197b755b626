"""The modality registry: every registered modality is well formed and strict about options."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from oneencoder.errors import ConfigError
from oneencoder.registry import (
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
    assert isinstance(spec.feature_dim, int) and spec.feature_dim > 0
    assert isinstance(spec.max_tokens, int) and spec.max_tokens > 0
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
        "import oneencoder; from oneencoder.config import load_stage; "
        "assert callable(oneencoder.load); print(load_stage('image_text').name)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "image_text"
