"""ONNX export: each modality's adapter + Universal Projection (+ language prior) as one graph.

``<modality>-head.onnx`` takes what the frozen backbone gives (what the feature cache
holds): ``tokens`` float32 ``[batch, tokens, feature_dim]`` and ``mask`` bool
``[batch, tokens]`` (True on real tokens), and returns ``embedding`` float32
``[batch, embed_dim]``, unit norm; batch and token axes are dynamic. With
``with_backbone``, every modality whose class gives :meth:`Modality.example_inputs`
(text and image here) also gets ``<modality>-full.onnx``, its frozen backbone included:
its inputs are what the modality's ``collate`` gives (``input_ids`` + ``attention_mask``
int64 ``[batch, length]`` for text, from the tokenizer saved beside it; ``input`` float32
``[batch, 3, S, S]`` preprocessed pixels for images). Graphs come from ``torch.export``
(``torch.onnx.export(..., dynamo=True)``): the TorchScript tracer bakes the attention's
sequence length into reshapes, and ``torch.jit.script`` does not compile the model.

Every graph is run in onnxruntime against PyTorch on the spot (``check``); the largest
absolute difference is recorded in ``export.json`` and must stay under :data:`TOLERANCE`.

Beside the full graphs goes ``preprocess.py`` (:func:`write_preprocess`): the module
:mod:`oneencoder.apps.onnx_preprocess` with the model's numbers filled in, which makes the
graphs' inputs with numpy and Pillow alone, checked against the library when written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..deps import require
from ..errors import ConfigError, OneEncoderError
from ..fileio import atomic_path, write_json_atomic, write_text_atomic
from ..model.parts import OneEncoderModel
from . import onnx_preprocess
from .index import model_space

#: Largest |onnxruntime - PyTorch| accepted on an exported embedding.
TOLERANCE = 1e-4
DEFAULT_OPSET = 18
#: Opsets ``--opset`` accepts. torch's exporter writes 18 and newer (asked for an older one, it
#: silently writes 18); the onnxruntime we check with loads graphs up to 25. A graph is written
#: only if it declares the opset asked for (and, with ``check``, runs in onnxruntime).
MIN_OPSET, MAX_OPSET = 18, 25
#: Largest |preprocess.py - oneencoder| accepted on a modality's example inputs (pixels; token ids must be equal).
PREPROCESS_TOLERANCE = 1e-6
PREPROCESS_FILE = "preprocess.py"
#: How the pixel modality resizes and renders SVG files (modalities/image.py): the parity check
#: catches another resampling, tests/test_onnx_preprocess.py the SVG width on real stamps.
_RESAMPLE, _SVG_WIDTH = "BICUBIC", 448


def check_opset(opset: Any) -> int:
    """``opset`` if the exporter can honour it, else a one-line :class:`ConfigError` giving the range."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset {opset}: the ONNX exporter writes opsets {MIN_OPSET} to {MAX_OPSET} "
                          f"(default {DEFAULT_OPSET}); pick one in that range")
    return opset


class FeatureHead(nn.Module):
    """One modality's path through the model: ``(tokens, mask) -> embedding``."""

    def __init__(self, model: OneEncoderModel, modality: str) -> None:
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(self.modality, tokens, mask)


class _EndToEnd(nn.Module):
    """Raw batch (what ``collate`` gives) through the frozen backbone (the modality's own
    ``encode``) and the head. ``keys``: names of a dict batch's tensors, in argument order."""

    def __init__(self, model: OneEncoderModel, modality: Any, backbone: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model, self.m, self.backbone, self.keys = model, modality, backbone, keys

    def _embed(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.keys, tensors)) if self.keys else tensors[0]
        tokens, mask = self.m.encode(self.backbone, batch)
        return self.model(self.m.spec.name, tokens, mask)


class _OneInput(_EndToEnd):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the graph input's name
        return self._embed(input)


