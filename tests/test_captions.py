"""The caption decoder: vocabulary, decoding, text-only training, the model directory, the commands.

Plumbing only: a tiny decoder on a few real Tux Paint captions. Caption quality is measured
in docs/results.md ("Generation"), with the real training recipe.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import oneencoder
from oneencoder.apps.captions import DECODER_TRAIN, evaluate_captions, fit_decoder
from oneencoder.cli.main import app
from oneencoder.errors import OneEncoderError
from oneencoder.generation.decoder import EOS, CaptionDecoder, DecoderConfig, Vocabulary, batch_ids, caption_tokens
from oneencoder.generation.train import CaptionData, train_captioner
from oneencoder.model.checkpoint import read_meta, verify_files
from oneencoder.training.config import TrainConfig

TINY = {"width": 32, "layers": 1, "heads": 2, "prefix_len": 2, "max_len": 12, "dropout": 0.0}
runner = CliRunner()


def test_vocabulary_round_trip(small_records: list[dict]) -> None:
    captions = [r["caption"] for r in small_records]
    vocab = Vocabulary.from_captions(captions)
    assert caption_tokens("A Tamworth pig.") == ["a", "tamworth", "pig", "."]
    for caption in captions:  # the words survive; spacing around dashes may not
        ids = vocab.encode(caption, 40)
        assert ids[-1] == EOS and caption_tokens(vocab.decode(ids)) == caption_tokens(caption)[:39]
    assert vocab.decode(vocab.encode("An albino peahen (a female peafowl, or peacock).", 40)) == \
        "An albino peahen (a female peafowl, or peacock)."
    assert vocab.decode(vocab.encode("A zyzzyva.", 40)) == "A <unk>."
    inputs, targets = batch_ids(vocab, captions[:3], 40)
    words = targets[:, :-1] > EOS  # teacher forcing: the input at t + 1 is the target at t
    assert inputs.shape == targets.shape and bool((inputs[:, 0] == 1).all())
    assert torch.equal(inputs[:, 1:][words], targets[:, :-1][words])


def test_decoding_shapes_and_determinism() -> None:
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(embed_dim=8, vocab_size=20, **TINY)).eval()
    e = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    greedy = decoder.greedy(e)
    assert len(greedy) == 3 and all(len(ids) <= TINY["max_len"] for ids in greedy)
    beams = decoder.beam(e, width=3)
    assert len(beams) == 3 and all(1 <= len(b) <= 3 for b in beams)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert decoder.sample(e, 2, generator=g()) == decoder.sample(e, 2, generator=g())


def test_text_only_training_learns_the_captions(small_records: list[dict], tmp_path: Path) -> None:
    """With a distinct embedding per caption, the decoder writes each training caption back."""
    captions = list(dict.fromkeys(r["caption"] for r in small_records))[:12]
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(captions), 16), dim=-1)
    data = CaptionData(captions, emb, emb[:4], [[c] for c in captions[:4]])
    train = TrainConfig(epochs=60, batch_size=6, lr=3e-3, warmup_steps=5, patience=60, log_every=100, device="cpu")
    captioner, score = train_captioner(data, tmp_path / "run", noise_std=0.0, train=train, config=TINY,
                                       progress=False)
    written = [c[0] for c in captioner.describe(emb, beam=1)]
    room = TINY["max_len"] - 1  # words a caption keeps before its <eos>
    same = [caption_tokens(w) == caption_tokens(c)[:room] for w, c in zip(written, captions)]
    assert sum(same) >= 10, written
    assert score > 5.0  # CIDEr-D of the 4 validation captions, decoded from their own embeddings
    assert captioner.nearest(emb[:3]) == captions[:3]
    again, _ = train_captioner(data, tmp_path / "run", noise_std=0.0, train=train, config=TINY, progress=False)
    assert [c[0] for c in again.describe(emb, beam=1)] == written  # a finished run resumes to the same best


@pytest.fixture(scope="module")
def captioned_model(trained_model: dict, small_records: list[dict], small_cache: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("captioned") / "model"
    shutil.copytree(trained_model["dir"], model)
    m = oneencoder.load(model, device="cpu")
    train = dataclasses.replace(DECODER_TRAIN, epochs=2, warmup_steps=2, device="cpu")
    info = fit_decoder(m, small_records, small_cache, noise_grid=(0.0, 0.02), train=train, progress=False,
                       log=lambda line: None)
    assert set(info["val_cider_d_by_noise"]) == {"0", "0.02"} and info["projection"] in ("none", "memory")
    assert "image" in evaluate_captions(m, small_records, small_cache, "val")  # the same m: as train-decoder runs
    return model


def test_the_decoder_is_part_of_the_model(captioned_model: Path, small_records: list[dict], small_cache: Path) -> None:
    meta = read_meta(captioned_model)
    assert {"decoder/decoder.safetensors", "decoder/memory.safetensors", "decoder/decoder.json"} <= set(meta["files"])
    verify_files(captioned_model, meta)
    m = oneencoder.load(captioned_model, device="cpu")
    image = next(r["image"] for r in small_records if r["split"] == "test")
    found = m.caption("image", [image], n=2, beam=3)
    assert len(found) == 1 and len(found[0]) == 2 and all(isinstance(c, str) and c for c in found[0])
    assert m.caption("image", [image], sample=True, n=2, seed=1) == m.caption("image", [image], sample=True, n=2, seed=1)
    results = evaluate_captions(m, small_records, small_cache, "test")
    assert set(results) == {"image"}
    for row in ("decoder", "retrieval", "prior"):
        assert set(results["image"][row]) >= {"BLEU-4", "CIDEr-D", "WER"}
    out = runner.invoke(app, ["info", str(captioned_model)])
    assert out.exit_code == 0 and "caption decoder:" in out.output


def test_caption_command_and_a_model_without_decoder(captioned_model: Path, trained_model: dict,
                                                     small_records: list[dict]) -> None:
    image = next(r["image"] for r in small_records if r["split"] == "test")
    result = runner.invoke(app, ["caption", "--model", str(captioned_model), "--file", image, "--text", "A badger.",
                                 "-n", "2", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["results"]
    assert [r["modality"] for r in rows] == ["text", "image"] and all(len(r["captions"]) == 2 for r in rows)
    bare = runner.invoke(app, ["caption", "--model", str(trained_model["dir"]), "--text", "A badger."])
    assert bare.exit_code == 2 and "holds no caption decoder; train one with `oneencoder train-decoder" in bare.output
    with pytest.raises(OneEncoderError, match="holds no caption decoder"):
        oneencoder.load(trained_model["dir"]).caption("text", ["A badger."])


def test_eval_generate_reports_captions_beside_retrieval(captioned_model: Path, trained_model: dict,
                                                         small_manifest: Path, small_cache: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", "--manifest", str(small_manifest), "--cache-dir", str(small_cache), "--generate", "--out", str(out)]
    result = runner.invoke(app, args + ["--model", str(captioned_model)])
    assert result.exit_code == 0, result.output
    assert "captions on the test split" in result.output and "image→text" in result.output
    generation = json.loads(out.read_text())["generation"]["image"]
    assert generation["n"] > 0 and {"decoder", "retrieval", "prior"} <= set(generation)
    assert 0.0 <= generation["decoder"]["CIDEr-D"] and 0.0 <= generation["prior"]["WER"]
    bare = runner.invoke(app, args + ["--model", str(trained_model["dir"])])
    assert bare.exit_code == 2 and "holds no caption decoder" in bare.output


def test_retraining_stage_one_drops_the_decoder(captioned_model: Path, small_manifest: Path, small_cache: Path,
                                                make_config, tmp_path: Path) -> None:
    from oneencoder.training.stage import run_stage

    model = tmp_path / "model"
    shutil.copytree(captioned_model, model)
    run_stage(make_config(small_manifest, small_cache, epochs=1), model, overwrite=True, resume=False, progress=False)
    meta = read_meta(model)
    assert "decoder" not in meta and not any(rel.startswith("decoder/") for rel in meta["files"])
