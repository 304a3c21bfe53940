"""Starting the web app: ``python app.py`` and ``hmtqa serve`` both end up in :func:`launch`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import gradio as gr

from .settings import AppSettings, add_serve_arguments, settings_from_args
from .ui import build_demo

logger = logging.getLogger(__name__)


def launch(demo: gr.Blocks, settings: AppSettings, **kwargs) -> gr.Blocks:
    """Start loading the model, then serve ``demo`` (blocking unless ``prevent_thread_lock=True``).

    The upload limit is enforced by Gradio itself (``max_file_size``), so an oversize file is
    refused before it is written to disk; the handlers check it again with a friendlier message.
    The demo's Blocks holds the limit too (:class:`app.ui.AppBlocks`), for launches that skip this.
    """
    qa = getattr(demo, "hmtqa", None)
    if qa is not None:
        qa.service.loader.start()  # the page is served while the model loads
    options = {
        "server_name": settings.host,
        "server_port": settings.port,
        "max_file_size": settings.max_upload_bytes,
        "show_error": True,
        "ssr_mode": False,  # server-side rendering needs Node.js; the client-rendered page is enough
    }
    options.update(kwargs)
    logger.info("serving on http://%s:%d", settings.host, settings.port)
    return demo.launch(**options)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Ignore repeats (a wrapper such as `timeout` forwards the signal too): they would cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def serve(settings: AppSettings, demo: gr.Blocks | None = None) -> int:
    """Build (unless given) and serve the app until interrupted; clean up session folders after."""
    demo = demo if demo is not None else build_demo(settings)
    if threading.current_thread() is threading.main_thread():
        # A service manager stops us with SIGTERM; exit through `finally` so session folders go too.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        launch(demo, settings)
    except KeyboardInterrupt:
        pass
    finally:
        qa = getattr(demo, "hmtqa", None)
        if qa is not None:
            qa.service.close()
    return 0


def parse_args(argv: list[str] | None = None) -> AppSettings:
    parser = argparse.ArgumentParser(prog="app.py", description="hmt-qa web UI (Gradio).")
    add_serve_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return settings_from_args(ns)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None, demo: gr.Blocks | None = None) -> int:
    """``python app.py [flags]``: serve ``demo`` if the flags are the defaults it was built with."""
    settings = parse_args(argv)
    if demo is not None and settings != AppSettings():
        demo = None  # flags changed the model or store: build a demo for them
    return serve(settings, demo)
