"""A small caption decoder conditioned on one shared-space embedding (ClipCap / CapDec style).

The embedding is mapped to ``prefix_len`` prefix vectors; a causal Transformer reads the
prefix and the caption so far and predicts the next word. Words come from a vocabulary
built from the training captions (:class:`Vocabulary`), so the decoder is small and its
training is quick on a CPU; it writes only words it has seen in text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_CLOSING, _OPENING = set(".,;:!?)]%"), set("([")  # written without a space before / after


def caption_tokens(text: str) -> list[str]:
    """``"A Tamworth pig."`` -> ``["a", "tamworth", "pig", "."]`` (lower case; punctuation kept)."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word ids: the four specials, then every training word, most frequent first."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_captions(cls, captions: Sequence[str], min_count: int = 1) -> "Vocabulary":
        counts: dict[str, int] = {}
        for caption in captions:
            for token in caption_tokens(caption):
                counts[token] = counts.get(token, 0) + 1
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str, max_len: int) -> list[int]:
        """Word ids of ``caption`` then ``<eos>``, at most ``max_len`` ids in all."""
        ids = [self.index.get(t, UNK) for t in caption_tokens(caption)][: max_len - 1]
        return ids + [EOS]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to ``<eos>`` as a sentence: capitalised, no space before punctuation."""
        words = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.words[i])
        text = ""
        for w in words:
            glued = not text or w in _CLOSING or text[-1] in _OPENING
            text += w if glued else " " + w
        return text[:1].upper() + text[1:]


@dataclass
class DecoderConfig:
    """Shapes of a :class:`CaptionDecoder` (recorded in the model directory)."""

    embed_dim: int
    vocab_size: int
    width: int = 256
    layers: int = 2
    heads: int = 4
    prefix_len: int = 4
    max_len: int = 24
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CaptionDecoder(nn.Module):
    """Next-word logits of a caption given a unit-length shared-space embedding."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.prefix = nn.Sequential(nn.Linear(config.embed_dim, w * config.prefix_len), nn.Tanh())
        self.words = nn.Embedding(config.vocab_size, w, padding_idx=PAD)
        self.positions = nn.Parameter(torch.zeros(config.prefix_len + config.max_len, w))
        layer = nn.TransformerEncoderLayer(w, config.heads, 4 * w, config.dropout, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, config.vocab_size)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, embedding: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for the word after each of ``ids`` ``[B, T]`` (ids start with ``<bos>``)."""
        b, t = ids.shape
        p = self.config.prefix_len
        x = torch.cat([self.prefix(embedding).view(b, p, -1), self.words(ids)], dim=1)
        x = x + self.positions[: p + t]
        causal = torch.ones(p + t, p + t, dtype=torch.bool, device=ids.device).triu(1)  # True: not attended
        y = self.body(x, mask=causal, src_key_padding_mask=torch.cat(
            [torch.zeros(b, p, dtype=torch.bool, device=ids.device), ids == PAD], dim=1))
        return self.head(self.norm(y[:, p:]))

    def _unroll(self, embedding: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor],
                max_len: int | None) -> list[list[int]]:
        """Word ids for each row of ``embedding``, one ``pick(next-word logits [B, V]) -> [B]`` per step,
        until every row has written ``<eos>`` (rows that have are padded)."""
        ids = torch.full((embedding.shape[0], 1), BOS, dtype=torch.long, device=embedding.device)
        done = torch.zeros(embedding.shape[0], dtype=torch.bool, device=embedding.device)
        for _ in range(max_len or self.config.max_len):
            nxt = pick(self(embedding, ids)[:, -1])
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return [row[1:].tolist() for row in ids]

    @torch.no_grad()
    def greedy(self, embedding: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
        """The most likely word at each step, for a batch ``[B, d]``."""
        return self._unroll(embedding, lambda logits: logits.argmax(-1), max_len)

    @torch.no_grad()
    def beam(self, embedding: torch.Tensor, width: int = 3, max_len: int | None = None,
             length_penalty: float = 0.7) -> list[list[list[int]]]:
        """Beam search per embedding: the ``width`` best captions of each, best first, scored by
        log-probability over length ** ``length_penalty``."""
        max_len = max_len or self.config.max_len
        out = []
        for e in embedding:
            beams: list[tuple[float, list[int]]] = [(0.0, [BOS])]
            finished: list[tuple[float, list[int]]] = []
            for _ in range(max_len):
                ids = torch.tensor([b[1] for b in beams], device=embedding.device)
                logp = self(e[None].expand(len(beams), -1), ids)[:, -1].log_softmax(-1)
                top = logp.topk(width, dim=-1)
                grown = [(score + float(v), seq + [int(i)]) for (score, seq), vs, ix in
                         zip(beams, top.values, top.indices) for v, i in zip(vs, ix)]
                grown.sort(key=lambda c: -c[0])
                beams = []
                for score, seq in grown:
                    if seq[-1] == EOS:
                        finished.append((score / (len(seq) - 1) ** length_penalty, seq))
                    elif len(beams) < width:
                        beams.append((score, seq))
                if len(finished) >= width or not beams:
                    break
            finished += [(s / (len(q) - 1) ** length_penalty, q) for s, q in beams]
            finished.sort(key=lambda c: -c[0])
            out.append([seq[1:] for _, seq in finished[:width]])
        return out

    @torch.no_grad()
    def sample(self, embedding: torch.Tensor, n: int, temperature: float = 1.0, top_p: float = 0.9,
               generator: torch.Generator | None = None, max_len: int | None = None) -> list[list[list[int]]]:
        """``n`` nucleus samples per embedding (``top_p`` of the probability, at ``temperature``)."""

        def nucleus(logits: torch.Tensor) -> torch.Tensor:
            sorted_p, order = (logits / temperature).softmax(-1).sort(-1, descending=True)
            sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
            return order.gather(-1, choice).squeeze(-1)

        return [self._unroll(e[None].expand(n, -1), nucleus, max_len) for e in embedding]


def batch_ids(vocab: Vocabulary, captions: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs (``<bos>`` + words) and targets (words + ``<eos>``), padded: ``[B, T]`` each."""
    encoded = [vocab.encode(c, max_len) for c in captions]
    width = max(len(e) for e in encoded)
    inputs = torch.full((len(encoded), width), PAD, dtype=torch.long)
    targets = torch.full((len(encoded), width), PAD, dtype=torch.long)
    for row, ids in enumerate(encoded):
        inputs[row, : len(ids)] = torch.tensor([BOS] + ids[:-1])
        targets[row, : len(ids)] = torch.tensor(ids)
    return inputs, targets
