"""Where a modality's frozen backbone runs: PyTorch (fp32 or bf16 autocast, channels_last) or onnxruntime.

:class:`RuntimeBackbone` wraps the module ``load_backbone`` gives and is called exactly as it
is (``backbone(pixels)``, ``backbone(**batch)``), so every modality's own ``encode`` and every
caller (``cache build``, ``m.encode``, ``index build``, ``embed``, ``classify``) gets the
runtime without knowing it. What it runs is resolved on its first call, on the real batch
it is given:

* ``torch``: the module itself; 4-D inputs in channels_last memory (same numbers, faster
  convolutions); ``precision="bf16"`` adds bf16 autocast.
* ``onnx``: the same backbone exported once per fingerprint (``torch.export``, as
  ``export onnx --with-backbone`` does) to ``<home>/<modality>.onnx/<fingerprint>.onnx`` and
  run by onnxruntime on the CPU. A modality whose backbone is no exportable graph (it gives
  no :meth:`~oneencoder.modality.Modality.example_inputs`) keeps PyTorch and says so.
* ``auto``: every path that is possible here is checked for parity against fp32 PyTorch on
  that first batch (cosine of every output vector >= :data:`PARITY_COSINE`) and timed on it;
  the fastest one that passes wins. The choice is remembered per machine and fingerprint in
  ``<home>/<modality>.runtime.json``, so it is measured once.

Parity is checked whenever a path other than fp32 PyTorch is first used in a process: a
path below the bound is refused with one line (``onnx``), or kept and reported (``bf16``,
whose bound is its own; docs/backbones.md). bf16 changes features beyond the cache's fp16
rounding, so :func:`runtime_fingerprint` records it and a bf16 cache is never mixed with
an fp32 one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..deps import require
from ..errors import ConfigError, OneEncoderError
from ..fileio import atomic_path, write_json_atomic
from ..modality import Modality
from .backbones import models_home

try:
    import fcntl
except ImportError:  # not POSIX: exports are not serialised
    fcntl = None  # type: ignore[assignment]

RUNTIMES = ("auto", "torch", "onnx")
PRECISIONS = ("fp32", "bf16")
#: Least cosine of every output vector against fp32 PyTorch for a path to be used (``auto``, ``onnx``).
PARITY_COSINE = 0.9999
_OPSET = 18
_PARITY_SAMPLES = 4  # of the first batch, checked against fp32 PyTorch when a path is first used
_TIMED_RUNS = 2  # per candidate in ``auto``, after one warm-up; the best counts


def check_runtime(runtime: str, precision: str) -> None:
    """One line naming the option when ``runtime``/``precision`` is not one we have."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if runtime != "torch" and precision != "fp32":
        raise ConfigError(f"--runtime {runtime} runs fp32 only (bf16 never meets the parity bound); use "
                          f"--precision fp32, or --runtime torch for --precision {precision}")


def runtime_fingerprint(modality: Modality, precision: str = "fp32") -> dict[str, Any]:
    """The cache fingerprint of features computed at ``precision``.

    fp32 PyTorch and onnxruntime agree to cosine >= :data:`PARITY_COSINE`, below the cache's
    fp16 rounding, so they share the modality's own fingerprint. bf16 does not: it is recorded.
    """
    fp = modality.fingerprint()
    return fp if precision == "fp32" else {**fp, "precision": precision}


def runtime_home() -> Path:
    """Where the API keeps exported graphs and measured choices (``$ONEENCODER_HOME/runtime``,
    default ``~/.cache/oneencoder/runtime``); a cache build keeps them beside its cache."""
    return models_home().parent / "runtime"


def exportable(modality: Modality) -> bool:
    """Whether the modality's backbone is a graph onnxruntime can run (it gives example inputs)."""
    return len(modality.example_inputs()) >= 2


def machine_key() -> str:
    """What a measured choice depends on besides the backbone: CPU, core count, library versions."""
    ort = _ort_version()
    return "|".join([platform.machine(), platform.processor() or "", str(os.cpu_count()),
                     torch.backends.cpu.get_cpu_capability(), f"torch {torch.__version__}",
                     f"onnxruntime {ort}", f"threads {torch.get_num_threads()}"])


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "none"


