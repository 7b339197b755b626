"""The docs site: ``mkdocs build --strict`` over docs/ (what ``make docs`` runs) passes, every page
is in the nav, and the same settings fail a build on a broken link or anchor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "mkdocs.yml"
DOCS = REPO / "docs"


def _pages(nav: Any) -> list[str]:
    """Every page a nav names, in order (entries are ``{title: page}`` or ``{title: [entries]}``)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _pages(value)]
    return []


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d",
                           str(site)], capture_output=True, text=True, env=env, timeout=300)


def _config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_the_nav_lists_every_page_of_docs_once() -> None:
    listed = _pages(_config()["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert not sorted(set(pages) - set(listed)), f"add these pages to the nav in mkdocs.yml: {sorted(set(pages) - set(listed))}"
    assert not sorted(set(listed) - set(pages)), f"mkdocs.yml names pages docs/ lacks: {sorted(set(listed) - set(pages))}"
    assert len(listed) == len(set(listed)) and listed[0] == "README.md"


def test_the_site_builds_with_strict(tmp_path: Path) -> None:
    built = _build(CONFIG, tmp_path / "site")
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()  # docs/README.md is the home page
    assert "preprocess_image" in (tmp_path / "site" / "export" / "index.html").read_text(encoding="utf-8")


def test_the_same_settings_fail_on_a_broken_link_or_anchor(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README.md").write_text("# Home\n\nSee [the other page](other.md#usage) and [a lost one](lost.md).\n")
    (docs / "other.md").write_text("# Other\n\n## Setup\n\nNothing here.\n")
    config = {**_config(), "docs_dir": str(docs), "nav": [{"Home": "README.md"}, {"Other": "other.md"}]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    built = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "'lost.md'" in built.stderr and "'#usage'" in built.stderr, built.stderr[-3000:]
