"""Property-based fuzzing (hypothesis) of the three inputs users hand to oneencoder.

Every generated manifest, stage file and model directory must end in a valid result or
one ``OneEncoderError``, never another exception:

* manifests: random JSONL lines, wrong types, bad UTF-8, missing and reserved fields;
  an accepted one hashes, and each caption and image path prepares or is a ``SampleError``;
* stage files: random TOML values for every known option; an accepted one builds its
  modalities, pacer, loss and model, and takes one finite optimizer step on random features;
* hostile sizes: JSON nested around and far past :data:`MAX_JSON_DEPTH`, lone surrogates in
  ids and captions, ids around :data:`MAX_ID_BYTES` in 1- to 4-byte characters: a manifest
  reads or is one printable line naming its line, ``data import`` rejects just that row,
  and the feature cache stores exactly the ids :func:`id_problem` passes;
* model directories: ``oneencoder.json`` with keys dropped or retyped, files replaced by
  garbage, truncated or foreign safetensors (checksum updated or not); an accepted one
  loads and embeds a real stamp's cached caption and image features to finite unit
  vectors, and ``info`` prints one line on error.

Runs are derandomized (the same examples every time) and keep no example database.
Sizes (model widths, image sizes) are drawn small: a huge but valid width is a resource
limit, not a validation bug.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import oneencoder  # noqa: E402
from oneencoder.cli.main import app  # noqa: E402
from oneencoder.data.manifest import MAX_ID_BYTES, SPLITS, id_problem, manifest_hash, read_manifest  # noqa: E402
from oneencoder.data.table_import import import_table  # noqa: E402
from oneencoder.errors import OneEncoderError, SampleError  # noqa: E402
from oneencoder.fileio import MAX_JSON_DEPTH  # noqa: E402
from oneencoder.modality import create_stage_modalities, get_modality_class  # noqa: E402
from oneencoder.model.losses import LOSSES  # noqa: E402
from oneencoder.model.parts import build_model  # noqa: E402
from oneencoder.training.config import (AdapterConfig, CurriculumConfig, LossConfig, ProjectionConfig, TrainConfig,  # noqa: E402
                                        load_stage)
from oneencoder.training.curriculum.pacers import create_pacer, list_pacers  # noqa: E402
from oneencoder.training.objective import stage_loss  # noqa: E402
from oneencoder.training.trainer import lr_at  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The examples run tiny tensors: one thread is as fast and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- JSON and TOML values -------------------------------------------------------------------

_FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-12, 1e9, 1e300, -1e300, math.nan, math.inf, -math.inf]
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from(_FLOAT_EDGES)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables and arrays; nan and inf as TOML spells them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (a lone surrogate makes the file invalid TOML: fine)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


toml_scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.sampled_from(_FLOAT_EDGES)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10))
toml_values = st.recursive(toml_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.sampled_from(["a", "start", "full_at", "k"]), kids, max_size=2),
                           max_leaves=4)

def _kind(e: Exception) -> str:
    """The message without file names and values, to count the kinds of refusal (--hypothesis-show-statistics)."""
    words = [w for w in str(e).split() if not w.startswith("/")]  # drop the temporary paths
    return " ".join(words[:4])


# ----- manifests ----------------------------------------------------------------------------


def _edits(fields: list[str], hostile: bool) -> st.SearchStrategy[tuple]:
    """Edits of one row: benign ones keep it valid (odd text, extra fields); hostile ones need not."""
    benign = st.one_of(st.tuples(st.just("set"), st.sampled_from(["caption", "image", "extra"]), st.text(max_size=30)),
                       st.tuples(st.just("set"), st.sampled_from(["caption", "image", "sound"]), st.none()),
                       st.tuples(st.just("drop"), st.sampled_from(["split", "group", "sound", "category"])))
    if not hostile:
        return benign
    return st.one_of(benign, st.tuples(st.just("drop"), st.sampled_from(fields)),
                     st.tuples(st.just("set"), st.sampled_from(fields), json_values),
                     st.tuples(st.just("set"), st.just("split"), st.sampled_from([*SPLITS, "TRAIN", "dev", ""])))


def _row_bytes(row: dict, edits: list[tuple]) -> bytes:
    row = dict(row)
    for e in edits:
        if e[0] == "drop":
            row.pop(e[1], None)
        else:
            row[e[1]] = e[2]
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def manifest_lines(draw, records: list[dict]) -> list[bytes]:
    """Rows of real stamps (distinct ids), edited; in hostile manifests also bad lines of every kind."""
    hostile = draw(st.booleans())
    fields = sorted({*records[0], "_reserved"})
    picks = draw(st.lists(st.integers(0, 11), min_size=0 if hostile else 1, max_size=8, unique=not hostile))
    lines = [_row_bytes(records[i], draw(st.lists(_edits(fields, hostile), max_size=3))) for i in picks]
    if hostile:
        bad = st.one_of(st.sampled_from(records[:8]).map(lambda r: json.dumps(
                            {**r, "caption": r["caption"] + " caf\xe9"}, ensure_ascii=False).encode("latin-1", "replace")),
                        json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40),
                        st.sampled_from([b"", b"   ", b"{", b"\xef\xbb\xbf{}", b"[1, 2]", b"null"]))
        for _ in range(draw(st.integers(0, 2))):
            lines.insert(draw(st.integers(0, len(lines))), draw(bad))
    return lines


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzzed_manifest_reads_or_is_one_error(data, small_records, text_modality, image_modality,
                                              tmp_path_factory) -> None:
    lines = data.draw(manifest_lines(small_records))
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    path = folder / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        rows = read_manifest(path)
    except OneEncoderError as e:
        assert str(e) and "\n" not in str(e)
        event(f"refused: {_kind(e)}")
        return
    event("accepted")
    ids = [r["id"] for r in rows]
    assert rows and all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)
    assert all(r["split"] in SPLITS for r in rows)
    assert len(manifest_hash(rows)) == 64
    for row in rows[:2]:
        for modality, key in ((text_modality, "caption"), (image_modality, "image")):
            if isinstance(row.get(key), str):
                try:
                    _, item = modality.prepare(row[key])
                except SampleError:
                    continue
                assert item is not None  # token ids (text), a finite pixel tensor (image)
                assert not isinstance(item, torch.Tensor) or bool(torch.isfinite(item).all())


# ----- stage files --------------------------------------------------------------------------

SECTIONS = {"model": ProjectionConfig(), "adapter": AdapterConfig(), "loss": LossConfig(),
            "train": TrainConfig(), "curriculum": CurriculumConfig()}
# Options that size tensors or cost a backbone probe: drawn from small values and edges (see module docstring).
_SIZES = {"d_model": [-1, 0, 1, 6, 8, 30, 32, 256], "heads": [-1, 0, 1, 2, 3, 4, 8], "layers": [-1, 0, 1, 2],
          "hidden": [-1, 0, 1, 64], "max_tokens": [-1, 0, 1, 2, 32], "language_dim": [-1, 0, 1, 384],
          "image_size": [-1, 0, 1, 8, 32, 224], "mlp_ratio": [-1.0, 0.0, 0.5, 2.0, math.nan, math.inf]}
_WORDS = {"pool": ["mean", "token", "max"], "name": ["infonce", "hnnce", "margin", "triplet"],
          "device": ["cpu", "auto", "bogus", "cuda:99"], "pacer": [*list_pacers(), "nope"],
          "tokens": ["pooled", "grid", "grid+pooled", "tokens", "pooled+tokens", "bogus"],
          "hn_source": ["frozen", "model", "other"], "weighting": ["none", "trust", "superloss", "bad"],
          "backbone": ["timm:tf_efficientnet_lite0", "timm:nope", "bogus", ""],
          "weights": ["", "/nonexistent/weights.pth"], "bank": ["auto", "memory", "disk", "ram"],
          "precision": ["auto", "fp32", "bf16", "fp8"]}


def option_value(key: str, default: Any, wild: bool = True) -> st.SearchStrategy[Any]:
    """Values of the default's type at its edges; if ``wild``, sometimes anything TOML holds."""
    if isinstance(default, bool):
        same = st.booleans()
    elif key in _SIZES:
        same = st.sampled_from(_SIZES[key])
    elif isinstance(default, int):
        same = st.integers(-3, 64) | st.sampled_from([2**32, 2**63 - 1, default])
    elif isinstance(default, float):
        same = st.sampled_from([*_FLOAT_EDGES, default, 2.0, 0.99]) | st.floats(-2, 2)
    elif isinstance(default, str):
        words = st.sampled_from(_WORDS.get(key, [default]))
        same = st.one_of(words, words, st.text(max_size=8)) if wild else words
    elif key in ("scorers", "pacer_options"):
        same = st.dictionaries(st.sampled_from(["text_nouns", "text_length", "start", "full_at", "blocks"]),
                               st.sampled_from([0, 0.5, 1, 2, -1, math.nan, math.inf]), max_size=2)
    elif isinstance(default, (list, tuple)):
        same = st.lists(st.sampled_from([0.5, 0.0, -1.0, 1e-9, math.nan, 1]), min_size=0, max_size=4)
    elif isinstance(default, dict):
        same = st.dictionaries(st.sampled_from(["max_tokens", "tokens", "bogus"]), st.integers(-1, 40), max_size=1)
    else:
        same = toml_values
    return st.one_of(same, same, same, same, same, toml_values) if wild else same


