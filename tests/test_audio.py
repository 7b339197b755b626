"""Audio modality: the real aisfx CNN on real Tux Paint sound effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oneencoder.errors import SampleError
from oneencoder.modalities import audio as audio_mod
from oneencoder.modality import create_modality

ANIMALS = Path("/usr/share/tuxpaint/stamps/animals")
FROG = ANIMALS / "amphibians" / "frog.ogg"  # ~1.5 s: one window
BADGER = ANIMALS / "mammals" / "badger.ogg"  # ~7 s: three windows
PIG = ANIMALS / "mammals" / "pig_golden2.ogg"  # ~0.33 s: far under 100 frames

pytestmark = pytest.mark.skipif(not FROG.exists(), reason="Tux Paint stamps are not installed")


@pytest.fixture(scope="module")
def audio():
    return create_modality("audio")


@pytest.fixture(scope="module")
def backbone(audio):
    return audio.load_backbone()


def _embed(audio, backbone, *sources):
    batch = audio.collate([audio.preprocess(audio.load(s)) for s in sources])
    return audio.encode(backbone, batch)


def test_weights_load_only_with_weights_only_true(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(dict(kwargs))
        return real_load(*args, **kwargs)  # the real call still happens

    monkeypatch.setattr(torch, "load", recording_load)
    state, ds_dict = audio_mod.load_aisfx_checkpoint(audio_mod.default_weights_path())
    model, _ = audio_mod.build_aisfx_model(audio_mod.default_weights_path())
    audio_mod.AudioModality().load_backbone()
    assert calls, "torch.load was never called"
    assert all(c.get("weights_only") is True for c in calls), calls
    assert isinstance(state, dict) and isinstance(ds_dict, dict)


def test_state_dict_matches_architecture_exactly() -> None:
    model, result = audio_mod.build_aisfx_model(audio_mod.default_weights_path())
    assert result.missing_keys == [] and result.unexpected_keys == []
    n = sum(p.numel() for p in model.embedding_net.parameters())
    assert round(n / 1e6, 2) == 4.69


def test_backbone_is_frozen(backbone) -> None:
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_frog_encodes_to_finite_512d_tokens(audio, backbone) -> None:
    tokens, mask = _embed(audio, backbone, str(FROG))
    assert tokens.shape[0] == 1 and tokens.shape[2] == 512 and tokens.shape[1] >= 1
    assert mask.shape == tokens.shape[:2] and mask.all()
    assert torch.isfinite(tokens).all()
    assert tokens.abs().sum() > 0


def test_long_clip_gives_more_windows_and_padding_is_masked(audio, backbone) -> None:
    short = audio.preprocess(audio.load(str(FROG)))
    long = audio.preprocess(audio.load(str(BADGER)))
    assert short.shape[1:] == long.shape[1:] == (100, 96)
    assert long.shape[0] > short.shape[0]
    tokens, mask = audio.encode(backbone, audio.collate([short, long]))
    assert mask.sum(1).tolist() == [short.shape[0], long.shape[0]]
    assert (tokens[0, short.shape[0]:] == 0).all()  # padding windows carry no features
    # A clip's tokens do not depend on what it is batched with.
    alone, _ = audio.encode(backbone, audio.collate([short]))
    assert torch.allclose(alone[0], tokens[0, : short.shape[0]], atol=1e-5)


def test_max_windows_caps_tokens(backbone) -> None:
    capped = create_modality("audio", max_windows=2)
    assert capped.max_tokens == 2
    assert capped.preprocess(capped.load(str(BADGER))).shape[0] == 2


def test_short_clip_is_zero_padded(audio, backbone) -> None:
    raw = audio.load(str(PIG))
    assert raw.duration < 100 * audio_mod.HOP_LENGTH / audio_mod.SAMPLE_RATE
    windows = audio.preprocess(raw)
    assert windows.shape == (1, 100, 96)
    n_frames = audio_mod.log_mel(raw.waveform).shape[0]
    assert n_frames < 100 and (windows[0, n_frames:] == 0).all()
    tokens, mask = audio.encode(backbone, audio.collate([windows]))
    assert tokens.shape == (1, 1, 512) and mask.all() and torch.isfinite(tokens).all()


def test_different_animals_embed_differently(audio, backbone) -> None:
    tokens, _ = _embed(audio, backbone, str(FROG), str(ANIMALS / "birds" / "rooster.ogg"))
    a, b = tokens[0, 0], tokens[1, 0]
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.999


def test_waveform_inputs_match_file_and_resample(audio) -> None:
    from_file = audio.load(str(FROG))
    same = audio.load((from_file.waveform, 44100))
    assert np.allclose(same.waveform, from_file.waveform)
    bare = audio.load(torch.from_numpy(from_file.waveform))
    assert bare.sample_rate == 44100 and bare.waveform.shape == from_file.waveform.shape
    stereo = np.stack([from_file.waveform, from_file.waveform])[:, ::2]  # 22.05 kHz, 2 channels
    resampled = audio.load((stereo, 22050))
    assert resampled.sample_rate == 44100
    assert abs(resampled.waveform.shape[0] - from_file.waveform.shape[0]) <= 2


def test_corrupt_empty_missing_and_nan_audio_raise_sample_error(audio, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ogg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.ogg"
    empty.write_bytes(b"")
    for path in (corrupt, empty, tmp_path / "missing.ogg"):
        with pytest.raises(SampleError, match=path.name):
            audio.load(str(path))
    with pytest.raises(SampleError, match="NaN"):
        audio.load((np.array([0.0, np.nan, 0.1], dtype=np.float32), 44100))
    with pytest.raises(SampleError, match="no audio samples"):
        audio.load((np.zeros(0, dtype=np.float32), 44100))


def test_difficulty_measurements(audio) -> None:
    frog = audio.load(str(FROG))
    m = audio.difficulty(frog, torch.zeros(1, 512))
    assert set(m) == {"duration", "spectral_flatness", "onset_density", "snr_db"}
    assert all(np.isfinite(v) for v in m.values())
    assert m["duration"] == pytest.approx(1.51, abs=0.02)
    assert 0.0 <= m["spectral_flatness"] <= 1.0
    assert m["onset_density"] >= 0 and m["snr_db"] > 0
    noise = np.random.default_rng(0).standard_normal(44100).astype(np.float32) * 0.1
    n = audio.difficulty(audio.load(noise), torch.zeros(1, 512))
    assert n["spectral_flatness"] > m["spectral_flatness"]  # white noise is flat
    assert n["snr_db"] < m["snr_db"]  # stationary noise has no loud/quiet contrast


def test_spec_and_language_slice(audio) -> None:
    assert audio.spec.record_key == "sound" and audio.spec.default_anchor == "text"
    assert audio.feature_dim == 512 and audio.max_tokens == 8
    assert audio.language_slice() is None
    assert len(audio.weights_sha256()) == 64
