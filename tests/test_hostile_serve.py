"""Hostile input to ``oneencoder serve`` (issue 26, items 2, 3, 4 and 9) on a real server on 127.0.0.1.

The server runs in a thread over a caption index and an image index of 8 real stamps,
whose manifest holds lying columns (``score``, ``rank``, ``row``) and a ``sound`` field
naming ``/etc/hostname``. ``/health`` must answer within 1 s while a 120,000-character
SMILES is posted and while every worker is busy; bodies over the limits get a 413, an
``as=text`` upload and ``/media`` of another field are refused; and a worker that hangs
or segfaults fails alone. A second server, over the same model with molecules added, shows
that the page is built from the modalities' specs (issue 23): a SMILES box, and molecules
drawn by the modality's own ``depict`` in the workers, with caps on the drawing.
"""

from __future__ import annotations

import ctypes
import http.client
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import oneencoder
from oneencoder.apps.index_build import build_index, read_sources
from oneencoder.apps.serve import app as app_module
from oneencoder.apps.serve.workers import WorkerCrash, WorkerTimeout
from oneencoder.fileio import write_jsonl_atomic

K = 4
TIMEOUT = 6.0  # serve's per-query limit here; real queries take well under a second, even on a busy machine


def serving(serve_in_thread, model_dir: Path, root: Path, indexes: dict[str, Path], workers: int) -> Iterator[dict]:
    """Index each manifest for its modality, then serve them all from a thread until closed."""
    from oneencoder.apps.serve import create_app

    m = oneencoder.load(model_dir, device="cpu")
    for modality, manifest in indexes.items():
        sources, _ = read_sources(manifest, modality)
        build_index(m, modality, sources, root / f"ix-{modality}", progress=False)
    app = create_app(model_dir, [root / f"ix-{modality}" for modality in indexes], k=K, device="cpu",
                     workers=workers, timeout=TIMEOUT)
    with serve_in_thread(app) as port:
        yield {"port": port, "explorer": app.state.explorer, "model": m}
    assert app.state.explorer.pool.pids() == []  # the workers ended with the server


@pytest.fixture(scope="module")
def served(trained_model, small_records, tmp_path_factory, serve_in_thread):
    root = tmp_path_factory.mktemp("hostile-serve")
    records = [{**r, "score": 42.0, "rank": 0, "row": -1, "sound": "/etc/hostname"} for r in small_records[:8]]
    write_jsonl_atomic(root / "manifest.jsonl", records)
    indexes = {"text": root / "manifest.jsonl", "image": root / "manifest.jsonl"}
    for running in serving(serve_in_thread, trained_model["dir"], root, indexes, workers=2):
        yield {**running, "records": records}


@pytest.fixture(scope="module")
def molecules_served(trained_model, tmp_path_factory, serve_in_thread):
    """The trained model with molecules added (60 PubChem rows, 1 epoch), serving a molecule and a name index."""
    from typer.testing import CliRunner

    from oneencoder.cli.main import app as cli
    from oneencoder.data.sources.chemicals import chemicals_records

    root = tmp_path_factory.mktemp("serve-molecules")
    model = root / "model"
    shutil.copytree(trained_model["dir"], model, ignore=shutil.ignore_patterns("runs"))
    records = chemicals_records(limit=60)
    write_jsonl_atomic(root / "chem.jsonl", records)
    added = CliRunner().invoke(cli, ["add-modality", "molecule", "--model", str(model), "--data",
                                     str(root / "chem.jsonl"), "--cache-dir", str(root / "cache"), "--epochs", "1",
                                     "--workers", "0"])
    assert added.exit_code == 0, added.output
    indexes = {"molecule": root / "chem.jsonl", "text": root / "chem.jsonl"}
    for running in serving(serve_in_thread, model, root, indexes, workers=1):
        yield {**running, "records": records}


def request(port: int, method: str, path: str, body=b"", headers: dict | None = None,
            timeout: float = 60, chunked: bool = False) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if file:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + file[1] + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def search(port: int, fields: dict[str, str], file: tuple[str, bytes] | None = None) -> tuple[int, str]:
    body, headers = multipart(fields, file)
    return request(port, "POST", "/search", body, headers)


def error_of(page: str) -> str:
    found = re.search(r'<p class="error" id="error" role="alert">(.*?)</p>', page, re.S)
    assert found, page[:500]
    return found.group(1)


