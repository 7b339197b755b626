"""Bad user input ends in one ``error:`` line naming what to fix, never a traceback or a silent result.

Each test reproduces one case of issue 13's probe through the real CLI (typer's CliRunner,
in-process) on the real Tux Paint data, model and caches of conftest.py. Read-only and
full file systems are real tmpfs mounts (root only; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import ConfigError
from oneencoder.fileio import write_jsonl_atomic
from oneencoder.options import Range, declarations
from oneencoder.training.config import parse_stage

REPO = Path(__file__).resolve().parent.parent
STAGE_TEXT = (REPO / "stages" / "image_text.toml").read_text(encoding="utf-8")
runner = CliRunner()


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line(result, *fragments: str) -> str:
    """Exit code 2 and exactly one ``error:`` line holding every fragment; returns the line."""
    text = result.output.strip()
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1, text
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def stage_file(tmp_path: Path, section: str, line: str, name: str = "stage.toml") -> Path:
    """The shipped stage with ``line`` put at the top of ``[section]`` (replacing that key)."""
    key = line.split("=")[0].strip()  # each key used here appears once in the shipped stage
    text = "".join(row + "\n" for row in STAGE_TEXT.splitlines() if row.split("=")[0].strip() != key)
    header = f"[{section}]"
    text = text.replace(header + "\n", f"{header}\n{line}\n", 1) if header in text else text + f"\n{header}\n{line}\n"
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----- real read-only and full file systems ------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m", readonly: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (as root), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    opts = f"size={size}" + (",ro" if readonly else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write: a read-only tmpfs as root, a 0555 folder otherwise."""
    where = tmp_path / "ro"
    if os.geteuid() != 0:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    with tmpfs(where, size="32m", readonly=True) as mounted:  # room for a copied model (remounted rw)
        yield mounted


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: big enough for small JSON files, too small for features or weights."""
    with tmpfs(tmp_path / "full", size="64k") as mounted:
        yield mounted


def test_tmpfs_fixtures_are_what_they_claim(read_only: Path, full_disk: Path) -> None:
    with pytest.raises(OSError):
        (read_only / "x").write_bytes(b"x")
    with pytest.raises(OSError, match="No space left"):
        (full_disk / "x").write_bytes(b"x" * (1 << 20))


# ----- manifests ------------------------------------------------------------------------------


def _build(tmp_path: Path, manifest: Path, *extra: Any):
    return invoke("cache", "build", "--manifest", manifest, "--cache-dir", tmp_path / "cache", "--workers", 0,
                  "--device", "cpu", *extra)


def test_manifest_non_utf8_caption_is_one_line(small_records, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, small_records[:3])
    row = json.dumps({**small_records[3], "caption": "A \udcff frog."}, ensure_ascii=False)
    with open(manifest, "ab") as f:  # a Latin-1 byte inside a caption
        f.write(row.encode("utf-8", "surrogateescape") + b"\n")
    assert_one_line(_build(tmp_path, manifest), f"{manifest}:4", "not valid UTF-8", "0xff")
    assert not (tmp_path / "cache").exists()  # refused before any backbone ran


@pytest.mark.parametrize("bad_id", [["a", "b"], 5, None], ids=["list", "number", "null"])
def test_manifest_id_of_wrong_type_is_one_line(small_records, tmp_path: Path, bad_id: Any) -> None:
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, [*small_records[:3], {**small_records[3], "id": bad_id}])
    assert_one_line(_build(tmp_path, manifest), f"{manifest}:4", "field 'id' must be a non-empty string",
                    json.dumps(bad_id))


# ----- stage files ---------------------------------------------------------------------------


def _train(tmp_path: Path, stage: Path, small_manifest: Path, small_cache: Path, *extra: Any):
    return invoke("train", "--stage", stage, "--model", tmp_path / "model", "--manifest", small_manifest,
                  "--cache-dir", small_cache, "--epochs", 1, *extra)


@pytest.mark.parametrize("section, line, fragment", [
    ("train", "lr = inf", "[train] lr must be in (0, 1] (a finite number), got inf"),
    ("train", "weight_decay = nan", "[train] weight_decay must be >= 0 (a finite number), got nan"),
    ("loss", "init_temperature = inf", "[loss] init_temperature must be > 0 (a finite number), got inf"),
    # silently wrong before: a negative warmup trained with a negative learning rate, nan turned clipping off
    ("train", "warmup_steps = -5", "[train] warmup_steps must be >= 0 (a finite number), got -5"),
    ("train", "grad_clip = nan", "[train] grad_clip must be >= 0 (a finite number), got nan"),
], ids=["lr-inf", "weight_decay-nan", "init_temperature-inf", "warmup-negative", "grad_clip-nan"])
def test_stage_value_out_of_range_is_one_line(small_manifest, small_cache, tmp_path: Path, section: str,
                                              line: str, fragment: str) -> None:
    stage = stage_file(tmp_path, section, line)
    assert_one_line(_train(tmp_path, stage, small_manifest, small_cache), str(stage), fragment)
    assert not (tmp_path / "model").exists()


def _no_such_device() -> str:
    """A CUDA device this machine does not have (plain ``cuda`` on a machine without a GPU)."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("device, fragment", [("bogus", "device 'bogus' is not a device"),
                                              (_no_such_device(), "CUDA")], ids=["bogus", "cuda-missing"])
