"""Composed queries on a held-out task: find an emoji in an art style never trained on.

For every emoji of the held-out EmojiOne style (``heldout = "style"`` rows of a manifest
made as in docs/results.md, "Sources added one at a time"), the same emoji in the Noto
style (``heldout = "concept"``) and its name are the query; the gallery is every held-out
EmojiOne image. Three queries are compared side by side, R@1/5/10 and chance:

* the Noto image alone (image→image across styles),
* the name alone (text→image),
* both, composed as ``OneEncoder.compose`` does: ``normalize(w·image + (1-w)·text)``.

The weights are not tuned: ``--weight`` (default 0.5, the plain mean) is fixed before
looking, since the task has no validation split of its own.

    .venv/bin/python benchmarks/composed_query.py --model outputs/v2/model-lit \
        --manifest outputs/v2/tp_emojitest.jsonl --cache-dir outputs/v2/cache_l2p
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import oneencoder  # noqa: E402
from oneencoder.data.manifest import read_manifest  # noqa: E402
from oneencoder.features.lookup import CachedFeatures  # noqa: E402


def recall(query: torch.Tensor, gallery: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Row i of ``query`` should find row i of ``gallery``."""
    scores = query @ gallery.t()
    rank = (scores > scores.diagonal()[:, None]).sum(1)  # how many beat the true match
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None, help="Reuse these cached backbone features.")
    parser.add_argument("--weight", type=float, default=0.5, help="Weight of the image part (text: 1 - w).")
    args = parser.parse_args()

    rows = read_manifest(args.manifest)
    noto = {r["codepoints"]: r for r in rows if r.get("heldout") == "concept"}
    targets = [r for r in rows if r.get("heldout") == "style" and r.get("codepoints") in noto]
    if not targets:
        raise SystemExit(f"error: {args.manifest} has no held-out style rows with a Noto counterpart")
    m = oneencoder.load(args.model, device="cpu")
    with CachedFeatures(m.modality("image"), args.cache_dir) as cache:
        gallery = m.encode("image", [r["image"] for r in targets], cache=cache)
        image = m.encode("image", [noto[r["codepoints"]]["image"] for r in targets], cache=cache)
    text = m.encode("text", [r["caption"] for r in targets])
    w = args.weight
    composed = torch.nn.functional.normalize(w * image + (1 - w) * text, dim=-1)
    n = len(targets)
    results = {"n": n, "chance R@1": 1 / n, "weight": w,
               "image alone": recall(image, gallery), "text alone": recall(text, gallery),
               "image + text": recall(composed, gallery)}
    for name in ("image alone", "text alone", "image + text"):
        print(f"{name:13s} " + "  ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
    best = max(results["image alone"]["R@1"], results["text alone"]["R@1"])
    print(f"composed / best single part, R@1: {results['image + text']['R@1'] / max(best, 1e-9):.2f}x "
          f"(n {n}, chance R@1 {1 / n:.4f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