def health_while(port: int, busy: threading.Thread, min_polls: int = 5, max_polls: int = 400) -> list[float]:
    """``/health`` latencies, polled while ``busy`` runs (at least ``min_polls``, at most ``max_polls``)."""
    latencies = []
    while len(latencies) < max_polls and (busy.is_alive() or len(latencies) < min_polls):
        start = time.monotonic()
        status, text = request(port, "GET", "/health", timeout=5)
        latencies.append(time.monotonic() - start)
        assert (status, text) == (200, "ok")
        time.sleep(0.02)
    return latencies


def test_health_answers_within_1s_while_a_huge_smiles_is_posted(served) -> None:
    port, result = served["port"], {}
    body, headers = multipart({"kind": "smiles", "smiles": "C" * 120_000})
    poster = threading.Thread(target=lambda: result.update(
        zip(("status", "page"), request(port, "POST", "/search", body, headers))))
    poster.start()
    latencies = health_while(port, poster)
    poster.join(timeout=60)
    assert max(latencies) < 1.0, latencies
    assert result["status"] == 400
    assert error_of(result["page"]) == "the smiles query has 120,000 characters, over serve&#39;s limit of 10,000"
    assert request(port, "GET", "/health") == (200, "ok")


def test_health_answers_while_every_worker_is_stuck_and_queries_time_out(served) -> None:
    port, pool = served["port"], served["explorer"].pool
    outcomes: list[object] = []
    # Both workers sleep in native code past the query's limit, as a hung decoder would (they
    # finish on their own here: killing and respawning them is the next test's).
    stuck = [threading.Thread(target=lambda: outcomes.append(pool.call(time.sleep, TIMEOUT + 1.5, timeout=60)))
             for _ in range(pool.size)]
    for t in stuck:
        t.start()
    time.sleep(0.5)
    result = {}
    poster = threading.Thread(target=lambda: result.update(
        zip(("status", "page"), search(port, {"kind": "text", "text": "A badger."}))))
    poster.start()
    latencies = health_while(port, poster)
    poster.join(timeout=60)
    assert max(latencies) < 1.0, latencies
    assert result["status"] == 400
    assert error_of(result["page"]) == (f"this text query was not read: all 2 workers stayed busy for "
                                        f"{TIMEOUT:g} s; try again")
    for t in stuck:
        t.join(timeout=60)
    assert outcomes == [None, None]
    status, page = search(port, {"kind": "text", "text": "A badger."})  # free again: served
    assert status == 200 and page.count('class="hit"') == 2 * K


def test_a_worker_that_hangs_or_segfaults_fails_alone(served) -> None:
    pool = served["explorer"].pool
    before = set(pool.pids())
    start = time.monotonic()
    with pytest.raises(WorkerTimeout, match="it took over 1 s, serve's limit per query; it was stopped"):
        pool.call(time.sleep, 30, timeout=1.0)
    assert time.monotonic() - start < 5
    with pytest.raises(WorkerCrash, match=r"crashed the worker process reading it \(killed by SIGSEGV\)"):
        pool.call(ctypes.string_at, 0, timeout=TIMEOUT)  # reads address 0: a segfault
    assert pool.call(abs, -3, timeout=120) == 3 and pool.call(abs, -4, timeout=120) == 4
    assert len(set(pool.pids())) == pool.size and set(pool.pids()) != before


def test_page_scores_are_the_librarys_whatever_the_manifest_columns(served) -> None:
    port, explorer, records, m = served["port"], served["explorer"], served["records"], served["model"]
    caption = records[3]["caption"]
    status, page = search(port, {"kind": "text", "text": caption})
    assert status == 200
    shown = re.findall(r'data-id="([^"]+)" data-score="([-0-9.]+)" data-rank="(\d+)"', page)
    expected = []
    for _, index in explorer.indexes:  # the library's own answer, encoded in this process
        expected += [(h["id"], h["score"], h["rank"]) for h in index.search(m.encode("text", [caption]), K).hits[0]]
    assert [(i, int(r)) for i, _, r in shown] == [(i, r) for i, _, r in expected]
    assert [float(s) for _, s, _ in shown] == pytest.approx([s for _, s, _ in expected], abs=1e-4)
    assert shown[0][0] == records[3]["id"] and float(shown[0][1]) == pytest.approx(1.0, abs=1e-3)
    assert "42.000" not in page