def test_unusable_device_is_one_line(small_manifest, small_cache, tmp_path: Path, device: str, fragment: str) -> None:
    stage = stage_file(tmp_path, "train", f'device = "{device}"')
    assert_one_line(_train(tmp_path, stage, small_manifest, small_cache), fragment)
    assert_one_line(invoke("cache", "build", "--manifest", small_manifest, "--cache-dir", tmp_path / "cache",
                           "--device", device), fragment)


@pytest.mark.parametrize("section, line, fragment", [
    ("modalities.image", "image_size = 0", "[modalities.image] image_size must be >= 1 (a finite number), got 0"),
    ("modalities.text", "max_tokens = -1", "[modalities.text] max_tokens must be >= 1 (a finite number), got -1"),
    ("modalities.image", 'semantic = "yes"', "[modalities.image] semantic must be true or false, got 'yes'"),
    ("modalities.image", "std = [0.5, 0.5]", "[modalities.image] std must be a list of 3 finite numbers > 0"),
], ids=["image_size-0", "max_tokens-negative", "semantic-string", "std-short"])
def test_bad_modality_option_is_one_line(small_manifest, tmp_path: Path, section: str, line: str,
                                         fragment: str) -> None:
    """Silently wrong before: every sample was rejected as if the data were bad (``cache build``)."""
    stage = stage_file(tmp_path, section, line)
    assert_one_line(_build(tmp_path, small_manifest, "--stage", stage), fragment)
    assert not (tmp_path / "cache").exists()


def _bad_values(rule: Range, default: Any) -> list[float]:
    """Values just outside ``rule`` (a field's declared range), and nan and inf for float options."""
    out = [float("nan"), float("inf"), float("-inf")] if isinstance(default, float) else []
    if rule.lo is not None:
        out.append(rule.lo - 1 if rule.lo_in else rule.lo)
    if rule.hi is not None:
        out.append(rule.hi + 1 if rule.hi_in else rule.hi)
    return out


def _defaults() -> dict[str, Any]:
    from oneencoder.training.config import AdapterConfig, CurriculumConfig, LossConfig, ProjectionConfig, TrainConfig

    return {"model": ProjectionConfig(), "adapter": AdapterConfig(), "loss": LossConfig(), "train": TrainConfig(),
            "curriculum": CurriculumConfig()}


def _ranges(section: str) -> dict[str, Range]:
    """The declared range of each option of ``section`` that has one."""
    return {k: o.range for k, o in declarations(_defaults()[section]).items() if o.range is not None}


@pytest.mark.parametrize("section, option", [(s, o) for s in _defaults() for o in _ranges(s)])
def test_every_numeric_stage_option_is_range_checked(stage_raw: dict, section: str, option: str) -> None:
    default = getattr(_defaults()[section], option)
    for value in _bad_values(_ranges(section)[option], default):
        raw = json.loads(json.dumps(stage_raw))
        raw.setdefault(section, {})[option] = value
        with pytest.raises(ConfigError, match=rf"test.toml: \[{section}\] {option} must be"):
            parse_stage(raw, "test.toml")


