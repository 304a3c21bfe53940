"""The page in headless chromium (Debian's package, not `playwright install`): the whole flow.

Saves its screenshots (ask, batch, memory) in $HMTQA_TEST_SCREENSHOTS, else pytest's temporary folder:
the README's own come from the default model on a real article (docs/make_screenshots.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import TEST_UPLOAD_MB

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("chromium") is None,
        reason="Debian's chromium is not installed (apt-get install -y chromium); the CI image has it",
    ),
]

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("HMTQA_TEST_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server, shots):
    context = browser.new_context(viewport={"width": 1320, "height": 1000}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(server.url)
    pg.get_by_text("ready", exact=False).first.wait_for()
    pg.shots = shots
    yield pg
    context.close()


def screenshot(page, name: str) -> None:
    """Save NAME.png in the screenshots folder once every progress indicator is gone (Gradio 6 fades the
    outputs of an event in, so a shot taken the moment the text appears can catch them half-drawn)."""
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))"
    )
    page.shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(page.shots / f"{name}.png"), full_page=True)


def toast(page, pattern: str):
    """The error toast Gradio shows for gr.Error."""
    import re

    return page.locator(".toast-body").filter(has_text=re.compile(pattern, re.I)).first


def test_ask_flow_evidence_and_memory(page):
    page.click("#example-btn")
    page.wait_for_function("document.querySelector('#paste textarea').value.length > 100")
    page.click("#ingest-btn")
    page.locator("#ingest-status").get_by_text("ingested").wait_for()
    # The new document is selected in the picker and its text shown.
    page.locator("#evidence").get_by_text("Blood cultures grew", exact=False).wait_for()

    page.fill("#question textarea", "Was clarithromycin added to the antibiotics?")
    page.fill("#options textarea", "yes, no")
    page.click("#ask-btn")
    page.wait_for_function("['yes', 'no'].includes(document.querySelector('#answer textarea').value)")
    page.locator("#timings").get_by_text("option scores").wait_for()
    # Next to the answer: how sure the model is and the sentence the answer rests on, quoted.
    page.locator("#timings").get_by_text("confidence", exact=False).first.wait_for()
    page.locator("#timings").get_by_text("supporting sentence", exact=False).first.wait_for()
    # ...and that sentence marked in the document text, with its own legend entry.
    page.locator("#evidence").get_by_text("supporting sentence", exact=False).first.wait_for()
    # Evidence is highlighted over the text, labelled with rank, segment and recall weight.
    page.locator("#evidence").get_by_text("recall weight", exact=False).first.wait_for()
    screenshot(page, "ask")

    page.get_by_role("tab", name="Memory").click()
    page.locator("#memory-title").get_by_text("Last question").wait_for()
    page.locator("#recall-plot img").wait_for()
    page.locator("#pca-plot img").wait_for()
    search = page.get_by_label("Text to search for (encoded as a question)")
    search.fill("antibiotic treatment")
    page.get_by_role("button", name="Search").click()
    # Gradio 6 draws a table's body as rows of <div> cells (not <tbody><tr>), each with a test id
    # cell-ROW-COL: a second row means at least two results.
    page.locator('#search-results [data-testid="cell-1-0"]').wait_for()
    screenshot(page, "memory")


def test_batch_tab_runs_the_sample(page):
    page.get_by_role("tab", name="Batch").click()
    page.locator("#use-sample input").check()
    page.click("#batch-btn")
    page.locator("#batch-status").get_by_text("6 answers", exact=False).wait_for()
    page.get_by_text("trial-2").first.wait_for()
    screenshot(page, "batch")


def test_bad_uploads_show_an_error_and_the_page_keeps_working(page, tmp_path):
    binary = tmp_path / "scan.txt"
    binary.write_bytes(bytes(range(256)) * 16)
    page.set_input_files("#files input[type=file]", str(binary))
    page.locator("#files a.download-link").first.wait_for()  # the link appears once the upload is done
    page.click("#ingest-btn")
    toast(page, "binary").wait_for()

    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * int(TEST_UPLOAD_MB * 1024 * 1024 * 2))
    page.set_input_files("#files input[type=file]", str(big))
    toast(page, "(exceed|size|limit)").wait_for()

    # Still serving: an empty ingest says what to do, and a pasted note ingests.
    page.fill("#paste textarea", "A short note: the patient takes aspirin 75 mg daily.")
    page.evaluate("document.querySelectorAll('#files button[aria-label=\"Clear\"]').forEach(b => b.click())")
    page.click("#ingest-btn")
    page.locator("#ingest-status").get_by_text("ingested").wait_for()


def test_a_document_title_shows_as_text(page):
    """A title's Markdown and HTML (here an image that would load for every user) show as characters."""
    title = "Evil ![x](http://127.0.0.1:9/x.png) <img src=x> *loud*"
    page.fill("#paste textarea", f"# {title}\n\nThe patient takes aspirin 75 mg daily. " * 3)
    page.click("#ingest-btn")
    page.locator("#ingest-status").get_by_text("ingested").wait_for()
    page.get_by_role("tab", name="Memory").click()
    shown = page.locator("#memory-title")
    shown.get_by_text(title, exact=False).wait_for()
    assert shown.locator("img").count() == 0 and shown.locator("em").count() == 0
