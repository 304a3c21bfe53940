"""Make the README's screenshots: the default model on a real PLOS article, in headless chromium.

    python docs/make_screenshots.py [--article PATH] [--question TEXT]

Starts the web app on 127.0.0.1 with the default settings (SmolLM2 memory, its checkpoint and reader),
uploads the article, ingests it, asks the question, and saves docs/screenshots/ask.png and
memory.png. Needs Debian's chromium and the shared data folder (or --article). A few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the repo's packages first
OUT = ROOT / "docs" / "screenshots"
ARTICLE = "pmc-oa/plos/journal.pmed.0030445.xml"
QUESTION = "Which pioneer of social medicine is repeatedly acknowledged in the collection?"
TIMEOUT_MS = 15 * 60_000


def main() -> int:
    from app.server import launch
    from app.settings import AppSettings
    from app.ui import build_app
    from bench.loopback import free_port
    from qa_pipeline.train_data import data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--article", help=f"the document (default: <data dir>/{ARTICLE})")
    p.add_argument("--question", default=QUESTION)
    args = p.parse_args()
    article = Path(args.article) if args.article else data_dir(None) / ARTICLE
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="hmtqa-shots-") as tmp:
        settings = AppSettings(port=free_port(), store="", session_root=tmp)
        qa = build_app(settings)
        qa.demo.hmtqa = qa
        launch(qa.demo, settings, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_context(viewport={"width": 1320, "height": 1000}).new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"http://127.0.0.1:{settings.port}/")
                page.get_by_text("ready", exact=False).first.wait_for()
                page.set_input_files("#files input[type=file]", str(article))
                page.click("#ingest-btn")
                page.locator("#ingest-status").get_by_text("ingested").wait_for()
                page.fill("#question textarea", args.question)
                page.click("#ask-btn")
                page.locator("#timings").get_by_text("supporting sentence", exact=False).first.wait_for()
                _shot(page, "ask")
                page.get_by_role("tab", name="Memory").click()
                page.locator("#recall-plot img").wait_for()
                page.locator("#pca-plot img").wait_for()
                _shot(page, "memory")
                browser.close()
        finally:
            qa.demo.close()
            qa.service.close()
    print(f"saved {OUT / 'ask.png'} and {OUT / 'memory.png'}")
    return 0


def _shot(page, name: str) -> None:
    # Gradio fades an event's outputs in: wait until no progress indicator is left.
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


if __name__ == "__main__":
    raise SystemExit(main())