def test_learning_rate_times_weight_decay_below_one(stage_raw: dict) -> None:
    """Each in range, together they would flip (or zero) every weight each AdamW step."""
    raw = json.loads(json.dumps(stage_raw))
    raw["train"].update(lr=0.5, weight_decay=2.0)
    with pytest.raises(ConfigError, match=r"\[train\] lr \* weight_decay must be < 1"):
        parse_stage(raw, "test.toml")
    raw["train"].update(lr=0.5, weight_decay=1.5)
    assert parse_stage(raw, "test.toml").train.weight_decay == 1.5


def test_every_numeric_stage_option_has_a_range() -> None:
    """A numeric option added later without a range would skip the checks above."""
    for section, values in _defaults().items():
        numeric = {k for k, v in vars(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numeric <= set(_ranges(section)), (section, numeric - set(_ranges(section)))


def test_stage_file_not_utf8_is_one_line(tmp_path: Path) -> None:
    stage = tmp_path / "latin1.toml"
    stage.write_bytes(STAGE_TEXT.replace("Stage 1", "Stage \xe9").encode("latin-1"))
    assert_one_line(invoke("train", "--stage", stage, "--model", tmp_path / "m"), str(stage), "not valid UTF-8")


# ----- model directories ---------------------------------------------------------------------


def _copy_model(trained_model: dict, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model, ignore=shutil.ignore_patterns("runs"))
    return model


def _edit_meta(model: Path, edit) -> None:
    meta = json.loads((model / "oneencoder.json").read_text())
    edit(meta)
    (model / "oneencoder.json").write_text(json.dumps(meta))


def _assert_refused_everywhere(model: Path, tmp_path: Path, *fragments: str) -> None:
    """``info`` and ``embed`` both refuse the directory with the same one line."""
    assert_one_line(invoke("info", model), *fragments)
    assert_one_line(invoke("embed", "text", "A frog.", "--model", model, "--out", tmp_path / "e.npy"), *fragments)
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize("path", ["projection", "modalities", "files", "stages", "d_model",
                                  "modalities.text.adapter", "modalities.image.options"])
def test_model_meta_missing_key_is_one_line(trained_model, tmp_path: Path, path: str) -> None:
    model = _copy_model(trained_model, tmp_path)
    *parents, key = path.split(".")

    def drop(meta: dict) -> None:
        table = meta
        for p in parents:
            table = table[p]
        del table[key]

    _edit_meta(model, drop)
    where = f": {'.'.join(parents)}" if parents else ""
    _assert_refused_everywhere(model, tmp_path, f"oneencoder.json{where} misses the key '{key}'")


def test_model_meta_files_as_list_is_one_line(trained_model, tmp_path: Path) -> None:
    model = _copy_model(trained_model, tmp_path)
    _edit_meta(model, lambda meta: meta.update(files=list(meta["files"])))
    _assert_refused_everywhere(model, tmp_path, "oneencoder.json: files must be an object")


class _Payload:
    """What a malicious pickle would run on load: here it only creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _replace_with_checksum(model: Path, rel: str, data: bytes) -> None:
    """Put ``data`` in place of ``rel`` and record its checksum, as an attacker would."""
    (model / rel).write_bytes(data)
    _edit_meta(model, lambda meta: meta["files"].update({rel: hashlib.sha256(data).hexdigest()}))


def test_pickle_as_safetensors_is_refused_without_running(trained_model, tmp_path: Path) -> None:
    model = _copy_model(trained_model, tmp_path)
    marker = tmp_path / "payload-ran"
    _replace_with_checksum(model, "projection.safetensors", pickle.dumps(_Payload(marker)))
    assert pickle.loads((model / "projection.safetensors").read_bytes()) is None and marker.exists()  # it is live
    marker.unlink()
    _assert_refused_everywhere(model, tmp_path, "projection.safetensors is not a valid safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("garble", ["header", "truncated"])
def test_garbled_safetensors_is_one_line(trained_model, tmp_path: Path, garble: str) -> None:
    model = _copy_model(trained_model, tmp_path)
    data = bytearray((model / "adapters" / "text.safetensors").read_bytes())
    if garble == "header":
        data[8:40] = b"x" * 32
    else:
        data = data[: len(data) // 2]
    _replace_with_checksum(model, "adapters/text.safetensors", bytes(data))
    _assert_refused_everywhere(model, tmp_path, "adapters/text.safetensors is not a valid safetensors file")


def test_safetensors_with_other_tensors_is_one_line(trained_model, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = _copy_model(trained_model, tmp_path)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    _replace_with_checksum(model, "projection.safetensors", (tmp_path / "other.safetensors").read_bytes())
    line = assert_one_line(invoke("embed", "text", "A frog.", "--model", model, "--out", tmp_path / "e.npy"))
    assert "projection.safetensors does not hold the tensors oneencoder.json describes" in line


def test_model_meta_class_that_is_no_modality_is_one_line(trained_model, tmp_path: Path) -> None:
    """A modality recorded with a class that imports but is not a Modality (here a function)."""
    model = _copy_model(trained_model, tmp_path)
    shutil.copy(model / "adapters" / "text.safetensors", model / "adapters" / "words.safetensors")

    def rename(meta: dict) -> None:
        meta["modalities"]["words"] = {**meta["modalities"].pop("text"), "class": "os.path:join"}
        meta["files"]["adapters/words.safetensors"] = meta["files"].pop("adapters/text.safetensors")

    _edit_meta(model, rename)
    assert "records the class os.path:join, which is not one" in invoke("info", model).output
    assert_one_line(invoke("embed", "words", "A frog.", "--model", model, "--out", tmp_path / "e.npy"),
                    "modality 'words': the model records the class os.path:join, which is not one")


# ----- embed --from-file --------------------------------------------------------------------


def test_embed_from_file_non_utf8_is_one_line(trained_model, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.txt"
    inputs.write_bytes("A frog.\nA caf\xe9.\n".encode("latin-1"))
    result = invoke("embed", "text", "--from-file", inputs, "--model", trained_model["dir"],
                    "--out", tmp_path / "e.npy")
    assert_one_line(result, f"--from-file {inputs}:2: not valid UTF-8", "0xe9")


# ----- output locations: read-only and full, found before the work --------------------------


def test_read_only_embed_out_is_one_line(trained_model, read_only: Path, tmp_path: Path) -> None:
    result = invoke("embed", "text", "A frog.", "--model", trained_model["dir"], "--out", read_only / "e.npy")
    assert_one_line(result, f"cannot write {read_only / 'e.npy'}")


def test_read_only_cache_build_is_one_line(small_manifest, read_only: Path) -> None:
    result = invoke("cache", "build", "--manifest", small_manifest, "--cache-dir", read_only / "cache",
                    "--workers", 0, "--device", "cpu")
    assert_one_line(result, f"cannot write the feature cache {read_only / 'cache'}")


def test_read_only_train_model_is_one_line(small_manifest, small_cache, read_only: Path, tmp_path: Path) -> None:
    result = invoke("train", "--stage", "image_text", "--model", read_only / "model", "--manifest", small_manifest,
                    "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu")
    line = assert_one_line(result, f"cannot write {read_only / 'model'}")
    assert "train:" not in result.output, line  # refused before the first step


def test_read_only_data_out_is_one_line(stamps, read_only: Path) -> None:
    assert_one_line(invoke("data", "tuxpaint", "--out", read_only / "m.jsonl"), f"cannot write {read_only / 'm.jsonl'}")


def test_read_only_eval_out_is_found_before_the_work(trained_model, small_manifest, read_only: Path,
                                                     tmp_path: Path) -> None:
    cache = tmp_path / "fresh-cache"  # eval would build every feature here first
    result = invoke("eval", "--model", trained_model["dir"], "--manifest", small_manifest, "--cache-dir", cache,
                    "--out", read_only / "eval.json")
    assert_one_line(result, f"cannot write {read_only / 'eval.json'}")
    assert not cache.exists()


def test_read_only_default_eval_out_in_the_model_dir(trained_model, small_manifest, small_cache, read_only: Path,
                                                     tmp_path: Path) -> None:
    """A shared model on a read-only disk: eval's default output beside it is refused up front."""
    if os.geteuid() == 0:  # copy the model onto a read-only mount: remount it read-write first
        subprocess.run(["mount", "-o", "remount,rw", str(read_only)], check=True)
        shutil.copytree(trained_model["dir"], read_only / "model", ignore=shutil.ignore_patterns("runs"))
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    else:
        read_only.chmod(0o755)
        shutil.copytree(trained_model["dir"], read_only / "model", ignore=shutil.ignore_patterns("runs"))
        for folder in (read_only / "model", read_only / "model" / "adapters", read_only):
            folder.chmod(0o555)
    result = invoke("eval", "--model", read_only / "model", "--manifest", small_manifest, "--cache-dir", small_cache)
    assert_one_line(result, f"cannot write {read_only / 'model' / 'eval-test.json'}")


def test_disk_full_model_save_names_the_file(small_manifest, small_cache, full_disk: Path) -> None:
    result = invoke("train", "--stage", "image_text", "--model", full_disk / "model", "--manifest", small_manifest,
                    "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu")
    line = assert_one_line(result, f"no space left on {full_disk / 'model'}")
    assert ".safetensors" in line
    leftovers = [p.name for p in full_disk.rglob("*.tmp")]
    assert not leftovers, leftovers  # the half-written temporary files are gone


def _build_text_first(small_manifest: Path, cache: Path, tmp_path: Path):
    """``cache build`` of the shipped stage, text first: its features alone overflow 64 KiB."""
    stage = tmp_path / "text-first.toml"
    stage.write_text(STAGE_TEXT.replace('modalities = ["image", "text"]', 'modalities = ["text", "image"]'))
    return invoke("cache", "build", "--stage", stage, "--manifest", small_manifest, "--cache-dir", cache,
                  "--workers", 0, "--device", "cpu")


def test_disk_full_cache_build_names_the_cache(small_manifest, full_disk: Path, tmp_path: Path) -> None:
    """LMDB reports the full disk as ``mdb_txn_commit: Input/output error``; the line says what it is."""
    result = _build_text_first(small_manifest, full_disk / "cache", tmp_path)
    assert_one_line(result, f"no space left on {full_disk / 'cache'}")


# ----- eval needs two of the model's modalities ---------------------------------------------


def test_eval_with_one_modality_says_which_exist(trained_model, small_records, tmp_path: Path) -> None:
    """Silently wrong before: an empty table and exit 0."""
    manifest = tmp_path / "text-only.jsonl"
    write_jsonl_atomic(manifest, [{k: v for k, v in r.items() if k != "image"} for r in small_records])
    result = invoke("eval", "--model", trained_model["dir"], "--manifest", manifest, "--cache-dir", tmp_path / "c",
                    "--out", tmp_path / "eval.json")
    assert_one_line(result, f"{manifest}: inputs for 1 of the model's modalities (text); eval needs two")
    assert not (tmp_path / "eval.json").exists()


# ----- file modes ---------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_model_dir_written_under_umask_022_is_readable_by_others(small_manifest, small_cache,
                                                                 tmp_path: Path) -> None:
    model = tmp_path / "model"
    with umask(0o022):
        result = invoke("train", "--stage", "image_text", "--model", model, "--manifest", small_manifest,
                        "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    files = [p for p in model.rglob("*") if p.is_file()]
    assert {"oneencoder.json", "projection.safetensors", "text.safetensors", "last.safetensors"} <= {p.name for p in files}
    modes = {str(p.relative_to(model)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert all(mode == 0o644 for mode in modes.values()), modes
    folders = [model, *(p for p in model.rglob("*") if p.is_dir())]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in folders)


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    """JSON written by us and safetensors written by the library itself (which makes its files 0600)."""
    from safetensors.torch import save_file

    from oneencoder.fileio import atomic_path, write_json_atomic

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        with umask(mask):
            write_json_atomic(tmp_path / f"{mask:o}.json", {"mask": mask})
            with atomic_path(tmp_path / f"{mask:o}.safetensors") as tmp:
                save_file({"w": torch.zeros(2)}, str(tmp))
        for suffix in (".json", ".safetensors"):
            assert stat.S_IMODE((tmp_path / f"{mask:o}{suffix}").stat().st_mode) == mode, (mask, suffix)

