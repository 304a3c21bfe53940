"""`python app.py` and `hmtqa serve` share their flags and build the same app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.server import parse_args
from app.settings import AppSettings
from hmtqa.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_flags():
    assert parse_args([]) == AppSettings()
    s = parse_args(
        ["--host", "0.0.0.0", "--port", "8000", "--backbone", "tiny-random", "--checkpoint", "none",
         "--dtype", "float32", "--store", "/tmp/s", "--max-upload-mb", "5"]
    )
    assert (s.host, s.port, s.backbone, s.checkpoint, s.dtype, s.store, s.max_upload_bytes) == (
        "0.0.0.0", 8000, "tiny-random", None, "float32", "/tmp/s", 5 * 1024 * 1024
    )
    assert s.engine_config().checkpoint is None and s.engine_config().backbone == "tiny-random"
    with pytest.raises(SystemExit):
        parse_args(["--max-upload-mb", "0"])


def test_limits_and_shared_writes_flags():
    d = AppSettings()
    assert not d.allow_shared_writes  # the shared store is read-only for users unless the operator says so
    assert (d.max_files_per_request, d.max_document_tokens, d.shared_max_documents, d.shared_max_mb) == (20, 200_000, 200, 1024)
    s = parse_args(
        ["--allow-shared-writes", "--shared-max-documents", "5", "--shared-max-mb", "2.5",
         "--max-files-per-request", "3", "--max-document-tokens", "1000"]
    )
    assert (s.allow_shared_writes, s.shared_max_documents, s.shared_max_bytes) == (True, 5, int(2.5 * 1024 * 1024))
    assert (s.max_files_per_request, s.max_document_tokens) == (3, 1000)
    for bad in (["--max-files-per-request", "0"], ["--max-document-tokens", "0"], ["--shared-max-documents", "0"],
                ["--shared-max-mb", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    ns = build_parser().parse_args(["serve", "--allow-shared-writes", "--shared-max-mb", "10"])
    from app.settings import settings_from_args

    assert settings_from_args(ns) == AppSettings(allow_shared_writes=True, shared_max_mb=10.0)


def test_hmtqa_serve_has_the_same_flags():
    ns = build_parser().parse_args(["serve", "--port", "9000", "--store", "", "--checkpoint", "none"])
    from app.settings import settings_from_args

    s = settings_from_args(ns)
    assert s == AppSettings(port=9000, store="", checkpoint=None)
    assert ns.func.__module__ == "hmtqa.serve"


def test_app_py_builds_demo_at_import_without_loading_the_model():
    code = (
        "import runpy; ns = runpy.run_path('app.py', run_name='not_main'); demo = ns['demo'];"
        "import gradio as gr; assert isinstance(demo, gr.Blocks);"
        "assert demo.hmtqa.service.loader.status() == 'idle'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
