"""``oneencoder data import``: real Tux Paint stamps copied into a table of your own, run as a subprocess."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.manifest import SPLITS, caption_group, caption_split, read_manifest
from oneencoder.data.table_import import fraction_split, import_table
from oneencoder.errors import ConfigError

CLI = Path(sys.executable).parent / "oneencoder"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N_GOOD = 40
SUMMARY = re.compile(r"^wrote (?P<out>\S+): (?P<n>\d+) samples \(train (?P<train>\d+), val (?P<val>\d+), "
                     r"test (?P<test>\d+)\), (?P<rej>\d+) rejected( \(see (?P<rejects>\S+)\))?$")


def _pick(stamps: list[dict]) -> list[dict]:
    """40 PNG stamps with captions, in id order: every stamp of the first repeated captions, then singles."""
    pngs = sorted((r for r in stamps if r["caption"] and r["image"].endswith(".png")), key=lambda r: r["id"])
    members = defaultdict(list)
    for r in pngs:
        members[r["group"]].append(r)
    shared = [g for g, rs in members.items() if len(rs) > 1][:8]
    picked = [r for g in shared for r in members[g]]
    picked += [r for r in pngs if r["group"] not in shared][: N_GOOD - len(picked)]
    return picked


@pytest.fixture(scope="module")
def table(stamps: list[dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A folder ``data/`` with ``imgs/*.png`` (real stamps, one truncated copy) and ``rows``."""
    root = tmp_path_factory.mktemp("import") / "data"
    (root / "imgs").mkdir(parents=True)
    rows = []
    for r in _pick(stamps):
        rel = f"imgs/{r['id'].replace('/', '-')}.png"
        shutil.copyfile(r["image"], root / rel)
        rows.append({"path": rel, "caption": r["caption"], "category": r["category"]})
    whole = (root / rows[0]["path"]).read_bytes()
    (root / "imgs" / "truncated.png").write_bytes(whole[: len(whole) // 3])
    bad = [{"path": "imgs/missing.png", "caption": "A missing picture.", "category": "bad"},
           {"path": "imgs/truncated.png", "caption": "A truncated picture.", "category": "bad"}]
    rows = rows[:10] + bad[:1] + rows[10:25] + bad[1:] + rows[25:]
    return {"root": root, "rows": rows}


def _write_table(root: Path, rows: list[dict], name: str = "pairs.csv") -> Path:
    path = root / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter="\t" if name.endswith(".tsv") else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``oneencoder data import ...`` as a separate process, run in ``cwd``."""
    return subprocess.run([str(CLI), "data", "import", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _cli_here(*args: str | Path, cwd: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """The same command in this process (typer's CliRunner), run in ``cwd``: faster, same code path."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, ["data", "import", *map(str, args)])


def _import(src: Path, out: Path, *extra: str, cwd: Path,
            monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[str, list[dict]]:
    """Import with ``--map image=path --map text=caption``; returns stdout and the manifest's rows."""
    args = (src, "--map", "image=path", "--map", "text=caption", "--out", out, *extra)
    if monkeypatch is None:
        result = _cli(*args, cwd=cwd)
        assert result.returncode == 0, result.stderr
    else:
        result = _cli_here(*args, cwd=cwd, monkeypatch=monkeypatch)
        assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def _line_of(rows: list[dict], path: str) -> int:
    return 2 + next(i for i, r in enumerate(rows) if r["path"] == path)  # line 1 is the header


def test_csv_import_from_another_folder(table: dict, tmp_path: Path) -> None:
    src = _write_table(table["root"], table["rows"])
    out = tmp_path / "outputs" / "manifest.jsonl"
    # Run from the table's parent with a relative table path: paths resolve against the table's folder.
    result, written = _import(src.relative_to(table["root"].parent), out, cwd=table["root"].parent)

    summary = SUMMARY.match(result.strip().splitlines()[-1])
    assert summary, result
    assert int(summary["n"]) == len(written) == N_GOOD and int(summary["rej"]) == 2
    assert sum(int(summary[s]) for s in SPLITS) == N_GOOD
    rejects_file = out.with_name("manifest.rejects.jsonl")
    assert summary["out"] == str(out) and summary["rejects"] == str(rejects_file)

    # Splits and groups follow the caption-hash split of Tux Paint, so shared captions stay together.
    # Ids: the relative path without extension.
    source = {r["path"][: -len(".png")]: r for r in table["rows"] if r["category"] != "bad"}
    assert sorted(r["id"] for r in written) == sorted(source)
    for row in written:
        assert row["caption"] == source[row["id"]]["caption"] and row["split"] == caption_split(row["caption"])
        assert row["group"] == caption_group(row["caption"])
        assert row["category"] == source[row["id"]]["category"]  # unmapped columns are kept
    assert {r["split"] for r in written} == set(SPLITS)
    assert len({r["group"] for r in written}) < len(written)  # some captions repeat
    # The images do not lie under the manifest's folder: absolute paths, which exist.
    assert all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in written)

    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    assert [(r["line"], r["id"], r["field"]) for r in rejects] == [
        (_line_of(table["rows"], "imgs/missing.png"), "imgs/missing", "path"),
        (_line_of(table["rows"], "imgs/truncated.png"), "imgs/truncated", "path")]
    assert "not found" in rejects[0]["reason"] and "missing.png" in rejects[0]["reason"]
    assert "cannot decode" in rejects[1]["reason"] and "truncated" in rejects[1]["reason"]


def test_manifest_in_the_data_folder_is_relative_and_readable_from_anywhere(table: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_table(table["root"], table["rows"])
    out = table["root"] / "manifest.jsonl"
    _, written = _import(src, out, cwd=tmp_path, monkeypatch=monkeypatch)
    assert all(r["image"].startswith("imgs/") for r in written)  # relative to the manifest's folder
    monkeypatch.chdir(tmp_path)
    records = read_manifest(out)
    assert [r["id"] for r in records] == [r["id"] for r in written]
    assert all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in records)


def test_ids_are_stable_across_reruns_and_row_order(table: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_table(table["root"], table["rows"])
    out = tmp_path / "m.jsonl"
    _, first = _import(src, out, cwd=tmp_path, monkeypatch=monkeypatch)
    before = out.read_bytes()
    _import(src, out, cwd=tmp_path, monkeypatch=monkeypatch)
    assert out.read_bytes() == before
    shuffled = _write_table(table["root"], table["rows"][::-1], "reversed.csv")
    _, reordered = _import(shuffled, tmp_path / "r.jsonl", cwd=tmp_path, monkeypatch=monkeypatch)
    assert {r["id"]: (r["image"], r["split"]) for r in reordered} == {r["id"]: (r["image"], r["split"]) for r in first}


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.jsonl"])
def test_tsv_and_jsonl_give_the_same_manifest_as_csv(table: dict, tmp_path: Path, name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, from_csv = _import(_write_table(table["root"], table["rows"]), tmp_path / "csv.jsonl", cwd=tmp_path,
                          monkeypatch=monkeypatch)
    stdout, other = _import(_write_table(table["root"], table["rows"], name), tmp_path / "other.jsonl",
                            cwd=tmp_path, monkeypatch=monkeypatch)
    assert other == from_csv
    assert SUMMARY.match(stdout.strip().splitlines()[-1])["rej"] == "2"


def test_split_column(table: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{**r, "fold": ("test" if i % 4 == 0 else "VAL" if i % 4 == 1 else "train")}
            for i, r in enumerate(table["rows"])]
    rows[3]["fold"] = "dev"
    src = _write_table(tmp_path, [{**r, "path": str(table["root"] / r["path"])} for r in rows], "folds.csv")
    _, written = _import(src, tmp_path / "m.jsonl", "--split-col", "fold", cwd=tmp_path, monkeypatch=monkeypatch)
    wanted = {str(table["root"] / r["path"]): r["fold"].lower() for r in rows}
    assert all(r["split"] == wanted[r["image"]] for r in written) and {r["split"] for r in written} == set(SPLITS)
    assert "fold" not in written[0]  # a consumed column is not copied as an extra field
    rejects = [json.loads(line) for line in (tmp_path / "m.rejects.jsonl").read_text().splitlines()]
    dev = next(r for r in rejects if r["line"] == 5)
    assert dev["field"] == "fold" and "'split'" in dev["reason"] and "dev" in dev["reason"]


def test_fractions_never_split_a_group(table: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_table(table["root"], table["rows"])
    _, written = _import(src, tmp_path / "m.jsonl", "--val", "0.25", "--test", "0.25", cwd=tmp_path,
                         monkeypatch=monkeypatch)
    splits_of = defaultdict(set)
    for r in written:
        splits_of[r["group"]].add(r["split"])
        assert r["split"] == fraction_split(r["group"], 0.25, 0.25)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r["split"] for r in written} == set(SPLITS)
    assert any(len([r for r in written if r["group"] == g]) > 1 for g in splits_of)  # shared groups exist


def test_group_and_id_columns(table: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"key": f"s{i:03d}", "team": r["category"], "file": r["path"], "text": r["caption"]}
            for i, r in enumerate(table["rows"])]
    rows[5]["key"] = rows[4]["key"]  # a duplicate id: the second row is rejected
    rows[0]["key"] = 7  # JSON numbers become string ids
    src = _write_table(table["root"], rows, "keyed.jsonl")
    result = _cli_here(src, "--map", "image=file", "--map", "text=text", "--id-col", "key", "--group-col", "team",
                       "--out", tmp_path / "m.jsonl", cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {r["id"] for r in written} == {str(r["key"]) for r in rows if r["team"] != "bad"}
    assert all(r["group"] == next(x["team"] for x in rows if str(x["key"]) == r["id"]) for r in written)
    rejects = [json.loads(line) for line in (tmp_path / "m.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 3 and any(r["field"] == "key" and "duplicate id" in r["reason"] for r in rejects)


def test_bad_utf8_and_empty_rows_are_rejects_not_errors(table: dict, tmp_path: Path) -> None:
    good = table["rows"][0]
    data = ("path,caption,note\n" f"{table['root'] / good['path']},{good['caption']},\n").encode()
    data += f"{table['root'] / good['path']},caf\xe9 au lait,\n".encode("latin-1")  # not UTF-8
    data += b",,only a note\n"  # nothing in any mapped column
    data += b",,\n"  # an empty row, skipped like a blank line
    (tmp_path / "mixed.csv").write_bytes(data)
    report = import_table(tmp_path / "mixed.csv", tmp_path / "m.jsonl", ["image=path", "text=caption"],
                          progress=False)
    assert len(report.samples) == 1
    assert [(r["line"], r["field"]) for r in report.rejects] == [(3, "caption"), (4, None)]
    assert "UTF-8" in report.rejects[0]["reason"]


@pytest.mark.parametrize("maps, fragment", [
    (["imagepath"], "--map 'imagepath': expected MODALITY=COLUMN"),
    (["picture=path"], "--map 'picture=path': unknown modality 'picture'"),
    (["image=file"], "--map image=file: pairs.csv has no column 'file'"),
    (["image=path", "image=caption"], "modality 'image' is already mapped"),
])
def test_bad_map_is_one_line_and_exit_2(table: dict, tmp_path: Path, maps: list[str], fragment: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_table(table["root"], table["rows"])
    args = (src, *[a for m in maps for a in ("--map", m)], "--out", tmp_path / "m.jsonl")
    result = _cli_here(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "m.jsonl").exists()
    if maps == ["imagepath"]:  # and once as a real process: exit status and stderr as a shell sees them
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip() == lines[0] and not proc.stdout


def test_option_errors_in_the_library(table: dict, tmp_path: Path) -> None:
    src = _write_table(table["root"], table["rows"])
    with pytest.raises(ConfigError, match="--split-col fold: pairs.csv has no column 'fold'"):
        import_table(src, tmp_path / "m.jsonl", ["image=path"], split_col="fold")
    with pytest.raises(ConfigError, match="either --split-col or --val/--test"):
        import_table(src, tmp_path / "m.jsonl", ["image=path"], split_col="caption", test=0.2)
    with pytest.raises(ConfigError, match="sum to at most 1"):
        import_table(src, tmp_path / "m.jsonl", ["image=path"], val=0.6, test=0.6)
    with pytest.raises(ConfigError, match="is the input table"):
        import_table(src, src, ["image=path"])
    with pytest.raises(ConfigError, match="is a folder"):
        import_table(src, tmp_path, ["image=path"])
    with pytest.raises(ConfigError, match="cannot tell the format"):
        import_table(src, tmp_path / "m.jsonl", ["image=path"], fmt="xlsx")


@pytest.mark.slow
def test_imported_manifest_builds_a_cache_from_another_folder(table: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from oneencoder.features.cache import build_cache
    from oneencoder.modality import create_modality

    src = _write_table(table["root"], table["rows"])
    out = table["root"] / "cached" / "manifest.jsonl"
    report = import_table(src, out, ["image=path", "text=caption"], progress=False)
    monkeypatch.chdir(tmp_path)  # neither the table's nor the manifest's folder
    built = build_cache(create_modality("image", semantic=False), read_manifest(out), tmp_path / "cache", batch_size=16,
                        progress=False)
    assert built.encoded == len(report.samples) and not built.rejects
