"""The package layout mirrors the data flow: imports run only down it, no core module names a
modality, and modalities/, cli/ and stages/ live in the ``oneencoder`` namespace whether the
package is installed editable or from a wheel."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import oneencoder
from oneencoder.modality import list_modalities

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "oneencoder"
CORE = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")
# Builders of named real data sets (Tux Paint stamps, openclipart, pybullet renders) name the
# modalities they write; everything else in the core learns them from the registry.
NAMES_MODALITIES = {PACKAGE / "data" / "sources"}

# Lowest first: a module imports its own layer and the layers below it, never one above.
LAYERS = ["utilities", "data", "features", "model", "evaluation", "training", "generation", "apps"]
UTILITIES = {"deps", "errors", "fileio", "modality", "names", "options", "progress", "registry", "runtime"}
OUTSIDE = {"modalities", "cli", "stages"}  # installed in the namespace, above the core


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    top = module.split(".")[1]
    return top if top in LAYERS or top in OUTSIDE else "utilities" if top in UTILITIES else "?"


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import from the package, relative ones resolved."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            out += ([(node.lineno, f"{target}.{a.name}") for a in node.names] if node.module is None
                    else [(node.lineno, target)])
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in out if name.split(".")[0] == "oneencoder" and "." in name]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_every_core_module_belongs_to_a_documented_layer() -> None:
    unplaced = [str(p.relative_to(REPO)) for p in CORE if _layer(_module(p)) == "?"]
    assert len(CORE) > 40 and not unplaced, f"add these to a subpackage or to UTILITIES: {unplaced}"
    for layer in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"oneencoder/{layer}/__init__.py must say what it owns and may import"


def test_imports_run_down_the_pipeline() -> None:
    upward = []
    for path in CORE:
        mine = _layer(_module(path))
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs in OUTSIDE or LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{path.relative_to(REPO)}:{line} ({mine}) imports {target} ({theirs})")
    assert not upward, "\n".join(upward)


def test_core_has_no_literal_modality_names() -> None:
    names = set(list_modalities())
    assert {"text", "image", "audio", "molecule", "depth", "video"} <= names
    found = []
    for path in CORE:
        if any(folder in path.parents for folder in NAMES_MODALITIES):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstring_nodes(tree)
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs]
    assert any("serve" in p.parts for p in CORE) and not found, "\n".join(found)


def test_inference_api_does_not_import_the_trainer() -> None:
    imported = [name for _, name in _imports(PACKAGE / "apps" / "api.py")]
    assert imported and not [name for name in imported if _layer(name) == "training"], imported


def test_the_editable_install_maps_the_top_level_folders_into_the_namespace() -> None:
    import oneencoder.cli.main
    import oneencoder.modalities.image
    import oneencoder.stages

    assert Path(oneencoder.modalities.image.__file__).resolve() == REPO / "modalities" / "image.py"
    assert Path(oneencoder.cli.main.__file__).resolve() == REPO / "cli" / "main.py"
    assert (REPO / "stages" / "image_text.toml").is_file() and Path(oneencoder.__file__).parent == PACKAGE
    assert "modalities" not in sys.modules and "cli" not in sys.modules  # nothing leaks at the top level


@pytest.mark.slow
def test_a_wheel_installs_the_same_namespace(tmp_path: Path) -> None:
    """Build a wheel, unpack it away from the checkout, import from it alone."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ into the tree it builds
    for name in ("oneencoder", "modalities", "cli", "stages"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("oneencoder-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("oneencoder/modalities/image.py", "oneencoder/cli/main.py", "oneencoder/stages/image_text.toml",
                     "oneencoder/data/manifest.schema.json", "oneencoder/apps/serve/page.html",
                     "oneencoder/training/curriculum/pacers.py", "oneencoder/data/sources/tuxpaint.py"):
        assert expected in names, expected
    assert not [n for n in names if n.split("/")[0] in {"modalities", "cli", "stages", "tests"}]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import oneencoder, oneencoder.modalities.image, oneencoder.cli.main, oneencoder.apps.serve.app\n"
             "from importlib import resources\n"
             "assert resources.files('oneencoder.stages').joinpath('image_text.toml').is_file()\n"
             "from oneencoder.data.manifest import manifest_schema; assert manifest_schema()\n"
             "print(oneencoder.__file__, oneencoder.modalities.image.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: isolated mode, so neither the checkout nor the editable install can answer the imports.
    ran = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n{probe}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == [str(site / "oneencoder" / "__init__.py"),
                                  str(site / "oneencoder" / "modalities" / "image.py")]