def _fingerprint_id(modality: Modality) -> str:
    return hashlib.sha256(json.dumps(modality.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


# ----- calls and outputs as flat tensors ---------------------------------------------


class _Call:
    """A backbone call ``(args, kwargs)`` flattened to named tensors and back."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.names = [f"arg{i}" for i in range(len(args))] + list(kwargs)
        self.tensors = [*args, *kwargs.values()]
        if not all(isinstance(t, torch.Tensor) for t in self.tensors):
            raise OneEncoderError("the backbone is called with non-tensor arguments; it runs on PyTorch only")
        self.n_args = len(args)

    def rebuild(self, tensors: list[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return tuple(tensors[: self.n_args]), dict(zip(self.names[self.n_args:], tensors[self.n_args:]))


def _flat_outputs(out: Any) -> tuple[list[str] | None, list[torch.Tensor]]:
    """``(keys of a dict-like output, or None for a tensor/tuple; its tensors)``."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return None, list(out)
    if hasattr(out, "keys"):  # a Hugging Face ModelOutput
        keys = [k for k in out.keys() if isinstance(out[k], torch.Tensor)]
        return keys, [out[k] for k in keys]
    raise OneEncoderError(f"the backbone returns {type(out).__name__}; it runs on PyTorch only")


class Outputs(dict):
    """onnxruntime's outputs in the shape a dict-like backbone output has: ``out.last_hidden_state``."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _cosine_floor(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Least cosine between matching vectors (last axis) of two flat outputs; 1.0 for two zero vectors."""
    worst = 1.0
    for a, b in zip(ref, got, strict=True):
        a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
        if a.shape != b.shape:
            return -1.0
        zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
        worst = min(worst, float(torch.where(zero, torch.ones_like(cos), cos).min()))
    return worst


# ----- the paths ----------------------------------------------------------------------


class _TorchPath:
    """The module itself; 4-D inputs channels_last; bf16 autocast when asked."""

    def __init__(self, module: nn.Module, precision: str, channels_last: bool = True) -> None:
        self.module, self.precision, self.channels_last = module, precision, channels_last
        self.name = "torch " + precision + (" channels_last" if channels_last else "")

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last) if _is_image_like(a) else a for a in args)
        if self.precision == "fp32":
            return self.module(*args, **kwargs)
        with torch.autocast(_device_type(self.module, args), dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        keys, flat = _flat_outputs(out)
        flat = [t.float() if t.is_floating_point() else t for t in flat]
        return Outputs(zip(keys, flat)) if keys is not None else (flat[0] if isinstance(out, torch.Tensor) else tuple(flat))


def _device_type(module: torch.nn.Module, args: tuple[Any, ...]) -> str:
    """Where ``module`` runs: its first parameter or buffer, else its first tensor input (a backbone
    without weights, such as RDKit fingerprints, has neither parameters nor buffers)."""
    for t in (*module.parameters(), *module.buffers(), *(a for a in args if isinstance(a, torch.Tensor))):
        return t.device.type
    return "cpu"


def _is_image_like(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 4 and t.is_floating_point()


class _OnnxPath:
    """A graph exported from the module, run by onnxruntime on the CPU."""

    name = "onnx fp32"

    def __init__(self, graph: Path, meta: dict[str, Any]) -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores PyTorch would use
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.meta = meta

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = _Call(args, kwargs)
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(call.names, call.tensors)}
        flat = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feeds)]
        keys = self.meta.get("output_keys")
        if keys is not None:
            return Outputs(zip(keys, flat))
        return flat[0] if self.meta.get("single") else tuple(flat)


