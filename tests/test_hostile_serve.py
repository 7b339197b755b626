"""Hostile input to ``oneencoder serve`` (issue 26, items 2, 3, 4 and 9) on a real server on 127.0.0.1.

The server runs in a thread over a caption index and an image index of 8 real stamps,
whose manifest holds lying columns (``score``, ``rank``, ``row``) and a ``sound`` field
naming ``/etc/hostname``. ``/health`` must answer within 1 s while a 120,000-character
SMILES is posted and while every worker is busy; bodies over the limits get a 413, an
``as=text`` upload and ``/media`` of another field are refused; and a worker that hangs
or segfaults fails alone.
"""

from __future__ import annotations

import ctypes
import http.client
import re
import threading
import time
import uuid
from pathlib import Path

import pytest

import oneencoder
from oneencoder.apps.index_build import build_index, read_sources
from oneencoder.apps.serve import app as app_module
from oneencoder.apps.serve.workers import WorkerCrash, WorkerTimeout
from oneencoder.fileio import write_jsonl_atomic

K = 4
TIMEOUT = 3.0  # serve's per-query limit here; real queries take well under a second


@pytest.fixture(scope="module")
def served(trained_model, small_records, tmp_path_factory):
    from oneencoder.apps.serve import bind, create_app, server

    root = tmp_path_factory.mktemp("hostile-serve")
    records = [{**r, "score": 42.0, "rank": 0, "row": -1, "sound": "/etc/hostname"} for r in small_records[:8]]
    write_jsonl_atomic(root / "manifest.jsonl", records)
    m = oneencoder.load(trained_model["dir"], device="cpu")
    for modality in ("text", "image"):
        sources, _ = read_sources(root / "manifest.jsonl", modality)
        build_index(m, modality, sources, root / f"ix-{modality}", progress=False)
    app = create_app(trained_model["dir"], [root / "ix-text", root / "ix-image"], k=K, device="cpu",
                     workers=2, timeout=TIMEOUT)
    sock = bind("127.0.0.1", 0)
    srv = server(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start within 30 s"
    yield {"port": sock.getsockname()[1], "explorer": app.state.explorer, "records": records, "model": m}
    srv.should_exit = True
    thread.join(timeout=20)
    assert app.state.explorer.pool.pids() == []  # the workers ended with the server


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


def test_drawings_are_capped_in_serve_itself(served) -> None:
    explorer = served["explorer"]
    assert "<svg" in explorer.drawing("CCO")
    start = time.monotonic()
    assert app_module.molecule_svg("C" * 5000) is None  # over MAX_DRAW_CHARS: not even parsed
    assert app_module.molecule_svg("C" * (app_module.MAX_DRAW_ATOMS + 1)) is None  # parsed, over the atoms
    assert explorer.drawing("C" * 120_000) is None
    assert time.monotonic() - start < 2
