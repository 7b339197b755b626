"""The core names no specific modality: that knowledge lives in modalities/, the manifest or datasets/."""

from __future__ import annotations

import ast
from pathlib import Path

from oneencoder.modality import list_modalities

REPO = Path(__file__).resolve().parent.parent
CORE = sorted((REPO / "oneencoder").glob("*.py")) + sorted((REPO / "oneencoder" / "curriculum").glob("*.py"))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_core_has_no_literal_modality_names() -> None:
    names = set(list_modalities())
    assert {"text", "image", "audio", "molecule", "depth", "video"} <= names
    found = []
    for path in CORE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstring_nodes(tree)
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs]
    assert len(CORE) > 20 and not found, "\n".join(found)


def test_inference_api_does_not_import_the_trainer() -> None:
    tree = ast.parse((REPO / "oneencoder" / "api.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and not imported & {"train", "stage", "oneencoder.train", "oneencoder.stage"}