class _TwoInputs(_EndToEnd):
    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self._embed(first, second)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No parameter requires grad while exporting (modalities encode under ``inference_mode``,
    whose tensors autograd may not save), then the flags come back."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress prints and schema warnings are noise around our one line per graph."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def graph_opset(path: Path) -> int:
    """The default-domain opset a saved graph declares (the exporter may keep a newer one than asked)."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
            dynamic: dict[str, dict[int, Any]], path: Path, opset: int) -> Iterator[Path]:
    """Export to a temporary file next to ``path`` and yield it for checks; it is renamed into
    place only when the block ends without an error, so a refused graph never lands at ``path``."""
    check_opset(opset)
    with _frozen(module), atomic_path(path) as tmp:
        with _quiet():
            program = torch.onnx.export(module.eval(), args, input_names=names, output_names=["embedding"],
                                        dynamic_shapes=dynamic, dynamo=True, external_data=False,
                                        opset_version=opset, verbose=False)
            program.save(str(tmp), external_data=False)
        written = graph_opset(tmp)
        if written != opset:  # the exporter keeps another opset than asked: refuse, never relabel
            raise OneEncoderError(f"{path}: asked for --opset {opset}, but the exporter wrote opset {written}; "
                                  f"use --opset {written}")
        yield tmp


def _max_diff(path: Path, module: nn.Module, cases: list[dict[str, torch.Tensor]], name: str = "") -> float:
    """Largest |onnxruntime - PyTorch| over ``cases`` (input name -> tensor).

    Raises:
        OneEncoderError: onnxruntime cannot load or run the graph (named ``name``, default ``path``).
    """
    ort = require("onnxruntime")
    worst = 0.0
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failing kernel's log would repeat our one line
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for case in cases:
            with torch.no_grad():
                ref = module(*case.values()).numpy()
            got = session.run(["embedding"], {k: v.numpy() for k, v in case.items()})[0]
            worst = max(worst, float(np.abs(got - ref).max()))
    except Exception as e:
        if type(e).__module__.split(".")[0] != "onnxruntime":
            raise
        detail = " ".join(str(e).split())[:200]
        raise OneEncoderError(f"{name or path}: onnxruntime {ort.__version__} cannot run this graph "
                              f"(opset {graph_opset(path)}): {detail}; try --opset {DEFAULT_OPSET}") from None
    return worst


def _feature_cases(dim: int, max_tokens: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of 1 and 5, full and shorter lengths, padded rows: the shapes a runtime sees."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for batch, length in ((1, max_tokens), (5, max_tokens), (3, max(1, max_tokens // 2)), (2, 1)):
        tokens = torch.randn(batch, length, dim, generator=g)
        mask = torch.ones(batch, length, dtype=torch.bool)
        if length > 1:
            mask[-1, length // 2 + 1:] = False  # one padded row
        cases.append({"tokens": tokens, "mask": mask})
    return cases


def export_head(model: OneEncoderModel, modality: str, feature_dim: int, max_tokens: int, path: Path,
                opset: int = DEFAULT_OPSET, check: bool = True) -> dict[str, Any]:
    """Write ``modality``'s features-in graph to ``path``; returns its ``export.json`` entry.

    Raises:
        ConfigError: ``opset`` is outside :data:`MIN_OPSET`-:data:`MAX_OPSET`.
        OneEncoderError: The exporter wrote another opset, or onnxruntime cannot run the graph
            (``check``); nothing is written to ``path`` then.
    """
    head = FeatureHead(model, modality).eval()
    batch = torch.export.Dim("batch", min=2)  # 2 in the example; 1 runs too (checked below)
    tokens_axis = torch.export.Dim("tokens", min=2, max=max_tokens) if max_tokens > 1 else None
    axes = {0: batch, **({1: tokens_axis} if tokens_axis is not None else {})}
    example = (torch.randn(2, max_tokens, feature_dim), torch.ones(2, max_tokens, dtype=torch.bool))
    entry = {"file": path.name, "modality": modality, "kind": "head", "input": "tokens + mask", "opset": opset,
             "inputs": {"tokens": ["batch", "tokens" if max_tokens > 1 else 1, feature_dim],
                        "mask": ["batch", "tokens" if max_tokens > 1 else 1]},
             "max_tokens": max_tokens, "output_dim": model.embed_dim}
    with _export(head, example, ["tokens", "mask"], {"tokens": axes, "mask": axes}, path, opset) as tmp:
        if check:  # on the temporary file: a graph onnxruntime cannot run is never left at path
            entry["max_abs_diff"] = _max_diff(tmp, head, _feature_cases(feature_dim, max_tokens), str(path))
    return entry


def _batch_tensors(batch: Any) -> tuple[list[str] | None, list[torch.Tensor]]:
    """``(dict keys, or None for a plain tensor batch; the tensors)`` of a collated batch."""
    if isinstance(batch, torch.Tensor):
        return None, [batch]
    if isinstance(batch, dict) and 1 <= len(batch) <= 2 and all(isinstance(v, torch.Tensor) for v in batch.values()):
        return list(batch), list(batch.values())
    raise OneEncoderError("--with-backbone needs a modality whose collate gives a tensor or a dict of one or two "
                          f"tensors; got {type(batch).__name__}")


def export_full(encoder: Any, modality: str, path: Path, opset: int = DEFAULT_OPSET,
                check: bool = True) -> dict[str, Any]:
    """Write ``modality``'s raw-input graph (backbone included), traced on its ``example_inputs``.

    Axes whose size differs between the examples (e.g. text length) are dynamic, as is the batch.
    """
    m, backbone = encoder.modality(modality), encoder._backbone(modality)
    examples = m.example_inputs()
    if len(examples) < 2:
        raise OneEncoderError(f"--with-backbone: the {modality} modality gives no example inputs, so its "
                              "backbone cannot be exported; export its head (without --with-backbone)")
    backbone.to("cpu")
    items = [m.prepare(x)[1] for x in examples]
    keys, full = _batch_tensors(m.collate(items))
    names = keys or ["input"]
    singles = [_batch_tensors(m.collate([it]))[1] for it in items]
    # One Dim per axis position, shared by the inputs (text's ids and mask have one length).
    dims = {0: torch.export.Dim("batch", min=2)}
    dynamic = {}
    for i, name in enumerate(names):
        axes: dict[int, Any] = {0: dims[0]}
        for axis in range(1, full[i].ndim):
            if len({s[i].shape[axis] for s in singles}) > 1:
                axes[axis] = dims.setdefault(axis, torch.export.Dim(f"axis{axis}", min=2))
        dynamic[name] = axes
    module: nn.Module = (_OneInput if len(names) == 1 else _TwoInputs)(encoder.model, m, backbone, keys)
    arg_names = ["input"] if len(names) == 1 else ["first", "second"]
    entry = {"file": path.name, "modality": modality, "kind": "full", "input": " + ".join(names),
             "opset": opset,
             "inputs": {n: ["batch", *[f"axis{a}" if a in dynamic[n] else int(t.shape[a]) for a in range(1, t.ndim)]]
                        for n, t in zip(names, full)},
             "output_dim": encoder.model.embed_dim}
    with _export(module, tuple(t[:2] for t in full), names, dict(zip(arg_names, dynamic.values())), path,
                 opset) as tmp:
        if check:
            cases = [dict(zip(names, full)), dict(zip(names, singles[0]))]
            entry["max_abs_diff"] = _max_diff(tmp, module, cases, str(path))
    return entry


def _save_tokenizer(m: Any, modality: str, out: Path) -> str | None:
    """Save ``m``'s Hugging Face tokenizer, when it has one, as ``<modality>-tokenizer/`` in ``out``."""
    tokenizer = getattr(m, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return None
    folder = out / f"{modality}-tokenizer"
    tokenizer.save_pretrained(str(folder))
    return folder.name


def _preprocessing(encoder: Any, modality: str, out: Path) -> dict[str, Any]:
    """What a runtime needs to make a full graph's inputs: the modality's options, and its
    tokenizer when it has one (``tokenizer.json`` reads with the ``tokenizers`` package alone)."""
    m = encoder.modality(modality)
    info: dict[str, Any] = {"options": dict(m.options)}
    folder = _save_tokenizer(m, modality, out)
    if folder is not None:
        info["tokenizer"] = folder
    return info


def preprocess_recipe(m: Any, modality: str, out: Path) -> tuple[dict[str, Any] | None, str]:
    """``(recipe, "")`` when ``preprocess.py`` reproduces ``m``'s preprocessing, else ``(None, why)``.

    A modality qualifies by what it is, not by its name: pixels when its options hold
    ``image_size``, ``mean`` and ``std``; token ids when it has a Hugging Face tokenizer (saved
    to ``out``). Either way the recipe must then give what ``m.prepare`` + ``m.collate`` give
    on ``m.example_inputs()``, one by one and batched, to :data:`PREPROCESS_TOLERANCE`.
    """
    opts, graph = m.options, f"{modality}-full.onnx"
    if all(k in opts for k in ("image_size", "mean", "std")):
        recipe = {"kind": "pixels", "graph": graph, "input": "input", "image_size": int(opts["image_size"]),
                  "mean": [float(v) for v in opts["mean"]], "std": [float(v) for v in opts["std"]],
                  "resample": _RESAMPLE, "svg_width": _SVG_WIDTH}
    elif "max_tokens" in opts and getattr(m, "tokenizer", None) is not None:
        folder = _save_tokenizer(m, modality, out)
        if folder is None:
            return None, "its tokenizer cannot be saved as tokenizer.json"
        recipe = {"kind": "tokens", "graph": graph, "input": "input_ids + attention_mask",
                  "tokenizer": f"{folder}/tokenizer.json", "max_tokens": int(opts["max_tokens"]),
                  "pad_id": int(m.tokenizer.pad_token_id or 0)}
    else:
        return None, "no numpy/Pillow recipe makes its inputs (only images and token ids have one)"
    examples = m.example_inputs()
    if not examples:
        return None, "it gives no example inputs to check a recipe on"
    worst = 0.0
    try:
        for batch in [[x] for x in examples] + [examples]:
            keys, expected = _batch_tensors(m.collate([m.prepare(x)[1] for x in batch]))
            got = onnx_preprocess.preprocess(modality, batch, {modality: recipe}, out)
            got = [got[k] for k in keys] if keys else [got]
            for g, e in zip(got, expected, strict=True):
                worst = max(worst, float(np.abs(g - e.numpy()).max()) if g.shape == tuple(e.shape) else np.inf)
    except Exception as e:  # any failure of the recipe means it does not reproduce the library
        return None, f"preprocess.py fails on its example inputs ({type(e).__name__}: {e})"
    if worst > PREPROCESS_TOLERANCE:
        return None, f"preprocess.py differs from its preprocessing by {worst:.2e} (> {PREPROCESS_TOLERANCE:g})"
    return {**recipe, "max_abs_diff": worst}, ""


def _identifier(name: str) -> str:
    """A modality name as part of a Python function name (plugins may use dashes)."""
    return re.sub(r"\W", "_", name)


def _preprocess_source(recipes: dict[str, dict[str, Any]], model_dir: str) -> str:
    """The template module with ``RECIPES`` filled in, a ``preprocess_<modality>`` per recipe and a ``main`` guard."""
    source = Path(onnx_preprocess.__file__).read_text(encoding="utf-8")
    empty = "RECIPES: dict[str, dict[str, Any]] = {}\n"
    if source.count(empty) != 1:
        raise OneEncoderError(f"{onnx_preprocess.__file__}: the template lost its RECIPES line")
    rows = "".join(f"    {json.dumps(name)}: {json.dumps(recipe)},\n" for name, recipe in recipes.items())
    filled = (f"# Written by `oneencoder export onnx` from {model_dir}: regenerate it rather than edit it.\n"
              f"RECIPES: dict[str, dict[str, Any]] = {{\n{rows}}}\n")
    wrappers = [f"\n\ndef preprocess_{_identifier(name)}(inputs: Any) -> Any:\n"
                f'    """{name!r} inputs (one or a list) for {recipe["graph"]}: see :func:`preprocess`."""\n'
                f"    return preprocess({name!r}, inputs)\n" for name, recipe in recipes.items()]
    return source.replace(empty, filled) + "".join(wrappers) + '\n\nif __name__ == "__main__":\n    sys.exit(main())\n'


def _no_recipe(skipped: dict[str, str]) -> str:
    return "no torch-free preprocessing for " + "; ".join(f"{n}: {why}" for n, why in skipped.items())


def write_preprocess(modalities: dict[str, Any], out: str | Path, model_dir: str | Path,
                     strict: bool = False) -> dict[str, Any]:
    """Write ``preprocess.py`` (numpy + Pillow, no torch) for those of ``modalities`` (name ->
    :class:`Modality`, with the model's options) that have a recipe (:func:`preprocess_recipe`).

    Returns:
        ``{"file", "recipes": {modality: recipe}, "skipped": {modality: why}}``; ``file`` is
        None (and nothing is written) when no modality has a recipe.

    Raises:
        OneEncoderError: ``strict`` and a modality has no recipe; nothing is written then.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipes, skipped = {}, {}
    for name, m in modalities.items():
        recipe, why = preprocess_recipe(m, name, out)
        if recipe is None:
            skipped[name] = why
        else:
            recipes[name] = recipe
    if strict and skipped:
        raise OneEncoderError(_no_recipe(skipped))
    if recipes:
        write_text_atomic(out / PREPROCESS_FILE, _preprocess_source(recipes, str(model_dir)))
    return {"file": PREPROCESS_FILE if recipes else None, "recipes": recipes, "skipped": skipped}


def export_preprocess(model_dir: str | Path, out: str | Path,
                      modalities: Sequence[str] | None = None) -> dict[str, Any]:
    """Only ``preprocess.py`` (and a tokenizer it reads), for ``modalities`` or every one with example inputs.

    Raises:
        OneEncoderError: A modality named has no recipe, or none has (the line says why for each).
    """
    from .api import load

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for preprocess.py")
    encoder = load(model_dir, device="cpu")
    for name in modalities or ():
        encoder.modality(name)  # one line naming a modality the model lacks
    names = list(modalities or [n for n in encoder.modalities if encoder.modality(n).example_inputs()])
    if not names:
        raise OneEncoderError(f"{model_dir}: no modality of this model can be exported with its backbone, "
                              "so there is nothing to preprocess")
    # A modality named must get a recipe; of the default ones, at least one.
    report = write_preprocess({n: encoder.modality(n) for n in names}, out, model_dir, strict=bool(modalities))
    if report["file"] is None:
        raise OneEncoderError(_no_recipe(report["skipped"]))
    return report


def export_onnx(model_dir: str | Path, out: str | Path, modalities: Sequence[str] | None = None,
                with_backbone: bool = False, opset: int = DEFAULT_OPSET, check: bool = True) -> dict[str, Any]:
    """Export a model's modalities to ONNX under ``out`` and write ``export.json``.

    Args:
        modalities: Which to export (default: every one the model holds).
        with_backbone: Also write end-to-end graphs: of every named modality (one that cannot be
            exported is an error), or, with no ``modalities`` named, of each that gives
            ``example_inputs`` (text and image); and ``preprocess.py``, which makes their inputs
            with numpy and Pillow (:func:`write_preprocess`).
        check: Compare every graph with PyTorch in onnxruntime; a difference above
            :data:`TOLERANCE` is an error.

    Returns:
        What ``export.json`` holds.
    """
    from .api import load

    check_opset(opset)  # before loading the model: a refusal costs nothing
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the .onnx files and export.json")
    require("onnx")
    require("onnxscript")
    encoder = load(model_dir, device="cpu")
    names = list(modalities or encoder.modalities)
    for name in names:
        encoder.modality(name)  # one line naming a modality the model lacks
    graphs, preprocessing = [], {}
    for name in names:
        info = encoder.meta["modalities"][name]
        graphs.append(export_head(encoder.model, name, int(info["feature_dim"]), int(info["max_tokens"]),
                                  out / f"{name}-head.onnx", opset, check))
        if with_backbone and (modalities or encoder.modality(name).example_inputs()):
            graphs.append(export_full(encoder, name, out / f"{name}-full.onnx", opset, check))
            preprocessing[name] = _preprocessing(encoder, name, out)
    bad = [g for g in graphs if g.get("max_abs_diff", 0.0) > TOLERANCE]
    if bad:
        raise OneEncoderError(f"{out / bad[0]['file']}: onnxruntime differs from PyTorch by "
                              f"{bad[0]['max_abs_diff']:.2e} (> {TOLERANCE:g}); try another --opset")
    # The full graphs' inputs made with numpy + Pillow alone, checked against the library here.
    preprocess = (write_preprocess({n: encoder.modality(n) for n in preprocessing}, out, model_dir)
                  if preprocessing else None)
    report = {"format_version": 1, "model": str(Path(model_dir).resolve()), "embed_dim": encoder.model.embed_dim,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "space": {n: model_space(encoder.meta, n) for n in names}, "graphs": graphs,
              "preprocessing": preprocessing, "preprocess": preprocess}
    write_json_atomic(out / "export.json", report)
    return report