class _FlatModule(nn.Module):
    """The backbone with positional tensor inputs and a tuple of tensor outputs (what the exporter takes).
    Subclasses fix the arity: the exporter's guards do not survive ``*args``."""

    def __init__(self, module: nn.Module, call: _Call) -> None:
        super().__init__()
        self.module, self.call = module, call

    def _run(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.call.rebuild(list(tensors))
        return tuple(_flat_outputs(self.module(*args, **kwargs))[1])


class _Flat1(_FlatModule):
    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(a)


class _Flat2(_FlatModule):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(a, b)


class _Flat3(_FlatModule):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(a, b, c)


_FLAT = {1: _Flat1, 2: _Flat2, 3: _Flat3}


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter prints progress and warns about schemas: noise around a one-line note."""
    names = ("torch.onnx", "onnxscript", "torch._export", "torch.export")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _example_calls(modality: Modality, module: nn.Module) -> list[_Call]:
    """The calls the modality's ``encode`` makes on its example inputs: all of them, then each alone."""
    seen: list[_Call] = []

    class _Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(_Call(args, kwargs))
            return self.inner(*args, **kwargs)

    items = [modality.prepare(x)[1] for x in modality.example_inputs()]
    with torch.inference_mode():
        for batch in [items, *[[it] for it in items]]:
            modality.featurize(_Recorder(), batch)
    return seen


def export_backbone(modality: Modality, module: nn.Module, home: Path) -> tuple[Path, dict[str, Any]]:
    """The backbone's graph for this fingerprint under ``home``, exported now if it is not there yet.

    Axis 0 (batch) is dynamic, and every other axis whose size differs between the modality's
    example inputs (a text's length). The graph and its ``.json`` are renamed into place, under
    a lock, so two processes never both write them and nobody reads half a graph.
    """
    folder = home / f"{modality.spec.name}.onnx"
    graph = folder / f"{_fingerprint_id(modality)}.onnx"
    info = graph.with_suffix(".json")
    with _exclusive(graph), torch.inference_mode(False):
        if graph.exists() and info.exists():
            return graph, json.loads(info.read_text(encoding="utf-8"))
        calls = _example_calls(modality, module)
        full, singles = calls[0], calls[1:]
        batch_dim = torch.export.Dim("batch", min=2)
        dims: dict[int, Any] = {0: batch_dim}
        dynamic = []
        for i, t in enumerate(full.tensors):
            axes: dict[int, Any] = {0: batch_dim}
            for axis in range(1, t.ndim):
                if len({s.tensors[i].shape[axis] for s in singles}) > 1:
                    axes[axis] = dims.setdefault(axis, torch.export.Dim(f"axis{axis}", min=2))
            dynamic.append(axes)
        if len(full.tensors) not in _FLAT:
            raise OneEncoderError(f"{modality.spec.name}: its backbone takes {len(full.tensors)} tensors; "
                                  "graphs of 1 to 3 inputs are exported")
        flat = _FLAT[len(full.tensors)](module, full).eval()
        with torch.no_grad():
            out = module(*full.rebuild(full.tensors)[0], **full.rebuild(full.tensors)[1])
        keys, outs = _flat_outputs(out)
        meta = {"inputs": full.names, "output_keys": keys, "single": isinstance(out, torch.Tensor),
                "fingerprint": modality.fingerprint(), "opset": _OPSET,
                "torch": torch.__version__}
        example = tuple(t[:2].clone() for t in full.tensors)  # normal tensors, not inference ones
        with atomic_path(graph) as tmp, _exporter_quiet():
            program = torch.onnx.export(flat, example, input_names=full.names,
                                        output_names=[f"out{i}" for i in range(len(outs))],
                                        dynamic_shapes=tuple(dynamic), dynamo=True, external_data=False,
                                        opset_version=_OPSET, verbose=False)
            program.save(str(tmp), external_data=False)
        write_json_atomic(info, meta)
    return graph, meta


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock``, waiting for another process that holds it (it is exporting the same graph)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ----- the choice ----------------------------------------------------------------------


class RuntimeBackbone(nn.Module):
    """A frozen backbone that runs on the runtime chosen for this machine (see the module docs).

    Args:
        modality: Whose backbone it is (its name, fingerprint and example inputs).
        module: What ``modality.load_backbone()`` gave.
        runtime: ``auto``, ``torch`` or ``onnx``.
        precision: ``fp32`` or ``bf16`` (PyTorch only).
        home: Where exported graphs and measured choices are kept (a cache root).
        log: Gets one-line notes: the path chosen, its parity, why a path was not taken.
    """

    def __init__(self, modality: Modality, module: nn.Module, runtime: str = "torch", precision: str = "fp32",
                 home: str | Path | None = None, log: Callable[[str], None] | None = None) -> None:
        super().__init__()
        check_runtime(runtime, precision)
        self.module = module
        self.modality, self.runtime, self.precision = modality, runtime, precision
        self.home = Path(home) if home is not None else None
        self.log = log or (lambda _line: None)
        self.path: Any = None
        self.parity: float | None = None
        self.rates: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        # A modality's encode() may read its backbone's own attributes (a plugin's `backbone.kernels`):
        # what the wrapper lacks comes from the wrapped module, as if it were not wrapped.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    @property
    def chosen(self) -> str:
        """The path in use (``torch fp32 channels_last``, ``onnx fp32``...), or "" before the first call."""
        return self.path.name if self.path is not None else ""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.path is None:
            self.path = self._resolve(args, kwargs)
        return self.path(args, kwargs)

    def _on_cpu(self) -> bool:
        return _device_type(self.module, ()) == "cpu"

    def _onnx_possible(self, asked: bool) -> bool:
        name = self.modality.spec.name
        why = ("its backbone is no exportable graph" if not exportable(self.modality)
               else "onnxruntime runs on the CPU here and the backbone is on another device" if not self._on_cpu()
               else "no folder to keep the graph in" if self.home is None else "")
        if why and asked:
            self.log(f"{name}: --runtime onnx: {why}; it runs on PyTorch")
        return not why

    def _resolve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fp32 = _TorchPath(self.module, "fp32", channels_last=False)
        if self.runtime == "torch" or not self._onnx_possible(self.runtime == "onnx"):
            path = _TorchPath(self.module, self.precision)
            if self.precision != "fp32":
                sample = _head(args, kwargs, _PARITY_SAMPLES)
                self.parity = _cosine_floor(_flat_outputs(fp32(*sample))[1], _flat_outputs(path(*sample))[1])
                self.log(f"{self.modality.spec.name}: {path.name}, least cosine to fp32 {self.parity:.6f} on "
                         f"{_batch_size(*sample)} samples")
            return path
        if self.runtime == "onnx":
            return self._checked(self._onnx(), fp32, args, kwargs, refuse=True)
        return self._auto(fp32, args, kwargs)

    def _onnx(self) -> _OnnxPath:
        assert self.home is not None
        try:
            graph, meta = export_backbone(self.modality, self.module, self.home)
            return _OnnxPath(graph, meta)
        except OneEncoderError:
            raise
        except Exception as e:  # the exporter and onnxruntime fail in many types
            first = " ".join(str(e).split())[:160]
            raise OneEncoderError(f"{self.modality.spec.name}: its backbone cannot run on onnxruntime "
                                  f"({type(e).__name__}: {first}); use --runtime torch") from None

    def _checked(self, path: Any, fp32: _TorchPath, args: tuple[Any, ...], kwargs: dict[str, Any],
                 refuse: bool) -> Any:
        """``path`` if its outputs match fp32 PyTorch's on the first samples of this batch, else None
        (or a refusal). A few samples: the check runs the slow path it replaces, once per process."""
        store, key = self._store()
        checked = (_read_choices(store).get(key, {}).get("parity", {}) if store is not None else {}).get(path.name)
        if isinstance(checked, float) and checked >= PARITY_COSINE:  # checked on this machine before
            self.parity = checked
            self.log(f"{self.modality.spec.name}: {path.name}, least cosine to torch fp32 {checked:.6f} "
                     "(checked before on this machine)")
            return path
        args, kwargs = _head(args, kwargs, _PARITY_SAMPLES)
        self.parity = _cosine_floor(_flat_outputs(fp32(args, kwargs))[1], _flat_outputs(path(args, kwargs))[1])
        if store is not None and self.parity >= PARITY_COSINE:
            _remember(store, key, {"parity": {path.name: self.parity}})
        if self.parity < PARITY_COSINE:
            if refuse:
                raise OneEncoderError(f"{self.modality.spec.name}: --runtime onnx gives features at cosine "
                                      f"{self.parity:.6f} of PyTorch's (< {PARITY_COSINE}); use --runtime torch")
            return None
        self.log(f"{self.modality.spec.name}: {path.name}, least cosine to torch fp32 {self.parity:.6f}")
        return path

    def _store(self) -> tuple[Path | None, str]:
        """Where measured choices and parity checks are kept, and this machine's and backbone's key."""
        store = self.home / f"{self.modality.spec.name}.runtime.json" if self.home is not None else None
        return store, f"{machine_key()}|{_fingerprint_id(self.modality)}"

    def _auto(self, fp32: _TorchPath, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        store, key = self._store()
        known = _read_choices(store).get(key) if store is not None else None
        candidates: dict[str, Callable[[], Any]] = {
            "torch fp32": lambda: fp32,
            "torch fp32 channels_last": lambda: _TorchPath(self.module, "fp32"),
        }
        if self._onnx_possible(False):
            candidates["onnx fp32"] = self._onnx
        if known is not None and known.get("path") in candidates and known.get("rates"):
            self.rates = known.get("rates", {})
            path = candidates[known["path"]]()
            return path if path is fp32 else self._checked(path, fp32, args, kwargs, refuse=False) or fp32
        rates, cosines, passing = {}, {}, {}
        ref = _flat_outputs(fp32(args, kwargs))[1]
        for name, make in candidates.items():
            try:
                path = make()
            except OneEncoderError as e:  # a graph that cannot be exported or run: not a candidate
                self.log(f"{e}; runtime auto leaves it out")
                continue
            cosines[name] = _cosine_floor(ref, _flat_outputs(path(args, kwargs))[1])
            rates[name] = _rate(path, args, kwargs)
            if cosines[name] >= PARITY_COSINE:
                passing[name] = path
        best = max(passing, key=rates.__getitem__)
        self.rates, self.parity = rates, cosines[best]
        if store is not None:
            _remember(store, key, {"path": best, "rates": rates, "cosines": cosines,
                                   "parity": {n: c for n, c in cosines.items() if n in passing},
                                   "samples": _batch_size(args, kwargs), "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
        shown = ", ".join(f"{n} {r:.1f}/s (cos {cosines[n]:.6f})" for n, r in rates.items())
        self.log(f"{self.modality.spec.name}: runtime auto chose {best} ({shown})")
        return passing[best]


def _head(args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call on the first ``n`` samples of its batch."""
    return tuple(a[:n] for a in args), {k: v[:n] for k, v in kwargs.items()}


def _rate(path: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """Samples per second of ``path`` on this batch: the best of a few runs after a warm-up."""
    n = _batch_size(args, kwargs)
    path(args, kwargs)
    best = float("inf")
    for _ in range(_TIMED_RUNS):
        start = time.perf_counter()
        path(args, kwargs)
        best = min(best, time.perf_counter() - start)
    return n / max(best, 1e-9)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    first = next(iter([*args, *kwargs.values()]))
    return int(first.shape[0])


def _remember(store: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge ``entry`` into the stored record of ``key`` (parity checks add up; a choice replaces)."""
    choices = _read_choices(store)
    old = choices.get(key) if isinstance(choices.get(key), dict) else {}
    choices[key] = {**old, **entry, "parity": {**old.get("parity", {}), **entry.get("parity", {})}}
    write_json_atomic(store, choices)


def _read_choices(store: Path) -> dict[str, Any]:
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return data if isinstance(data, dict) else {}


def with_runtime(modality: Modality, module: nn.Module, runtime: str = "torch", precision: str = "fp32",
                 home: str | Path | None = None, log: Callable[[str], None] | None = None) -> nn.Module:
    """``module`` wrapped to run on ``runtime`` at ``precision`` (:class:`RuntimeBackbone`)."""
    return RuntimeBackbone(modality, module, runtime, precision, home, log)
