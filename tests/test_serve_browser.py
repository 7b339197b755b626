"""``oneencoder serve`` in Debian's headless Chromium (selenium + the system chromedriver; nothing downloads).

The server runs in a thread on a free local port over two real indexes (images and captions
of Tux Paint stamps); the browser types a text query, uploads an image, uploads a corrupt
file, and the page is checked against what the library computes. Screenshots are saved
under the test's temporary folder (the path is printed).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import oneencoder
from oneencoder.apps.index_build import build_index, read_sources
from oneencoder.fileio import write_jsonl_atomic

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and DRIVER.is_file()),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(`make system-deps` installs them)")
K = 5


@pytest.fixture(scope="module")
def served(trained_model, small_records, tmp_path_factory, serve_in_thread):
    """The explorer over a 10-stamp image index and a caption index, served from a thread."""
    from oneencoder.apps.serve import create_app

    root = tmp_path_factory.mktemp("serve")
    records = small_records[:10]
    write_jsonl_atomic(root / "manifest.jsonl", records)
    m = oneencoder.load(trained_model["dir"], device="cpu")
    for modality in ("image", "text"):
        sources, _ = read_sources(root / "manifest.jsonl", modality)
        build_index(m, modality, sources, root / f"ix-{modality}", progress=False)
    app = create_app(trained_model["dir"], [root / "ix-image", root / "ix-text"], k=K, device="cpu")
    with serve_in_thread(app, stop_timeout=10) as port:
        yield {"url": f"http://127.0.0.1:{port}/", "explorer": app.state.explorer, "records": records}

@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _submit(browser, form: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, f"{form}-submit").click()
    WebDriverWait(browser, 120).until(ec.staleness_of(old))  # the results page replaced this one


def _shown(browser) -> dict[str, list[tuple[str, float]]]:
    """Per index section (by modality): the hits' ``(id, score)`` as the page shows them."""
    from selenium.webdriver.common.by import By

    out = {}
    for section in browser.find_elements(By.CSS_SELECTOR, "section.index"):
        hits = section.find_elements(By.CSS_SELECTOR, "li.hit")
        out[section.get_attribute("data-modality")] = [(h.get_attribute("data-id"), float(h.get_attribute("data-score")))
                                                       for h in hits]
    return out


def test_text_query_and_image_upload_show_every_index(served, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    records, explorer = served["records"], served["explorer"]
    browser.get(served["url"])
    assert browser.title == "oneencoder explorer"
    caption = records[2]["caption"]
    browser.find_element(By.ID, "text").send_keys(caption)
    _submit(browser, "text")
    shown = _shown(browser)
    expected = {r["index"].modality: [h["id"] for h in r["hits"]] for r in explorer.search("text", caption, K)}
    assert set(shown) == {"image", "text"} and all(len(v) == K for v in shown.values())
    assert {mod: [i for i, _ in hits] for mod, hits in shown.items()} == expected  # what the library ranks
    assert shown["text"][0] == (records[2]["id"], pytest.approx(1.0, abs=1e-3))  # the caption itself
    for hits in shown.values():
        assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('section[data-modality=image] li.hit img')]"
        ".map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * K  # every thumbnail decoded in the browser
    browser.save_screenshot(str(tmp_path / "serve-text-query.png"))

    browser.find_element(By.ID, "file").send_keys(records[5]["image"])
    _submit(browser, "file")
    shown = _shown(browser)
    assert shown["image"][0] == (records[5]["id"], pytest.approx(1.0, abs=1e-3))  # the uploaded stamp itself
    assert browser.find_element(By.CSS_SELECTOR, "#query img").get_attribute("src").startswith("data:image/png")
    shot = tmp_path / "serve-image-upload.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    print(f"screenshots: {tmp_path / 'serve-text-query.png'} {shot}")


def test_a_bad_upload_is_a_message_and_the_server_keeps_serving(served, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    broken = tmp_path / "broken.png"
    broken.write_bytes(random.Random(0).randbytes(4096))
    browser.get(served["url"])
    browser.find_element(By.ID, "file").send_keys(str(broken))
    _submit(browser, "file")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("broken.png: cannot decode image"), error
    assert "Traceback" not in browser.page_source and not _shown(browser)

    odd = tmp_path / "notes.xyz"
    odd.write_text("hello")
    browser.find_element(By.ID, "file").send_keys(str(odd))
    _submit(browser, "file")
    assert "no modality of this model reads .xyz files" in browser.find_element(By.ID, "error").text

    browser.find_element(By.ID, "text").send_keys(served["records"][0]["caption"])
    _submit(browser, "text")
    assert not browser.find_elements(By.ID, "error") and len(_shown(browser)["image"]) == K