def _options() -> dict[str, dict[str, Any]]:
    out = {s: {k: v for k, v in vars(d).items()} for s, d in SECTIONS.items()}
    for name in ("image", "text"):
        out[f"modalities.{name}"] = dict(get_modality_class(name).default_options)
    return out


OPTIONS = _options()


@st.composite
def stage_texts(draw) -> bytes:
    """The shipped stage with random values for a few known (or unknown) options; now and then garbage."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))
    wild = draw(st.booleans())  # tame files hold values of the right types only
    changes: dict[str, dict[str, Any]] = {}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(OPTIONS)))
        key = draw(st.sampled_from(sorted(OPTIONS[section]) + (["wieght_decay"] if wild else [])))
        changes.setdefault(section, {})[key] = draw(option_value(key, OPTIONS[section][key], wild)
                                                    if key in OPTIONS[section] else toml_values)
    text = (REPO / "stages" / "image_text.toml").read_text()
    kept = []
    section = ""
    for row in text.splitlines():
        if row.startswith("["):
            section = row.strip("[] ")
        elif row.split("=")[0].strip() in changes.get(section, {}):
            continue
        kept.append(row)
    body = "\n".join(kept) + "\n"
    for section, values in changes.items():
        lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
        header = f"[{section}]\n"
        body = body.replace(header, header + lines, 1) if header in body else body + f"\n{header}{lines}"
    return body.encode("utf-8", "surrogatepass")


def _one_step(config) -> None:
    """What a run builds from the stage file alone, then one optimizer step on random features."""
    modalities = create_stage_modalities(config.modality_options, config.modalities)
    facts = {n: m.fingerprint() | {"language_slice": m.language_slice()} for n, m in modalities.items()}
    create_pacer(config.curriculum.pacer, **config.curriculum.pacer_options)
    model = build_model(config.model, facts, {n: config.adapter for n in facts})
    loss = stage_loss(config.loss)
    params = [p for p in [*model.parameters(), *loss.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr_at(0, 10, config.train), weight_decay=config.train.weight_decay)
    gen = torch.Generator().manual_seed(0)
    embedded = []
    for name, f in facts.items():
        tokens = torch.randn(8, f["max_tokens"], f["feature_dim"], generator=gen)
        embedded.append(model(name, tokens, torch.ones(8, f["max_tokens"], dtype=torch.bool)))
    needs_margins = LOSSES.get(config.loss.name).needs_margins
    extra = {"margin": config.loss.max_margin * torch.rand(8, generator=gen)} if needs_margins else {}
    out = loss(*embedded, **extra)
    assert torch.isfinite(out["loss"]), out
    out["loss"].backward()
    if config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


@settings(FUZZ, max_examples=120)
@given(text=stage_texts())
def test_fuzzed_stage_file_loads_or_is_one_error(text: bytes, tmp_path_factory) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "stage.toml"
    path.write_bytes(text)
    try:
        config = load_stage(path)
        _one_step(config)
    except OneEncoderError as e:
        assert str(e) and "\n" not in str(e).strip()
        event(f"refused: {_kind(e)}")
        return
    event("accepted: one finite step")


# ----- hostile sizes: nesting depth, lone surrogates, long ids (issue 26) ---------------------

#: Depths around the limit, and far past Python's recursion limit.
nesting_depths = st.integers(1, 3 * MAX_JSON_DEPTH) | st.sampled_from(
    [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1000, 100_000])
lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)  # st.text() never draws these (category Cs)
texts_with_a_surrogate = st.tuples(st.text(max_size=6), lone_surrogates, st.text(max_size=6)).map("".join)


@st.composite
def long_ids(draw) -> str:
    """Ids of 1- to 4-byte characters whose UTF-8 size lies near :data:`MAX_ID_BYTES`, or anywhere up to 4x."""
    char = draw(st.sampled_from(["a", "\xe9", "\u20ac", "\U0001f600"]))
    per = len(char.encode("utf-8"))
    near = MAX_ID_BYTES // per
    n = draw(st.integers(near - 2, near + 2) | st.integers(1, 4 * MAX_ID_BYTES // per))
    return draw(st.text(max_size=3)) + char * n


def _nested_json(depth: int, brackets: str) -> str:
    """JSON text ``depth`` levels deep: ``[[...]]`` or ``{"a": {"a": ... 1}}``."""
    if brackets == "[":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


@st.composite
def hostile_rows(draw) -> tuple[str, str, Any]:
    """``(kind, one JSONL line, what it holds)``: a deep field, a lone surrogate in the id or a
    caption, or a long id; the line is exactly what a hostile file would hold."""
    kind = draw(st.sampled_from(["deep", "surrogate id", "surrogate caption", "long id"]))
    if kind == "deep":
        depth = draw(nesting_depths)
        return kind, '{"id": "deep", "caption": "A cat.", "x": ' + _nested_json(depth, draw(st.sampled_from("[{"))) \
            + "}", depth + 1  # the row's own object is one level
    if kind == "long id":
        sid = draw(long_ids())
        return kind, json.dumps({"id": sid, "caption": "A cat."}, ensure_ascii=draw(st.booleans())), sid
    text = draw(texts_with_a_surrogate)
    row = {"id": text, "caption": "A cat."} if kind == "surrogate id" else {"id": "s", "caption": text}
    return kind, json.dumps(row), text  # ASCII JSON: the surrogate as a \\udXXX escape, as a hostile file writes it


@settings(FUZZ, max_examples=150)
@given(hostile=hostile_rows())
def test_fuzzed_hostile_manifest_row_reads_or_is_one_printable_line(hostile, tmp_path_factory) -> None:
    """Deep rows and lone surrogates are one line naming file and line; a long id reads (cache build rejects it)."""
    kind, line, held = hostile
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "manifest.jsonl"
    path.write_text(json.dumps({"id": "good", "caption": "A dog."}) + "\n" + line + "\n", encoding="utf-8")
    try:
        rows = read_manifest(path)
    except OneEncoderError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(f"{path}:2: ")
        message.encode("utf-8")  # printable as it is
        if kind == "deep":
            assert held > MAX_JSON_DEPTH and "nested deeper than" in message
        else:
            assert kind.startswith("surrogate") and "lone surrogate" in message
        event(f"refused: {kind}")
        return
    assert kind == "long id" or (kind == "deep" and held <= MAX_JSON_DEPTH), kind
    assert len(rows) == 2 and len(manifest_hash(rows)) == 64
    event(f"accepted: {kind}")


@settings(FUZZ, max_examples=100)
@given(hostile=hostile_rows())
def test_fuzzed_hostile_table_row_is_imported_or_rejected(hostile, tmp_path_factory) -> None:
    """In `data import` every hostile row is that row's reject (with its line) or a sample; the good row stays."""
    kind, line, held = hostile
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (folder / "t.jsonl").write_text(json.dumps({"id": "good", "caption": "A dog."}) + "\n" + line + "\n",
                                    encoding="utf-8")
    report = import_table(folder / "t.jsonl", folder / "m.jsonl", ["text=caption"], id_col="id", progress=False)
    assert report.samples[0]["id"] == "good"
    too_long = kind == "long id" and len(held.encode("utf-8")) > MAX_ID_BYTES
    refused = (kind == "deep" and held > MAX_JSON_DEPTH) or kind.startswith("surrogate") or too_long
    assert len(report.samples) == 1 + (not refused)
    assert [r["line"] for r in report.rejects] == ([2] if refused else [])
    read_manifest(folder / "m.jsonl")  # what an import writes always reads back
    assert [json.loads(x)["line"] for x in report.rejects_path.read_text(encoding="utf-8").splitlines()] \
        == [r["line"] for r in report.rejects]
    event(f"{'rejected' if refused else 'imported'}: {kind}")


