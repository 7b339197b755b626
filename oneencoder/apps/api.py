"""The application API: ``m = oneencoder.load(dir); m.encode("text", ["a badger"])``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..errors import OneEncoderError, SampleError
from ..evaluation.calibration import MatchCalibration, stored_calibration
from ..features.inputs import as_batch
from ..features.runtime import check_runtime, runtime_home, with_runtime
from ..generation.captioner import Captioner, load_captioner
from ..modality import Modality
from ..model.checkpoint import load_model, modality_from_meta, read_means
from ..progress import progress_bar
from ..runtime import pick_device
from .index import SearchResult, VectorIndex, model_space
from .zeroshot import Classification, classify

if TYPE_CHECKING:
    from ..features.lookup import CachedFeatures
    from ..model.parts import OneEncoderModel

# ``progress=None`` shows a bar once the inputs span more than this many batches.
_PROGRESS_MIN_BATCHES = 8


def _reason(where: str, error: Exception) -> str:
    """One line naming the input: a ``SampleError``'s own text, else the exception's type and first line.

    A modality's loader may fail in ways it did not foresee (a decoder's own error type,
    ``MemoryError``): that is still this input's problem, as in a cache build.
    """
    if isinstance(error, SampleError):
        text = str(error)
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = f"cannot read it ({type(error).__name__}{': ' + first if first else ''})"
    return text if text.startswith(where) else f"{where}: {text}"


def _default_id(x: Any, i: int) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else str(i)


class OneEncoder:
    """A trained model directory, ready to embed any modality it holds.

    Backbones load lazily, the first time a modality is encoded.
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None, runtime: str = "torch",
                 precision: str = "fp32") -> None:
        self.model_dir = Path(model_dir)
        self.device = pick_device("auto" if device is None else str(device))
        self._set_runtime(runtime, precision)
        self.model, self.meta = load_model(self.model_dir)
        self.model.to(self.device).eval()
        self._modalities: dict[str, Modality] = {}
        self._backbones: dict[str, torch.nn.Module] = {}
        self._captioner: Captioner | None = None
        self._means: dict[str, torch.Tensor] | None = None

    def _set_runtime(self, runtime: str, precision: str) -> None:
        check_runtime(runtime, precision)
        self.runtime, self.precision = runtime, precision
        self._runners: dict[str, torch.nn.Module] = {}
        #: One line per note of the backbone runtimes: the path each modality runs on, its parity.
        self.runtime_notes: list[str] = []

    @classmethod
    def from_loaded(cls, model_dir: str | Path, model: OneEncoderModel, meta: dict[str, Any],
                    device: str | torch.device | None = None,
                    modalities: dict[str, Modality] | None = None, runtime: str = "torch",
                    precision: str = "fp32") -> "OneEncoder":
        """A model already loaded and checked (e.g. by :func:`oneencoder.training.prepare.prepare_stage`),
        without reading its files again; ``modalities``: those already recreated from ``meta``."""
        self = cls.__new__(cls)
        self.model_dir, self.model, self.meta = Path(model_dir), model, meta
        self.device = pick_device("auto" if device is None else str(device))
        self.model.to(self.device).eval()
        self._modalities, self._backbones = dict(modalities or {}), {}
        self._set_runtime(runtime, precision)
        self._captioner = None
        self._means = None
        return self

    @property
    def modalities(self) -> list[str]:
        """Names of the modalities this model can embed."""
        return list(self.meta["modalities"])

    def modality(self, name: str) -> Modality:
        if name not in self.meta["modalities"]:
            raise OneEncoderError(f"this model holds no {name!r} modality; it has {', '.join(self.modalities)}")
        if name not in self._modalities:
            self._modalities[name] = modality_from_meta(name, self.meta["modalities"][name])
        return self._modalities[name]

    def _backbone(self, name: str) -> torch.nn.Module:
        if name not in self._backbones:
            self._backbones[name] = self.modality(name).load_backbone().to(self.device)
        return self._backbones[name]

    def _runner(self, name: str) -> torch.nn.Module:
        """The backbone on this model's runtime (:mod:`oneencoder.features.runtime`), made once."""
        if name not in self._runners:
            self._runners[name] = with_runtime(self.modality(name), self._backbone(name), self.runtime,
                                               self.precision, runtime_home(), self.runtime_notes.append)
        return self._runners[name]

    @torch.no_grad()
    def encode_features(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embed cached backbone features ``[B, T, D]`` (mask ``[B, T]``, True = real token)."""
        self.modality(modality)
        if tokens.ndim == 2:
            tokens = tokens[None]
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        return self.model(modality, tokens.float().to(self.device), mask.bool().to(self.device)).float().cpu()

    def _embed(self, modality: str, inputs: Any, batch_size: int, progress: bool | None,
               on_error: Callable[[int, Any, str], None] | None = None,
               cache: "CachedFeatures | None" = None) -> tuple[torch.Tensor, list[int]]:
        """Embed ``inputs`` in batches: ``([n_kept, d] on the CPU, positions kept)``.

        A bad input raises ``SampleError`` naming it, or, with ``on_error``, is passed to
        ``on_error(position, input, reason)`` and left out. An input ``cache`` holds is
        embedded from its cached features; the backbone runs for the rest.
        """
        m = self.modality(modality)
        items = as_batch(inputs, m.input_ndim)
        if batch_size < 1:
            raise OneEncoderError(f"batch_size must be >= 1, got {batch_size}")
        # None: a bar only for inputs that take a while, and only on a terminal.
        long = len(items) > _PROGRESS_MIN_BATCHES * batch_size
        shown = (None if long else False) if progress is None else progress
        bar = progress_bar(total=len(items), desc=f"encode {modality}", unit=modality, enabled=shown)
        out, kept = [], []
        with bar:
            for start in range(0, len(items), batch_size):
                found: list[tuple[int, str]] = []  # (position, cached id)
                prepared, fresh = [], []
                for i, x in enumerate(items[start : start + batch_size], start):
                    sid = cache.find(x) if cache is not None else None
                    if sid is not None:
                        found.append((i, sid))
                        continue
                    try:
                        prepared.append(m.prepare(x)[1])
                        fresh.append(i)
                    except Exception as e:  # noqa: BLE001 - one bad input is a reject, never an abort
                        if isinstance(e, OneEncoderError) and not isinstance(e, SampleError):
                            raise  # a missing dependency or a bad option is the job's problem
                        reason = _reason(f"{modality} input #{i}", e)
                        if on_error is None:
                            raise SampleError(reason) from (None if isinstance(e, SampleError) else e)
                        on_error(i, x, reason)
                parts, where = [], []
                if found:
                    parts.append(self.encode_features(modality, *cache.tokens([sid for _, sid in found])))
                    where += [i for i, _ in found]
                if prepared:
                    parts.append(self.encode_features(modality, *m.featurize(self._runner(modality), prepared)))
                    where += fresh
                if cache is not None:
                    cache.hits += len(found)
                    cache.encoded += len(prepared)
                if parts:  # back in input order
                    order = sorted(range(len(where)), key=where.__getitem__)
                    out.append(torch.cat(parts)[order])
                    kept += [where[j] for j in order]
                bar.update(min(batch_size, len(items) - start))
        emb = torch.cat(out) if out else torch.empty(0, self.model.embed_dim)
        return emb, kept

    @torch.no_grad()
    def encode(self, modality: str, inputs: Any, batch_size: int = 32, progress: bool | None = None,
               numpy: bool = False, cache: "CachedFeatures | None" = None) -> torch.Tensor | np.ndarray:
        """Embed raw inputs into the shared space.

        Args:
            modality: One of :attr:`modalities`.
            inputs: One input or a batch: strings (text, SMILES); file paths; PIL images or
                image arrays (numpy ``HWC``/``HW`` uint8 or floats in [0, 1], tensors ``CHW``;
                ``[N, ...]`` for a batch); waveforms (``(wave, sample_rate)``, or 1-D at
                44.1 kHz; ``[N, samples]`` for a batch); depth maps ``[H, W]`` in metres
                (``[N, H, W]``); video frames ``[T, H, W, 3]`` or ``(frames, fps)``.
            batch_size: Inputs per backbone forward.
            progress: Show a progress bar; None shows one for inputs longer than a few batches.
            numpy: Return a float32 numpy array instead of a tensor.
            cache: Cached backbone features to reuse (:class:`~oneencoder.features.lookup.CachedFeatures`):
                an input it holds is not encoded again.

        Returns:
            ``[N, d]`` L2-normalised embeddings on the CPU.

        Raises:
            SampleError: naming the input that could not be read: an unreadable or closed
                image, an empty (0x0) one, a ``meta`` tensor, an input over a modality's
                size limit (docs/reliability.md), or any other failure to load it.
        """
        emb, _ = self._embed(modality, inputs, batch_size, progress, cache=cache)
        return emb.numpy().astype(np.float32, copy=False) if numpy else emb

    def index(self, modality: str, inputs: Any, ids: Sequence[str] | None = None, batch_size: int = 32,
              progress: bool | None = None, kind: str = "auto") -> VectorIndex:
        """Embed ``inputs`` into a searchable index (exact for small sets, ANN above a size threshold).

        Example:
            >>> idx = m.index("image", paths)
            >>> hits = idx.search(m.encode("text", ["A badger."]), k=5)

        Args:
            ids: One id per input (default: the input itself for strings and paths, else its position).
            kind: ``"auto"``, ``"exact"`` or ``"ivf"`` (see :mod:`oneencoder.apps.index`).
        """
        items = as_batch(inputs, self.modality(modality).input_ndim)
        if ids is not None and len(ids) != len(items):
            raise OneEncoderError(f"index: {len(ids)} ids for {len(items)} inputs")
        emb, _ = self._embed(modality, items, batch_size, progress)
        rows = [{"id": str(ids[i]) if ids is not None else _default_id(x, i),
                 **({"input": str(x)} if isinstance(x, (str, os.PathLike)) else {})} for i, x in enumerate(items)]
        return VectorIndex(emb.numpy(), rows, modality, model_space(self.meta, modality), kind=kind)

    def classify(self, modality: str, inputs: Any, labels: Sequence[str], template: str | Sequence[str] = "{}",
                 k: int = 5, temperature: float = 0.01, batch_size: int = 32,
                 progress: bool | None = None, cache: "CachedFeatures | None" = None) -> Classification:
        """Zero-shot classification: each input against ``template.format(label)`` for every label.

        Args:
            labels: Class names, e.g. ``["animals", "vehicles"]``.
            template: ``"A picture of {}."``; a list of templates averages their text embeddings
                per label (prompt ensembling, as CLIP does).
            k: Labels kept per input in :attr:`Classification.top`.
            temperature: Softmax temperature of :attr:`Classification.probs` (CLIP's logit scale
                100 is 0.01); the ranking is the cosine's either way.
            cache: Cached backbone features of the inputs to reuse (as in :meth:`encode`).
        """
        return classify(self, modality, inputs, labels, template, k=k, temperature=temperature,
                        batch_size=batch_size, progress=progress, cache=cache)

    @torch.no_grad()
    def compose(self, parts: Sequence[tuple[str, Any] | tuple[str, Any, float]], numpy: bool = False,
                progress: bool | None = False) -> torch.Tensor | np.ndarray:
        """One query from several inputs, possibly of different modalities (embedding arithmetic).

        The result is ``normalize(sum_i w_i * encode(modality_i, input_i))``: each part is unit
        length first, so a weight is its share, whatever the modality. Equal weights embed a
        sample that has several modalities as their fusion; a negative weight subtracts a concept.

        Example:
            >>> q = m.compose([("audio", "lion.ogg"), ("text", "in the snow", 0.5)])
            >>> hits = index.search(q, k=5)

        Args:
            parts: ``(modality, input)`` or ``(modality, input, weight)``; weight 1 by default.

        Returns:
            ``[1, d]``, L2-normalised.

        Raises:
            OneEncoderError: No parts, a malformed part or weight, or weights that cancel out.
        """
        if not parts:
            raise OneEncoderError("compose: give at least one (modality, input[, weight]) part")
        total = torch.zeros(self.model.embed_dim)
        for i, part in enumerate(parts):
            if not isinstance(part, (tuple, list)) or len(part) not in (2, 3):
                raise OneEncoderError(f"compose: part {i} is not (modality, input) or (modality, input, weight)")
            modality, value = part[0], part[1]
            weight = part[2] if len(part) == 3 else 1.0
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise OneEncoderError(f"compose: part {i} ({modality}) has weight {weight!r}; use a finite number")
            total += float(weight) * self.encode(modality, [value], progress=progress)[0]
        norm = float(total.norm())
        if norm < 1e-6:
            raise OneEncoderError("compose: the weighted parts cancel out (their sum has length 0); change the weights")
        query = (total / norm)[None]
        return query.numpy().astype(np.float32, copy=False) if numpy else query

    def caption(self, modality: str, inputs: Any, n: int = 1, beam: int = 3, sample: bool = False,
                temperature: float = 1.0, top_p: float = 0.9, seed: int = 0, projection: str | None = None,
                batch_size: int = 32, progress: bool | None = None) -> list[list[str]]:
        """Describe inputs of any modality in words, with the model's caption decoder.

        The decoder was trained on text alone (``oneencoder train-decoder``), so every
        modality bound to the space can be described.

        Example:
            >>> m.caption("audio", ["/usr/share/tuxpaint/stamps/animals/mammals/badger.ogg"], n=3)
            [['A badger.', 'A beaver.', 'A bear.']]

        Args:
            n: Captions per input: the best ``n`` of a beam search, or ``n`` samples.
            beam: Beam width (1 with ``n = 1``: greedy decoding).
            sample: Nucleus sampling (``temperature``, ``top_p``, ``seed``) instead of beam search.
            projection: ``"none"`` or ``"memory"`` (DeCap); default: the one chosen on validation.

        Raises:
            OneEncoderError: The model holds no decoder.
        """
        if self._captioner is None:
            self._captioner = load_captioner(self.model_dir)
        emb = self.encode(modality, inputs, batch_size=batch_size, progress=progress)
        return self._captioner.describe(emb, n=n, beam=beam, sample=sample, temperature=temperature, top_p=top_p,
                                        seed=seed, projection=projection)

    def match_calibration(self, query: str, gallery: str) -> MatchCalibration | None:
        """The calibration of ``query → gallery`` cosines fitted on validation when the model was
        trained (``match_calibration`` in ``oneencoder.json``), or None if the model stores none."""
        return stored_calibration(self.meta, query, gallery)

    def match_probability(self, query: str, gallery: str, cosines: Any,
                          n_gallery: int | None = None) -> np.ndarray | None:
        """Calibrated probability that ``query``-modality inputs match ``gallery`` items at these
        cosines (numpy, same shape), or None when the model stores no calibration of that direction.

        Args:
            n_gallery: Items the cosines were ranked among (an index's size): the bigger, the less
                likely any one is the match. None: as many as the validation gallery held.
        """
        calibration = self.match_calibration(query, gallery)
        if calibration is None:
            return None
        return calibration.probability(cosines) if n_gallery is None else calibration.in_gallery(n_gallery)(cosines)

    def modality_mean(self, name: str) -> torch.Tensor:
        """The mean embedding ``[d]`` of a modality over the validation samples of the stage that trained it.

        Raises:
            OneEncoderError: The model holds no such modality, or stores no mean of it (older models:
                ``oneencoder calibrate`` adds them).
        """
        self.modality(name)
        if self._means is None:
            self._means = read_means(self.model_dir, self.meta)
        if name not in self._means:
            raise OneEncoderError(f"{self.model_dir} stores no mean of {name!r}; run `oneencoder calibrate "
                                  f"--model {self.model_dir} --manifest M` to fit one on validation")
        return self._means[name].clone()

    def search(self, index: VectorIndex, modality: str, inputs: Any, k: int = 10,
               batch_size: int = 32) -> SearchResult:
        """Embed ``inputs`` of ``modality`` and search ``index``; each hit carries its calibrated
        ``match_probability`` (None when the model stores no calibration of ``modality → index.modality``).

        Example:
            >>> idx = m.index("image", paths)
            >>> m.search(idx, "text", ["A badger."], k=3).hits[0][0]["match_probability"]
        """
        index.check_model(self.meta, self.model_dir)
        result = index.search(self.encode(modality, inputs, batch_size=batch_size, progress=False), k)
        calibration = self.match_calibration(modality, index.modality)
        return result.with_match_probability(None if calibration is None else calibration.in_gallery(len(index)))

    @staticmethod
    def similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Cosine similarity matrix ``[len(a), len(b)]`` of two sets of embeddings (as :meth:`encode`
        returns them: tensors, or numpy arrays with ``numpy=True``, which give a numpy result)."""
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32).T
        return torch.as_tensor(a, dtype=torch.float32) @ torch.as_tensor(b, dtype=torch.float32).t()

    def __repr__(self) -> str:
        return f"OneEncoder({str(self.model_dir)!r}, modalities={self.modalities}, d={self.model.embed_dim})"


def load(model_dir: str | Path, device: str | torch.device | None = None, runtime: str = "torch",
         precision: str = "fp32") -> OneEncoder:
    """Load a model directory after verifying every file's checksum.

    Args:
        runtime: Where the frozen backbones run: ``"torch"``, ``"onnx"`` (onnxruntime; the graph is
            exported once per backbone to ``$ONEENCODER_HOME/runtime``) or ``"auto"`` (the fastest
            path on this machine whose features match fp32 PyTorch to cosine 0.9999, measured on the
            first batch and remembered); see :mod:`oneencoder.features.runtime`.
        precision: ``"fp32"`` or ``"bf16"`` (PyTorch autocast; never chosen by ``auto``).

    Raises:
        ConfigError: ``device`` is not one this machine has (e.g. ``"cuda"`` without a GPU), or
            ``runtime``/``precision`` is not one of the above.
    """
    return OneEncoder(model_dir, device, runtime, precision)
