"""Issue #12 (hardening): caches and folders cleaned up, limits every launch path gets, the shared
store read-only unless the operator allows writes, document text inert in Markdown."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError as ClientAppError

from app import views
from app.errors import AppError
from app.service import QAService
from app.settings import AppSettings
from app.ui import QAApp, build_demo
from qa_pipeline.engine import Evidence
from qa_pipeline.support import Support

from .conftest import TEST_UPLOAD_MB, free_port, note

pytestmark = pytest.mark.filterwarnings("ignore:'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")

EVIL = "Evil ![x](http://e/x.png) <img src=x> [click](http://e/) *loud*"


def make_service(tmp_path: Path, engine, **overrides) -> QAService:
    settings = AppSettings(
        store=str(tmp_path / "shared"),
        session_root=str(tmp_path / "sessions"),
        max_upload_mb=0.05,
        **overrides,
    )
    return QAService(settings, lambda: engine)


@pytest.fixture
def service(tmp_path, tiny_engine):
    svc = make_service(tmp_path, tiny_engine)
    yield svc
    svc.close()


def element(demo, elem_id: str):
    [found] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return found


def session_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("session-*")) if root.exists() else []


def age(path: Path, seconds: float) -> None:
    """Backdate ``path`` and everything in it."""
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then), follow_symlinks=False)


# ---------------------------------------------------------------- 1 · Gradio's upload cache
def test_the_demo_deletes_its_upload_cache():
    settings = AppSettings(upload_cache_ttl_s=1800)
    demo = build_demo(settings)
    assert demo.delete_cache == (600, 1800)
    assert build_demo(AppSettings()).delete_cache == (600, 3600)
    assert (
        AppSettings(upload_cache_ttl_s=10 * 86_400).delete_cache[1] < 86_400
    )  # Gradio compares ages modulo a day


# ---------------------------------------------------------------- 2 · session folders
def test_stale_session_folders_are_swept_at_start(tmp_path, tiny_engine):
    root = tmp_path / "sessions"
    for name in ("session-old", "session-fresh", "session-old-but-used", "not-a-session"):
        (root / name / "store").mkdir(parents=True)
        (root / name / "store" / "store.sqlite").write_bytes(b"x")
    ttl = AppSettings().session_ttl_s
    for name in ("session-old", "session-old-but-used", "not-a-session"):
        age(root / name, ttl + 60)
    os.utime(root / "session-old-but-used" / "store" / "store.sqlite")  # its store was written just now
    svc = make_service(tmp_path, tiny_engine)
    try:
        assert session_folders(root) == ["session-fresh", "session-old-but-used"]
        assert (root / "not-a-session").is_dir()  # only the app's own folders
        assert svc.new_session().folder.parent == root
    finally:
        svc.close()


def test_stale_temporary_session_roots_are_swept_at_start(tmp_path, tiny_engine, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old, fresh = tmp_path / "hmtqa-sessions-old", tmp_path / "hmtqa-sessions-fresh"
    for root in (old, fresh):
        (root / "session-1").mkdir(parents=True)
    age(old, AppSettings().session_ttl_s + 60)
    svc = QAService(AppSettings(store=""), lambda: tiny_engine)
    try:
        assert not old.exists() and (fresh / "session-1").is_dir()
        own = svc.new_session().folder.parent
        assert own.parent == tmp_path and own.name.startswith("hmtqa-sessions-")
    finally:
        svc.close()


def test_a_failed_first_request_leaves_no_session_folder(service, tmp_path):
    qa = QAApp(service)
    root = tmp_path / "sessions"
    with pytest.raises(AppError, match="Nothing to ingest"):
        qa.ingest(None, [], "  ")
    with pytest.raises(AppError, match="Unknown document"):
        list(qa.ask(None, "no-such-doc", "Why?"))
    with pytest.raises(AppError, match="Upload a .jsonl"):
        qa.batch(None, None, False, ["hmt"])
    with pytest.raises(AppError):
        qa.save_to_shared(None, "no-such-doc")
    assert session_folders(root) == []
    # A session the caller already has is kept, failure or not.
    session, *_ = qa.ingest(None, [], note("warfarin"))
    with pytest.raises(AppError, match="Unknown document"):
        list(qa.ask(session, "no-such-doc", "Why?"))
    assert session_folders(root) == [session.folder.name] and not session.closed


# ---------------------------------------------------------------- 3 · looking a document up creates no store
def test_resolving_an_unknown_document_creates_no_store(service):
    session = service.new_session()
    with pytest.raises(AppError, match="Unknown document"):
        service.resolve(session, "no-such-doc")
    with pytest.raises(AppError, match="Unknown document"):
        service.ask(session, "no-such-doc", "Why?")
    with pytest.raises(AppError, match="Unknown document"):
        service.memory_view(session, "no-such-doc")
    assert session.existing_store() is None and list(session.folder.iterdir()) == []


# ---------------------------------------------------------------- 4 · files per request, tokens per document
def test_files_per_request_are_capped(tmp_path, tiny_engine):
    svc = make_service(tmp_path, tiny_engine, max_files_per_request=2)
    try:
        paths = []
        for i in range(3):
            path = tmp_path / f"note{i}.txt"
            path.write_text(note(f"drug{i}", paragraphs=2), encoding="utf-8")
            paths.append(str(path))
        with pytest.raises(AppError, match="3 files at once; this server takes up to 2 per ingest"):
            svc.load_uploads(paths, None)
        with pytest.raises(AppError, match="hold 3 documents; this server takes up to 2"):
            svc.load_uploads(paths[:2], note("pasted", paragraphs=2))  # pasted text is a document too
        assert len(svc.load_uploads(paths[:2], None)) == 2
    finally:
        svc.close()


def test_document_tokens_are_capped_before_anything_is_read(tmp_path, tiny_engine):
    svc = make_service(tmp_path, tiny_engine, max_document_tokens=100)
    try:
        session = svc.new_session()
        short = svc.load_uploads([], "A short note: the INR was 2.4.")
        long = svc.load_uploads([], note("heparin"))
        with pytest.raises(
            AppError, match="more than 100 tokens long, the longest document this server reads"
        ):
            svc.ingest(session, short + long)
        assert session.existing_store() is None  # the short one was not read either
        assert svc.ingest(session, short)[0]["status"] == "ingested"
    finally:
        svc.close()


def test_token_count_matches_the_engine(tiny_engine):
    text = note("warfarin", paragraphs=30) + " <|im_end|> ünïcödé"
    # Counted in pieces, as a document: the same as one call that keeps special strings as text.
    whole = tiny_engine.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert tiny_engine.count_tokens(text, chunk_chars=500) == len(whole)
    assert 100 < tiny_engine.count_tokens(text, stop_after=100, chunk_chars=500) < len(whole)


def test_concurrent_requests_share_the_tokenizer_safely(tiny_engine):
    """Documents (special strings as text) and prompts (special tokens parsed) tokenized by several
    threads at once: the fast tokenizer raised "Already borrowed" (600 of 800 calls) before the lock."""
    import threading

    text = "The patient takes <|im_end|> aspirin 75 mg daily. " * 200
    want_doc = tiny_engine.count_tokens(text)
    want_prompt = tiny_engine._encode("Which drug? <|im_end|>").tolist()
    errors, wrong = [], []

    def documents():
        for _ in range(50):
            try:
                if tiny_engine.count_tokens(text) != want_doc:
                    wrong.append("document")
            except Exception as err:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(err))

    def prompts():
        for _ in range(150):
            try:
                if tiny_engine._encode("Which drug? <|im_end|>").tolist() != want_prompt:
                    wrong.append("prompt")
            except Exception as err:  # noqa: BLE001
                errors.append(repr(err))

    threads = [threading.Thread(target=f) for f in (documents, prompts, documents, prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


def test_short_documents_are_not_tokenized_for_the_cap(service, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a text with fewer bytes than the limit cannot have more tokens")

    engine = service.engine()
    monkeypatch.setattr(engine, "count_tokens", fail)
    service.check_document_tokens(engine, service.load_uploads([], note("aspirin")))


# ---------------------------------------------------------------- 5 · the paste box's own limit
def test_the_paste_box_has_the_upload_limit_as_max_length():
    settings = AppSettings(max_upload_mb=0.5)
    assert element(build_demo(settings), "paste").max_length == settings.max_upload_bytes


# ---------------------------------------------------------------- 6 · the upload limit on every launch path
@pytest.fixture(scope="module")
def bare_server(tmp_path_factory, tiny_engine):
    """The demo started with its own ``demo.launch()`` (as ``gradio app.py`` or a hosting platform
    does), not through app.server.launch; default settings otherwise (shared writes off)."""
    tmp = tmp_path_factory.mktemp("bare")
    settings = AppSettings(
        backbone="tiny-random",
        checkpoint=None,
        store=str(tmp / "shared"),
        session_root=str(tmp / "sessions"),
        max_upload_mb=TEST_UPLOAD_MB,
    )
    demo = build_demo(settings, lambda: tiny_engine)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()
    demo.hmtqa.service.close()


def test_the_demo_enforces_the_upload_limit_without_app_server(bare_server, tmp_path):
    url, demo = bare_server
    limit = demo.hmtqa.settings.max_upload_bytes
    assert demo.max_file_size == limit
    small = httpx.post(url + "gradio_api/upload", files={"files": ("ok.txt", b"hello")}, timeout=30)
    assert small.status_code == 200
    big = httpx.post(
        url + "gradio_api/upload", files={"files": ("big.txt", b"a" * (limit + 1024))}, timeout=30
    )
    assert big.status_code == 413 and "maximum allowed size" in big.text
    demo.max_file_size = None  # what a later launch() or a reload assigns: the limit stays
    assert demo.max_file_size == limit


def test_the_demo_keeps_its_theme_and_css_without_app_server(bare_server):
    """Gradio 6 takes the theme and CSS at launch(), not in the Blocks; a bare ``demo.launch()`` still
    gets the page's own: its CSS and its theme (system fonts, not the default theme's)."""
    url, _ = bare_server
    config = httpx.get(url + "config", timeout=30).json()
    assert "#evidence" in config["css"] and config["stylesheets"] == []
    theme = httpx.get(url + "theme.css", timeout=30).text
    assert "Segoe UI" in theme and "Source Sans Pro" not in theme and "googleapis" not in theme


# ---------------------------------------------------------------- 7 · shared writes: opt-in, with a quota
def test_shared_writes_are_off_by_default(service):
    session = service.new_session()
    [result] = service.ingest(session, service.load_uploads([], note("apixaban")))
    with pytest.raises(AppError, match="turned off on this server.*--allow-shared-writes"):
        service.save_to_shared(session, result["doc_id"])
    other = service.new_session()
    with pytest.raises(AppError, match="turned off"):
        service.ingest(other, service.load_uploads([], note("edoxaban")), save_shared=True)
    assert other.existing_store() is None  # refused before the document was read
    assert service.documents(other) == []
    demo = QAApp(service).demo
    assert not element(demo, "save-shared").visible and not element(demo, "share-btn").visible


def test_shared_writes_when_allowed(tmp_path, tiny_engine):
    svc = make_service(tmp_path, tiny_engine, allow_shared_writes=True)
    try:
        session = svc.new_session()
        [result] = svc.ingest(session, svc.load_uploads([], note("apixaban")), save_shared=True)
        assert "saved to the shared store" in result["shared"]
        assert [(e.doc_id, e.where) for e in svc.documents(svc.new_session())] == [
            (result["doc_id"], "shared")
        ]
        demo = QAApp(svc).demo
        assert element(demo, "save-shared").visible and element(demo, "share-btn").visible
    finally:
        svc.close()


@pytest.mark.parametrize(
    ("quota", "message"),
    [
        ({"shared_max_documents": 1}, r"full \(1 documents, the limit is 1\)"),
        ({"shared_max_mb": 0.001}, "past its 0.001 MB limit"),
    ],
)
def test_shared_store_quota(tmp_path, tiny_engine, quota, message):
    svc = make_service(tmp_path, tiny_engine, allow_shared_writes=True, **quota)
    try:
        session = svc.new_session()
        first, second = (svc.ingest(session, svc.load_uploads([], note(d)))[0]["doc_id"] for d in ("a", "b"))
        if "shared_max_documents" in quota:
            svc.save_to_shared(session, first)
        with pytest.raises(AppError, match=message):
            svc.save_to_shared(session, second)
        assert second not in {e.doc_id for e in svc.documents(svc.new_session())}
    finally:
        svc.close()


def test_the_api_refuses_shared_writes_when_off(bare_server):
    url, _ = bare_server
    c = Client(url, verbose=False)
    with pytest.raises(ClientAppError, match="turned off"):
        c.predict(doc_id="anything", api_name="/save_to_shared")
    with pytest.raises(ClientAppError, match="turned off"):
        c.predict(files=[], text=note("x"), save_to_shared=True, api_name="/ingest")


# ---------------------------------------------------------------- 8 · document text is inert in Markdown
def render(md: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True, "linkify": False}).render(md)


def assert_inert(md: str) -> None:
    html = render(md)
    assert "<img" not in html and "<a " not in html and "<em>" not in html, html
    assert "![x](" not in md and not re.search(r"(?<!\\)<img", md)  # only escaped


def test_md_text_shows_the_characters_and_nothing_else():
    assert_inert(views.md_text(EVIL))
    html = render(views.md_text(EVIL))
    assert "Evil ![x](http://e/x.png) &lt;img src=x&gt; [click](http://e/) *loud*" in html
    assert views.md_text("# Title\n\n- item") == r"\# Title \- item"  # one line: no headings or lists


def test_titles_and_snippets_are_escaped_wherever_they_are_shown(tmp_path, tiny_engine):
    svc = make_service(tmp_path, tiny_engine)
    try:
        qa = QAApp(svc)
        session = svc.new_session()
        path = tmp_path / "evil.md"
        path.write_text(f"# {EVIL}\n\n{note('warfarin')}", encoding="utf-8")
        [doc] = svc.load_uploads([str(path)], None)
        assert doc.title.startswith("Evil ![x]")  # the Markdown heading became the title
        [result] = svc.ingest(session, [doc])
        memory_title = qa.select_document(session, result["doc_id"])[5]
        assert_inert(memory_title)
        assert "Evil" in memory_title

        answer = svc.ask(session, result["doc_id"], f"Why {EVIL}?", options=f"{EVIL}, no")
        assert_inert(QAApp._memory_title(svc.memory_view(session, result["doc_id"]), answer))
        answer.support = Support(EVIL, 0, len(EVIL), 0)
        answer.evidence = [Evidence(0, 0, 10, 0.9, EVIL)]
        answer.confidence, answer.abstained = 0.1, True
        answer.option_scores = {EVIL: -0.1, "no": -2.0}
        assert_inert(views.answer_markdown(answer))
        # The document picker shows labels as plain text: the title as it is.
        assert EVIL[:60] in svc.documents(session)[0].label
    finally:
        svc.close()