@settings(FUZZ, max_examples=150)
@given(sid=long_ids() | texts_with_a_surrogate | st.text(max_size=20))
def test_fuzzed_id_keys_the_cache_exactly_when_id_problem_says(sid: str, tmp_path_factory) -> None:
    """:func:`id_problem` is the cache's own rule: a real LMDB stores every id it passes, refuses the rest."""
    from oneencoder.features.cache import FeatureCache

    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    with FeatureCache(root / "c", {"feature_dim": 2, "max_tokens": 1}) as cache:
        tokens = torch.ones(1, 2)
        if id_problem(sid) is None:
            cache.put_many([(sid, tokens, {})])
            assert cache.ids() == {sid} and torch.equal(cache.get(sid).float(), tokens)
            event("stored")
        else:
            with pytest.raises(SampleError):
                cache.put_many([(sid, tokens, {})])
            assert cache.ids() == set()
            event("refused")


# ----- model directories --------------------------------------------------------------------


def _paths(meta: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    """Key paths into ``oneencoder.json`` (the stage history only three levels deep)."""
    out = [prefix] if prefix else []
    limit = 3 if prefix[:1] == ("stages",) else 4
    if depth < limit and isinstance(meta, dict):
        for k, v in meta.items():
            out += _paths(v, (*prefix, k), depth + 1)
    elif depth < limit and isinstance(meta, list):
        for i, v in enumerate(meta[:2]):
            out += _paths(v, (*prefix, i), depth + 1)
    return out


def _set(meta: Any, path: tuple, value: Any = None, delete: bool = False) -> None:
    for key in path[:-1]:
        meta = meta[key]
    if delete:
        del meta[path[-1]]
    else:
        meta[path[-1]] = value


_CLASSES = ["", "nope.module:Nope", "os.path:join", "oneencoder.modality:Modality", "oneencoder.modalities.text:Text"]


def _garbage(kind: str, original: bytes, other: bytes, noise: bytes) -> bytes:
    if kind == "noise":
        return noise
    if kind == "truncated":
        return original[: len(noise) % max(1, len(original))]
    if kind == "header":
        return original[:8] + noise[:32] + original[8 + len(noise[:32]):]
    if kind == "length":
        return (len(noise) * 10**9).to_bytes(8, "little") + original[8:]
    return other  # a valid safetensors file of other tensors


# Keys older models lack: a model without them must still load.
_OPTIONAL = ("class", "distribution", "distribution_version", "language_source", "metric_style", "language_slice")


@st.composite
def model_edits(draw, meta: dict) -> list[tuple]:
    """Edits of a model directory; tame ones (half the examples) keep it loadable."""
    paths = _paths(meta)
    rels = sorted(meta["files"])
    tame = st.one_of(
        st.tuples(st.just("delete"), st.sampled_from([("modalities", n, k) for n in meta["modalities"]
                                                      for k in _OPTIONAL if k in meta["modalities"][n]])),
        st.tuples(st.just("set"), st.sampled_from([p for p in paths if p[:1] == ("stages",) and len(p) > 2]),
                  json_values),
        st.tuples(st.just("set"), st.sampled_from([("note",), ("modalities", "text", "note")]), json_values),
    )
    if draw(st.booleans()):
        return draw(st.lists(tame, min_size=1, max_size=3))
    edit = st.one_of(
        tame,
        st.tuples(st.just("delete"), st.sampled_from(paths)),
        st.tuples(st.just("set"), st.sampled_from(paths), json_values),
        st.tuples(st.just("set"), st.sampled_from([p for p in paths if p[-1] == "class"] or paths),
                  st.sampled_from(_CLASSES)),
        st.tuples(st.just("file"), st.sampled_from(rels), st.sampled_from(["noise", "truncated", "header",
                                                                           "length", "other"]),
                  st.binary(min_size=1, max_size=64), st.booleans()),
        st.tuples(st.just("unlink"), st.sampled_from(rels)),
        st.tuples(st.just("meta-bytes"), st.binary(max_size=40)),
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


def _apply(model: Path, meta: dict, edits: list[tuple], other: bytes) -> None:
    meta = copy.deepcopy(meta)
    raw = None
    for e in edits:
        if e[0] in ("delete", "set"):
            if _reachable(meta, e[1]):  # an earlier edit may have removed or retyped its parent
                _set(meta, e[1], *e[2:], delete=e[0] == "delete")
        elif e[0] == "file":
            rel, kind, noise, update = e[1:]
            original = (model / rel).read_bytes() if (model / rel).is_file() else b""  # an earlier edit unlinked it
            data = _garbage(kind, original, other, noise)
            (model / rel).write_bytes(data)
            if update and isinstance(meta.get("files"), dict):
                meta["files"][rel] = hashlib.sha256(data).hexdigest()
        elif e[0] == "unlink":
            (model / e[1]).unlink(missing_ok=True)
        else:
            raw = e[1]
    (model / "oneencoder.json").write_bytes(raw if raw is not None else json.dumps(meta).encode())


def _reachable(meta: Any, path: tuple) -> bool:
    for key in path[:-1]:
        if isinstance(meta, dict) and key in meta or isinstance(meta, list) and isinstance(key, int) and key < len(meta):
            meta = meta[key]
        else:
            return False
    return (isinstance(meta, dict) and path[-1] in meta) or (isinstance(meta, list) and isinstance(path[-1], int)
                                                             and path[-1] < len(meta))


@pytest.fixture(scope="module")
def cached_features(small_cache, stage_modalities, small_records) -> dict[str, torch.Tensor]:
    """Real backbone features of one stamp per modality, from the session's feature cache."""
    from oneencoder.features.cache import FeatureCache, cache_dir_for

    out = {}
    for name, modality in stage_modalities.items():
        with FeatureCache(cache_dir_for(small_cache, name), modality.fingerprint(), readonly=True) as cache:
            out[name] = cache.get(small_records[0]["id"]).float()
    return out


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzzed_model_dir_loads_or_is_one_error(data, trained_model, cached_features, tmp_path_factory) -> None:
    """Embeds a stamp's real cached features: the model directory is under test, not the backbones."""
    source = Path(trained_model["dir"])
    meta = json.loads((source / "oneencoder.json").read_text())
    edits = data.draw(model_edits(meta))
    model = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "model"
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("runs"))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(model.parent / "other.safetensors"))
    _apply(model, meta, edits, (model.parent / "other.safetensors").read_bytes())

    result = CliRunner().invoke(app, ["info", str(model)])
    assert result.exit_code in (0, 2) and isinstance(result.exception, (SystemExit, type(None))), result.output
    if result.exit_code == 2:
        assert sum(line.startswith("error: ") for line in result.output.splitlines()) == 1, result.output
    try:
        m = oneencoder.load(model)
        embedded = [m.encode_features(n, f) for n, f in cached_features.items() if n in m.modalities]
        for emb in embedded:
            assert emb.shape[0] == 1 and bool(torch.isfinite(emb).all())
            assert abs(float(emb.norm()) - 1.0) < 1e-3
    except OneEncoderError as e:
        assert str(e) and "\n" not in str(e).strip()
        event(f"refused: {_kind(e)}")
        return
    event("accepted: loads and embeds")
