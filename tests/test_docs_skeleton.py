"""The smallest complete modality of docs/extending.md runs as printed: registered, cached, embedded."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for
from oneencoder.modality import MODALITIES, create_modality

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def test_the_documented_skeleton_is_a_working_modality(small_records: list[dict], tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    code = re.search(r"## The smallest complete modality.*?```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_skeleton"})
        m = create_modality("thumbnail", size=8, dim=16)
        raw, item = m.prepare(small_records[0]["image"])
        tokens, mask = m.featurize(m.load_backbone(), [item, item])
        assert tokens.shape == (2, 1, 16) and bool(mask.all()) and torch.equal(tokens[0], tokens[1])
        records = [{**r, "thumbnail": r["image"]} for r in small_records[:4]]
        report = build_cache(m, records, tmp_path, progress=False)
        assert report.encoded == 4 and not report.rejects
        with FeatureCache(cache_dir_for(tmp_path, "thumbnail"), m.fingerprint(), readonly=True) as cache:
            assert len(cache) == 4
    finally:
        MODALITIES.unregister("thumbnail")  # the registry is process-wide