def test_limits_and_refusals_are_4xx_with_the_reason(served, monkeypatch, tmp_path) -> None:
    port, records = served["port"], served["records"]
    status, page = search(port, {"kind": "text", "text": "x" * 10_001})
    assert status == 400 and "the text query has 10,001 characters, over serve&#39;s limit of 10,000" in page
    status, page = search(port, {"kind": "smiles", "smiles": "CCO"})  # a box of a modality the model lacks
    assert status == 400 and error_of(page) == "this model has no molecule modality"
    status, page = search(port, {"kind": "smiles", "smiles": " "})
    assert status == 400 and error_of(page) == "type a smiles query first"

    # An upload read "as text" would embed the temporary file's path.
    image = Path(records[0]["image"]).read_bytes()
    status, page = search(port, {"kind": "file", "as": "text"}, ("stamp.png", image))
    assert status == 400
    assert error_of(page) == "as=&#39;text&#39;: an upload is read as one of this model&#39;s file modalities (image)"
    status, page = search(port, {"kind": "file", "as": "image"}, ("stamp.png", image))
    assert status == 200 and "oneencoder-upload-" not in page

    # Bodies over the limit: by Content-Length before reading, and while reading a chunked one.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(app_module.MAX_BODY + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "larger than serve&#39;s limit of 51 MB" in response.read().decode()
    conn.close()
    monkeypatch.setattr(app_module, "MAX_BODY", 16 << 10)  # read at each request: no 51 MB body needed
    body, headers = multipart({"kind": "text", "text": "A badger."}, ("big.png", b"\0" * (40 << 10)))
    chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))
    status, page = request(port, "POST", "/search", chunks, {**headers, "Transfer-Encoding": "chunked"}, chunked=True)
    assert status == 413 and "larger than serve&#39;s limit" in page
    monkeypatch.undo()

    # /media serves the indexed image files only, not another field of the item.
    row = 2
    status, _ = request(port, "GET", f"/media/1/{row}/input")
    assert status == 200
    for no, field in ((1, "sound"), (1, "image"), (1, "caption"), (0, "input")):
        status, text = request(port, "GET", f"/media/{no}/{row}/{field}")
        assert status == 404 and "only the indexed" in text, (no, field, status, text)
    assert request(port, "GET", "/health") == (200, "ok")


def test_pictures_are_the_modalitys_and_capped(served, monkeypatch) -> None:
    from oneencoder.modalities import molecule

    explorer = served["explorer"]
    drawer = oneencoder.create_modality("molecule")
    assert drawer.depict("CCO").startswith("<svg")
    start = time.monotonic()
    assert drawer.depict("C" * (molecule.MAX_DRAW_CHARS + 1)) is None  # not even parsed
    assert drawer.depict("C" * (molecule.MAX_DRAW_ATOMS + 1)) is None  # parsed, over the atoms
    assert drawer.depict("C1CC") is None  # unparsable: shown without a picture
    assert time.monotonic() - start < 2
    # These modalities keep Modality.depict (nothing drawn): no worker is even asked.
    monkeypatch.setattr(explorer.pool, "call", lambda *a, **k: pytest.fail("a worker was asked"))
    assert explorer.depiction("text", "A badger.") is None
    assert explorer.depiction("image", served["records"][0]["image"]) is None


def test_the_page_follows_the_specs_and_draws_molecules(molecules_served) -> None:
    port, explorer, records, m = (molecules_served[k] for k in ("port", "explorer", "records", "model"))
    status, home = request(port, "GET", "/")
    assert status == 200
    # The free-text box first, the upload for the file modalities, then the SMILES box.
    assert [home.index(f'id="{kind}-form"') for kind in ("text", "file", "smiles")] == sorted(
        home.index(f'id="{kind}-form"') for kind in ("text", "file", "smiles"))
    assert 'placeholder="CCO"' in home and ">Molecule (SMILES)</label>" in home and ">File (image)</label>" in home

    smiles = records[4]["smiles"]
    status, page = search(port, {"kind": "smiles", "smiles": smiles})
    assert status == 200
    query = page[page.index('id="query"'):page.index("<section")]
    assert "molecule query:" in query and query.count("<svg") == 1  # the query, drawn
    sections = dict(re.findall(r'data-modality="(\w+)">(.*?)</section>', page, re.S))
    expected = [h["id"] for h in explorer.indexes[0][1].search(m.encode("molecule", [smiles]), K).hits[0]]
    assert re.findall(r'data-id="([^"]+)"', sections["molecule"]) == expected and expected[0] == records[4]["id"]
    assert sections["molecule"].count("<svg") == K  # every molecule hit drawn in a worker
    assert "<svg" not in sections["text"] and 'class="text"' in sections["text"]  # names shown as text

    # Drawing stays capped through serve: over the query limit nothing reaches a worker.
    start = time.monotonic()
    assert explorer.depiction("molecule", "C" * 120_000) is None
    assert explorer.depiction("molecule", "C" * 5_000) is None  # over the modality's own cap, in a worker
    assert explorer.depiction("molecule", "CCO").startswith("<svg")
    assert time.monotonic() - start < 5
