"""Fixtures for the web-app tests: one tiny-random engine, servers on free local ports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.settings import AppSettings
from app.ui import QAApp, build_app
from bench.loopback import free_port
from qa_pipeline.engine import Engine, EngineConfig

# Small, so the oversize test needs no big file; the documents used here are a few KB.
TEST_UPLOAD_MB = 0.25


@dataclass
class Server:
    url: str
    qa: QAApp
    settings: AppSettings


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    """One tiny-random engine (2-layer random Llama, real SmolLM2 tokenizer) for every app test."""
    return Engine(EngineConfig(backbone="tiny-random", checkpoint=None))


def start_server(tmp: Path, factory: Callable[[], Engine], **overrides) -> Server:
    from app.server import launch

    settings = AppSettings(
        port=free_port(),
        backbone="tiny-random",
        checkpoint=None,
        store=str(tmp / "shared"),
        session_root=str(tmp / "sessions"),
        max_upload_mb=TEST_UPLOAD_MB,
        **overrides,
    )
    qa = build_app(settings, factory)
    qa.demo.hmtqa = qa
    launch(qa.demo, settings, prevent_thread_lock=True, quiet=True)
    return Server(f"http://127.0.0.1:{settings.port}/", qa, settings)


def stop_server(server: Server) -> None:
    server.qa.demo.close()
    server.qa.service.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_engine: Engine) -> Iterator[Server]:
    """A running app on 127.0.0.1 with the tiny engine, a fresh shared store (writable) and session root."""
    srv = start_server(tmp_path_factory.mktemp("app"), lambda: tiny_engine, allow_shared_writes=True)
    srv.qa.service.loader.get(timeout=60)
    yield srv
    stop_server(srv)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event a slow engine factory waits on; always released at the end of the test."""
    event = threading.Event()
    yield event
    event.set()


def note(topic: str = "warfarin", paragraphs: int = 14) -> str:
    """A short synthetic clinical note (a few hundred tokens: two or three segments)."""
    body = " ".join(
        f"Paragraph {i}: the patient on {topic} had an INR of {2 + i * 0.1:.1f} on day {i + 1}; "
        "the dose was kept and the team reviewed the bleeding risk, kidney function and diet."
        for i in range(paragraphs)
    )
    return f"Clinical note about {topic}\n\n{body}\n"
