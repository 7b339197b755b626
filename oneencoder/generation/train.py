"""Text-only training of the caption decoder (CapDec): it learns to write each training caption
from that caption's own embedding plus Gaussian noise, so at inference it can write one for
any modality's embedding, which lands near, not on, the texts.

The generic :class:`~oneencoder.training.trainer.Trainer` drives it, so a run resumes,
stops early and logs ``metrics.jsonl`` like every stage. Validation decodes embeddings of
another modality (e.g. validation images) and scores CIDEr-D against their captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..evaluation.captions import caption_scores
from ..fileio import atomic_path
from ..runtime import pick_device
from ..training.config import TrainConfig
from ..training.curriculum.samplers import RandomBatchSampler
from ..training.trainer import Trainer
from .captioner import Captioner, most_frequent
from .decoder import PAD, CaptionDecoder, DecoderConfig, Vocabulary, batch_ids


@dataclass
class CaptionData:
    """Training captions with their embeddings, and a validation set of another modality."""

    captions: list[str]  # one per training row (repeats allowed: they weigh the prior)
    embeddings: torch.Tensor  # [N, d], the text side's unit embeddings of ``captions``
    val_embeddings: torch.Tensor  # [V, d], e.g. validation images
    val_references: list[list[str]]  # their captions


class DecoderObjective(nn.Module):
    """Next-word cross-entropy on noisy caption embeddings; what the trainer drives."""

    def __init__(self, decoder: CaptionDecoder, embeddings: torch.Tensor, inputs: torch.Tensor,
                 targets: torch.Tensor, noise_std: float, seed: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.noise_std = noise_std
        self.register_buffer("embeddings", embeddings.float(), persistent=False)
        self.register_buffer("inputs", inputs, persistent=False)
        self.register_buffer("targets", targets, persistent=False)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.embeddings[index]
        if self.training and self.noise_std > 0:  # CapDec: cover the gap between modalities
            noise = torch.randn(e.shape, generator=self.generator).to(e.device)
            e = nn.functional.normalize(e + self.noise_std * noise, dim=-1)
        inputs, targets = self.inputs[index], self.targets[index]
        width = int((targets != PAD).sum(1).max())
        logits = self.decoder(e, inputs[:, :width])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, :width].flatten(), ignore_index=PAD)
        return {"loss": loss}


def unique_memory(captions: Sequence[str], embeddings: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """One row per distinct caption (its first embedding), in first-seen order."""
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    rows = list(first.values())
    return list(first), nn.functional.normalize(embeddings[rows].float(), dim=-1)


def train_captioner(data: CaptionData, run_dir: str | Path, *, noise_std: float, train: TrainConfig,
                    config: dict | None = None, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> tuple[Captioner, float]:
    """Train one decoder; returns it (its best validation epoch) and that epoch's CIDEr-D.

    Args:
        noise_std: Per-dimension std of the Gaussian noise added to training embeddings.
        train: Epochs, batch size, learning rate, patience and seed (``[train]`` of a stage).
        config: Overrides of :class:`DecoderConfig` (width, layers, heads, prefix_len, max_len, dropout).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train.seed)
    vocab = Vocabulary.from_captions(data.captions)
    shape = DecoderConfig(embed_dim=data.embeddings.shape[1], vocab_size=len(vocab), **(config or {}))
    decoder = CaptionDecoder(shape)
    inputs, targets = batch_ids(vocab, data.captions, shape.max_len)
    objective = DecoderObjective(decoder, data.embeddings, inputs, targets, noise_std, train.seed)
    captions, memory = unique_memory(data.captions, data.embeddings)
    captioner = Captioner(decoder, vocab, memory, captions, prior=most_frequent(data.captions))
    best_path = run_dir / "best.safetensors"

    def validate() -> dict[str, float]:
        found = captioner.describe(data.val_embeddings, beam=1)
        scores = caption_scores([f[0] for f in found], data.val_references)
        return {"score": scores["CIDEr-D"], **{k: v for k, v in scores.items() if k != "CIDEr-D"}}

    def on_best(val: dict[str, float]) -> None:
        with atomic_path(best_path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(tmp))

    sampler = RandomBatchSampler(len(data.captions), train.batch_size, seed=train.seed)
    device = pick_device(train.device)
    captioner.to(device)
    trainer = Trainer(train, objective, sampler, validate, on_best, run_dir, device, progress)
    if trainer.try_resume() and log is not None:
        log(f"resuming the decoder (noise {noise_std:g}) from step {trainer.step}")
    fit = trainer.fit()
    decoder.load_state_dict(load_file(str(best_path)))
    return captioner.to("cpu"), fit.best_score
