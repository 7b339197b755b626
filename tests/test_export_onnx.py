"""ONNX export: onnxruntime against PyTorch to 1e-4, on the trained model's real features and raw text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import oneencoder
from oneencoder.apps.export import TOLERANCE, export_full, export_head
from oneencoder.cli.main import app
from oneencoder.model.parts import AdapterConfig, ProjectionConfig, build_model

pytestmark = pytest.mark.bytes  # ONNX against PyTorch, to a stated tolerance (docs/reliability.md)

ort = pytest.importorskip("onnxruntime")


def _run(path: Path, **inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], inputs)[0]


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory) -> dict:
    """``oneencoder export onnx`` of the session's model, and its text graph with the backbone.

    The image graph with its backbone is left out here to keep the suite fast (its export
    takes ~10-20 s on 2 cores); ``export_onnx`` checks its parity the same way when it runs.
    """
    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(trained_model["dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = oneencoder.load(trained_model["dir"], device="cpu")
    full = export_full(model, "text", out / "text-full.onnx")
    return {"out": out, "output": result.output, "model": model, "full": full}


def test_export_writes_heads_with_recorded_parity(exported) -> None:
    out = exported["out"]
    report = json.loads((out / "export.json").read_text())
    files = {g["file"]: g for g in report["graphs"]}
    assert set(files) == {"image-head.onnx", "text-head.onnx"}  # every modality of the model
    assert all(g["max_abs_diff"] <= TOLERANCE and g["kind"] == "head" for g in files.values())
    assert report["embed_dim"] == exported["model"].model.embed_dim
    assert report["space"]["text"]["projection"] == exported["model"].meta["files"]["projection.safetensors"]
    assert f"wrote {out / 'text-head.onnx'}: text (tokens + mask) -> " in exported["output"]
    full = exported["full"]
    assert full["max_abs_diff"] <= TOLERANCE
    assert full["inputs"] == {"input_ids": ["batch", "axis1"], "attention_mask": ["batch", "axis1"]}


def test_heads_match_pytorch_on_real_backbone_features(exported, small_records) -> None:
    m = exported["model"]
    for modality, values in (("image", [r["image"] for r in small_records[:5]]),
                             ("text", [r["caption"] for r in small_records[:5]])):
        mod = m.modality(modality)
        tokens, mask = mod.featurize(m._backbone(modality), [mod.prepare(v)[1] for v in values])
        expected = m.encode_features(modality, tokens, mask).numpy()
        got = _run(exported["out"] / f"{modality}-head.onnx", tokens=tokens.numpy(), mask=mask.numpy())
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(got[:1], _run(exported["out"] / f"{modality}-head.onnx",
                                                 tokens=tokens[:1].numpy(), mask=mask[:1].numpy()), atol=1e-6)


def test_text_graph_runs_with_onnxruntime_and_tokenizers_alone(exported) -> None:
    """What docs/export.md shows: no torch, no oneencoder, only onnxruntime and tokenizers."""
    from tokenizers import Tokenizer

    from oneencoder.apps.export import _preprocessing

    out, m = exported["out"], exported["model"]
    meta = _preprocessing(m, "text", out)  # what export.json records with --with-backbone
    texts = ["A badger.", "A red apple on a wooden table, seen from above.", "Two cats."]
    tok = Tokenizer.from_file(str(out / meta["tokenizer"] / "tokenizer.json"))
    tok.enable_truncation(meta["options"]["max_tokens"])
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    att = np.array([e.attention_mask for e in enc], dtype=np.int64)
    got = _run(out / "text-full.onnx", input_ids=ids, attention_mask=att)
    np.testing.assert_allclose(got, m.encode("text", texts).numpy(), atol=TOLERANCE, rtol=0)


def test_a_multi_token_head_with_a_predicted_language_vector_has_dynamic_axes(tmp_path: Path) -> None:
    """A random model (shapes only): padded token sequences of any length up to max_tokens."""
    torch.manual_seed(0)
    facts = {"a": {"feature_dim": 40, "max_tokens": 12, "language_slice": (0, 16)},
             "b": {"feature_dim": 24, "max_tokens": 9, "language_slice": None},
             "c": {"feature_dim": 8, "max_tokens": 5}}
    adapters = {"a": AdapterConfig(hidden=32), "b": AdapterConfig(hidden=16, language_head=True),
                "c": AdapterConfig(positions=False)}
    model = build_model(ProjectionConfig(d_model=32, layers=2, heads=4, language_prior=0.5),
                        facts, adapters).eval()
    assert model.prior.sources == {"a": "slice", "b": "head", "c": "none"}
    g = torch.Generator().manual_seed(1)
    for name in ("b",):  # MLP, positions, a predicted language vector; the trained heads slice theirs
        f = facts[name]
        entry = export_head(model, name, f["feature_dim"], f["max_tokens"], tmp_path / f"{name}.onnx")
        assert entry["max_abs_diff"] <= TOLERANCE
        for batch, length in ((1, f["max_tokens"]), (6, 3), (2, 1)):
            tokens = torch.randn(batch, length, f["feature_dim"], generator=g)
            mask = torch.rand(batch, length, generator=g) > 0.3
            mask[:, 0] = True
            with torch.no_grad():
                expected = model(name, tokens, mask).numpy()
            got = _run(tmp_path / f"{name}.onnx", tokens=tokens.numpy(), mask=mask.numpy())
            np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_export_user_errors(trained_model, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(trained_model["dir"]), "--out",
                                      str(tmp_path), "--modality", "audio"])
    assert result.exit_code == 2 and result.output.startswith("error: this model holds no 'audio' modality")
