"""The Gradio Blocks UI: a thin layer that maps components to :class:`QAService` calls.

Three tabs: Ask (ingest a document, ask, see the evidence), Batch (many questions, metrics) and
Memory (what the model recalled, its memory embeddings, a FAISS search box, the segments).
The ``ingest`` and ``ask`` events are stable API endpoints for ``gradio_client``.

Over 500 lines: the page's layout and one handler per event; what the handlers do is in
``service.py``, how results are shown in ``views.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr

from hmt import resolve_dtype
from qa_pipeline.engine import ANSWER_MODES, DEFAULT_MODE, Answer, Engine, reader_name

from . import plots, views
from .batch_io import read_batch_upload, sample_rows
from .errors import AppError
from .service import MemoryView, QAService, UserSession, entry_dicts
from .settings import AppSettings

logger = logging.getLogger(__name__)

MODE_HELP = (
    "hmt: memory only · hmt+retrieval: memory + the recalled passages' text · "
    "dense-rag: MiniLM retrieval baseline · none: the model reads the start of the document"
)

HEADER = """
# hmt-qa · questions about long biomedical documents
The **Hierarchical Memory Transformer** reads a document segment by segment; each segment leaves a
memory embedding. A question recalls the memories it needs, and every answer shows the segments it
drew on. **1.** Upload or paste a document and press **Ingest**. **2.** Ask a question.
**3.** See the evidence below the answer, and what the model recalled in the **Memory** tab.
**Batch** answers a file of questions and scores them.
"""

BATCH_HELP = """
Answer many questions at once and score them. Upload **JSONL** (one object per line: `question`,
`document` (the text), optional `doc_id`, `options` list, `answer`, `evidence` `[[start, end]]`
character spans) or **CSV** (columns `document`, `question`, optional `options` as `a|b|c`,
`answer`). Closed questions (with options) are scored by accuracy and macro-F1, open ones by exact
match and token F1, evidence by hit@k. Or tick the bundled sample: six questions about three short
synthetic clinical notes.
"""

MEMORY_HELP = """
What the model remembers about the selected document and what the last question recalled.
**Recall weights**: how much the question's memory token draws on each segment (orange: evidence; for
an open question in `hmt+retrieval` the evidence is the recalled passages, so orange marks their segments).
**Recall distance**: how many segments back the recalled memories lie (paper fig. 11).
**PCA**: the memory embeddings and recall keys in 2-D, coloured by position; the star is the
question's query, so keys near it are recalled most. **Search** ranks segments for any text with
FAISS over the recall keys, exactly as recall would.
"""

CSS = """
.gradio-container {max-width: 1280px !important; margin: auto;}
#model-status {font-size: 0.92em;}
#evidence .textfield {max-height: 420px; overflow-y: auto; line-height: 1.55;}
/* Gradio 6 lays the pieces out as flex items (each piece its own box, so a highlight starting mid-line
   starts a new line, and a paragraph break shows as a bare line break): flow them as running text. */
#evidence .textfield {display: block;}
#evidence .textfield .token-container {display: inline;}
#evidence .textfield .line-break {display: block;}
#evidence .textfield .line-break + .line-break {height: 0.75em;}
footer {display: none !important;}
"""

MODEL_EVENTS = "model"  # one concurrency pool for every event that runs the model


def _theme() -> gr.themes.Base:
    # System fonts only: nothing for the page to fetch (Gradio 5's themes loaded Google Fonts, which
    # offline servers cannot reach; Gradio 6 bundles its own, but system fonts need no download at all).
    return gr.themes.Soft(
        primary_hue="orange",
        secondary_hue="blue",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    )


def _user_errors(fn: Callable) -> Callable:
    """Show :class:`AppError` as a Gradio error message (a toast in the page, an error for API clients)."""
    import functools
    import inspect

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except AppError as err:
                raise gr.Error(str(err), print_exception=False) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AppError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


class AppBlocks(gr.Blocks):
    """``gr.Blocks`` whose upload limit, theme and CSS hold however the app is launched.

    Gradio reads ``max_file_size`` from the Blocks on every upload, and ``launch()`` (and
    ``mount_gradio_app``) assign it, ``None`` (no limit) unless told otherwise: so ``gradio app.py``
    or a platform calling ``demo.launch()`` would lift the limit. Here the limit set at construction
    always applies; a launch may only lower it.

    Gradio 6 takes the theme and CSS at ``launch()`` rather than in the constructor; ``launch()`` here
    uses the page's own unless the caller passes others, so a bare ``demo.launch()`` gets them too.
    """

    def __init__(
        self,
        *args: Any,
        upload_limit: int | None = None,
        page_theme: gr.themes.Base | None = None,
        page_css: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.upload_limit = upload_limit
        self._launch_file_size: int | None = None
        self.page_theme = page_theme
        self.page_css = page_css
        super().__init__(*args, **kwargs)

    @property
    def max_file_size(self) -> int | None:  # type: ignore[override]
        limits = [v for v in (getattr(self, "_launch_file_size", None), self.upload_limit) if v is not None]
        return min(limits) if limits else None

    @max_file_size.setter
    def max_file_size(self, value: int | None) -> None:
        self._launch_file_size = value

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("theme") is None:
            kwargs["theme"] = self.page_theme
        if kwargs.get("css") is None:
            kwargs["css"] = self.page_css
        return super().launch(*args, **kwargs)


def _close_session(session: UserSession | None) -> None:
    """Gradio calls this when a session's state expires: its private store goes with it."""
    if session is not None:
        session.close()


class QAApp:
    """The page and its handlers; every handler is a few lines over :class:`QAService`."""

    def __init__(self, service: QAService) -> None:
        self.service = service
        self.settings = service.settings
        self.demo = self._build()

    # ------------------------------------------------------------------ helpers
    def _session(self, session: UserSession | None) -> UserSession:
        if session is None or session.closed:
            return self.service.new_session()
        return session

    @contextmanager
    def _request_session(self, session: UserSession | None) -> Iterator[UserSession]:
        """The caller's session, or a new one. A new one is closed (its folder removed) if the
        request fails: Gradio keeps no state from a failed call, so nothing would ever reach it."""
        created = session is None or session.closed
        current = self._session(session)
        try:
            yield current
        except BaseException:
            if created:
                current.close()
            raise

    def model_status(self) -> str:
        s, loader = self.settings, self.service.loader
        checkpoint = "untrained memory" if s.checkpoint is None else f"checkpoint `{s.checkpoint}`"
        state = loader.status()
        if state == "ready":
            note = f"**ready** (loaded in {loader.load_s or 0:.1f} s)"
        elif state == "failed":
            note = f"**failed to load**: {loader.error}"
        else:
            note = "**model loading…** you can upload and paste already; actions start once it is ready"
        try:
            dtype = str(resolve_dtype(s.dtype, s.device)).replace("torch.", "")
        except ValueError:  # a bad --dtype: the loader's error says so
            dtype = s.dtype
        dtype = f"`{dtype}` (auto)" if s.dtype == "auto" else f"`{dtype}`"
        reader = reader_name(s.engine_config())
        reads = f" · reader `{reader}` (writes open answers from the recalled passages)" if reader else ""
        line = f"Model `{s.backbone}` · {checkpoint}{reads} · {dtype} — {note}"
        if s.store:
            line += f" · shared store `{s.store}`" + ("" if s.allow_shared_writes else " (read-only)")
        if self.service.shared_error:
            line += f"\n\n⚠ {self.service.shared_error}"
        return line

    # ------------------------------------------------------------------ handlers
    def on_load(self, session: UserSession | None) -> tuple:
        self.service.loader.start()
        return self.model_status(), self.update_picker(session), gr.Timer(active=not self._settled())

    def _settled(self) -> bool:
        return self.service.loader.status() in ("ready", "failed")

    def on_tick(self) -> tuple:
        return self.model_status(), gr.Timer(active=not self._settled())

    def update_picker(self, session: UserSession | None, doc_id: str | None = None) -> gr.Dropdown:
        """The document picker's choices for this session, keeping ``doc_id`` selected if listed."""
        entries = self.service.documents(session, wait=False)
        keep = doc_id if doc_id in {e.doc_id for e in entries} else None
        return gr.Dropdown(choices=[(e.label, e.doc_id) for e in entries], value=keep)

    def list_documents(self, session: UserSession | None) -> list[dict]:
        """API ``documents``: what this session may ask about (its own uploads, then the shared store)."""
        return entry_dicts(self.service.documents(session, wait=False))

    def ingest(
        self,
        session: UserSession | None,
        files: list[str] | None,
        text: str | None,
        save_to_shared: bool = False,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """API ``ingest``: read uploaded files and/or pasted text into memory; returns the document id."""
        with self._request_session(session) as session:
            paths = [str(f) for f in (files or [])]
            docs = self.service.load_uploads(paths, text)  # checks every input before any model work
            if not self.service.loader.ready:
                progress(0.0, desc="Model loading…")

            def report(title: str, done: int, total: int, tps: float) -> None:
                progress((done, total), desc=f"Reading {title[:40]}: {tps:,.0f} tokens/s", unit="segments")

            results = self.service.ingest(session, docs, save_shared=bool(save_to_shared), progress=report)
        lines = []
        for r in results:
            speed = f", {r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else ""
            lines.append(
                f"✓ `{r['doc_id']}` {r['status']}: {r['tokens']:,} tokens, {r['segments']} segments{speed}"
            )
            if r.get("shared"):
                lines.append(f"  ↳ {views.md_text(r['shared'])}")
        return session, "\n\n".join(lines), results[-1]["doc_id"], results

    def ask(
        self,
        session: UserSession | None,
        doc_id: str | None,
        question: str,
        mode: str = DEFAULT_MODE,
        options: str | None = "",
    ) -> Iterator[tuple]:
        """API ``ask``: stream the answer; the final output is the answer and its JSON (evidence,
        confidence, abstained, the supporting sentence etc.)."""
        with self._request_session(session) as session:
            if not self.service.loader.ready:
                yield session, "(model loading… the answer starts as soon as it is ready)", None
            stream = self.service.ask_stream(session, doc_id or "", question, mode=mode, options=options)
            for text, answer in stream:
                yield session, text, None if answer is None else answer.to_json()

    def show_answer(self, session: UserSession | None) -> tuple:
        """After an answer: evidence and the supporting sentence over the text, confidence and timings,
        and the Memory-tab plots."""
        answer = session.last_answer if session else None
        if answer is None:
            return (gr.skip(),) * 6
        view = self.service.memory_view(session, answer.doc_id)
        pieces, colors = views.evidence_highlights(
            view.text, answer.evidence, answer.mode, answer.support, views.support_label(answer)
        )
        highlighted = gr.HighlightedText(value=pieces, color_map=colors)
        recall_fig, distance_fig = self._recall_figures(answer, len(view.segments))
        pca = plots.memory_pca_figure(view.memory, view.recall_key, answer.query)
        return highlighted, views.answer_markdown(answer), recall_fig, distance_fig, pca, self._memory_title(view, answer)

    def _recall_figures(self, answer: Answer, n_segments: int) -> tuple:
        if not answer.recall:
            msg = f"Mode '{answer.mode}' answers without memory recall.\nAsk in mode hmt or hmt+retrieval."
            return plots.message_figure(msg), plots.message_figure("")
        evidence = [e.segment for e in answer.evidence]
        return (
            plots.recall_weights_figure(n_segments, answer.recall, evidence),
            plots.recall_distance_figure(n_segments, answer.recall),
        )

    @staticmethod
    def _memory_title(view: MemoryView, answer: Answer | None = None) -> str:
        n_tokens = view.segments[-1].token_end if view.segments else 0
        title = f" {views.md_text(view.title)}" if view.title and view.title != view.doc_id else ""
        line = f"**Document**{title} (`{view.doc_id}`) · {len(view.segments)} segments · {n_tokens:,} tokens"
        if answer is not None:
            line += f"\n\n**Last question** ({answer.mode}): {views.md_text(answer.question)}"
        return line

    def select_document(self, session: UserSession | None, doc_id: str | None) -> tuple:
        """A document was picked: show its text, its memory and its segments."""
        if not doc_id:
            empty = plots.message_figure("Pick or ingest a document.")
            return [], "", empty, empty, empty, "Pick a document on the **Ask** tab.", []
        view = self.service.memory_view(session, doc_id)
        waiting = plots.message_figure("Ask a question to see what it recalls.")
        return (
            gr.HighlightedText(value=views.document_preview(view.text), color_map={}),
            "",
            waiting,
            plots.message_figure(""),
            plots.memory_pca_figure(view.memory, view.recall_key),
            self._memory_title(view),
            views.segment_rows(view.text, view.segments),
        )

    def save_to_shared(self, session: UserSession | None, doc_id: str | None) -> tuple:
        """API ``save_to_shared``: only on a server started with --allow-shared-writes, within its quota."""
        with self._request_session(session) as session:
            return session, f"✓ {views.md_text(self.service.save_to_shared(session, doc_id or ''))}"

    def search(self, session: UserSession | None, doc_id: str | None, text: str, k: float = 5) -> list[list]:
        """API ``search``: the segments whose recall keys best match the text (FAISS inner product)."""
        rows = self.service.search(session, doc_id or "", text, int(k))
        return [[r["rank"], r["segment"], r["score"], r["recall_weight"], r["chars"], r["snippet"]] for r in rows]

    def batch(
        self,
        session: UserSession | None,
        questions_file: str | None,
        use_sample: bool,
        modes: list[str],
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """API ``batch``: answer a JSONL/CSV file of questions; metrics, results and a results file."""
        with self._request_session(session) as session:
            if use_sample:
                rows = sample_rows()
            elif questions_file:
                rows = read_batch_upload(questions_file, max_rows=self.settings.max_batch_rows)
            else:
                raise AppError("Upload a .jsonl or .csv file of questions, or tick the bundled sample.")
            if not self.service.loader.ready:
                progress(0.0, desc="Model loading…")

            def report(done: int, total: int) -> None:
                progress((done, total), desc="Answering", unit="answers")

            records, metrics, out = self.service.run_batch(session, rows, list(modes or []), progress=report)
        errors = sum(1 for r in records if r.get("error"))
        status = f"✓ {len(records)} answers ({len(rows)} questions × {len(modes)} modes)"
        if errors:
            status += f"; ⚠ {errors} failed (see the error column)"
        return (
            session,
            status,
            {"headers": views.METRIC_HEADERS, "data": views.metric_rows(metrics)},
            {"headers": views.RESULT_HEADERS, "data": views.result_rows(records)},
            str(self.service.downloadable(out)),
        )

    def example_text(self) -> str:
        """The bundled synthetic notes as one record: long enough for several segments."""
        notes = dict.fromkeys(r.document or "" for r in sample_rows())
        return "Synthetic clinical records (three notes)\n\n" + "\n\n".join(n.strip() for n in notes)

    # ------------------------------------------------------------------ layout
    def _build(self) -> gr.Blocks:
        model = {"concurrency_id": MODEL_EVENTS, "concurrency_limit": self.settings.concurrency}
        light = {"concurrency_limit": None, "api_visibility": "private", "show_progress": "hidden"}
        blocks = AppBlocks(
            title="hmt-qa",
            page_theme=_theme(),
            page_css=CSS,
            analytics_enabled=False,
            upload_limit=self.settings.max_upload_bytes,
            delete_cache=self.settings.delete_cache,  # uploads and results files do not pile up
        )
        with blocks as demo:
            session = gr.State(None, time_to_live=self.settings.session_ttl_s, delete_callback=_close_session)
            gr.Markdown(HEADER)
            status = gr.Markdown(self.model_status(), elem_id="model-status")
            timer = gr.Timer(1.0)
            with gr.Tabs():
                with gr.Tab("Ask", id="ask"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=5):
                            gr.Markdown("### 1 · Add a document")
                            files = gr.File(
                                label="Upload .txt, .md, .pdf or PMC XML (.nxml / .xml)",
                                file_count="multiple",
                                file_types=[".txt", ".md", ".pdf", ".nxml", ".xml"],
                                height=150,
                                elem_id="files",
                            )
                            paste = gr.Textbox(
                                label="…or paste text",
                                lines=5,
                                max_lines=10,
                                placeholder="Paste an article, a case report, a discharge summary…",
                                # Characters, at most one byte each; the server checks the UTF-8 bytes again.
                                max_length=self.settings.max_upload_bytes,
                                elem_id="paste",
                            )
                            with gr.Row():
                                example_btn = gr.Button("Paste example notes", size="sm", variant="secondary", elem_id="example-btn")
                                save_shared = gr.Checkbox(
                                    label="Also save to the shared store (all users see it)",
                                    visible=self.settings.allow_shared_writes and bool(self.settings.store),
                                    elem_id="save-shared",
                                )
                            ingest_btn = gr.Button("Ingest", variant="primary", elem_id="ingest-btn")
                            ingest_status = gr.Markdown(label="status", elem_id="ingest-status")
                            ingested_id = gr.Textbox(label="document id", visible=False)
                            ingest_info = gr.JSON(label="ingested", visible=False)
                        with gr.Column(scale=6):
                            gr.Markdown("### 2 · Ask a question")
                            with gr.Row(equal_height=False):
                                picker = gr.Dropdown(
                                    label="Document (yours first, then the shared store)",
                                    choices=[],
                                    allow_custom_value=True,  # API callers pass ids; the handler validates them
                                    scale=5,
                                    elem_id="picker",
                                )
                                refresh_btn = gr.Button("↻ Refresh", size="sm", scale=1, min_width=90)
                            question = gr.Textbox(
                                label="Question", lines=2, placeholder="e.g. Which organism grew in the blood cultures?", elem_id="question"
                            )
                            options = gr.Textbox(
                                label="Options (optional): comma-separated answers for a closed question",
                                placeholder="yes, no, maybe",
                                elem_id="options",
                            )
                            mode = gr.Radio(list(ANSWER_MODES), value=DEFAULT_MODE, label="Answer mode", info=MODE_HELP)
                            ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-btn")
                            answer = gr.Textbox(label="Answer", lines=2, interactive=False, buttons=["copy"], elem_id="answer")
                            timings = gr.Markdown(elem_id="timings")
                            share_btn = gr.Button(
                                "Save the selected document to the shared store",
                                size="sm",
                                visible=self.settings.allow_shared_writes and bool(self.settings.store),
                                elem_id="share-btn",
                            )
                            share_status = gr.Markdown(label="status")
                    evidence = gr.HighlightedText(
                        label="Evidence over the document text: the segments or passages the answer drew on, ranked, and its supporting sentence",
                        elem_id="evidence",
                        show_legend=True,  # inline labels would repeat after every paragraph
                        combine_adjacent=False,
                    )
                    with gr.Accordion("Answer as JSON (what the API returns)", open=False):
                        answer_json = gr.JSON(label="answer json")
                    documents_json = gr.JSON(label="documents", visible=False)
                with gr.Tab("Batch", id="batch"):
                    gr.Markdown(BATCH_HELP)
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=1):
                            batch_file = gr.File(label="Questions (.jsonl or .csv)", file_types=[".jsonl", ".csv"], height=120)
                            use_sample = gr.Checkbox(label="Use the bundled sample (6 questions, 3 synthetic notes)", elem_id="use-sample")
                            batch_modes = gr.CheckboxGroup(list(ANSWER_MODES), value=["hmt"], label="Answer modes to compare")
                            batch_btn = gr.Button("Run batch", variant="primary", elem_id="batch-btn")
                        with gr.Column(scale=2):
                            batch_status = gr.Markdown(label="status", elem_id="batch-status")
                            metrics = gr.Dataframe(headers=views.METRIC_HEADERS, label="Metrics per mode", interactive=False)
                            download = gr.File(label="Download the results (JSONL)", interactive=False, height=70)
                    results = gr.Dataframe(
                        headers=views.RESULT_HEADERS,
                        label="Results",
                        wrap=True,
                        column_widths=views.RESULT_WIDTHS,
                        interactive=False,
                    )
                with gr.Tab("Memory", id="memory"):
                    gr.Markdown(MEMORY_HELP)
                    memory_title = gr.Markdown("Pick a document on the **Ask** tab.", elem_id="memory-title")
                    with gr.Row():
                        recall_plot = gr.Plot(label="Recall weights by segment", show_label=False, format="png", elem_id="recall-plot")
                        distance_plot = gr.Plot(label="Recall distance", show_label=False, format="png")
                    pca_plot = gr.Plot(label="Memory embeddings and recall keys (PCA)", show_label=False, format="png", elem_id="pca-plot")
                    gr.Markdown("#### Search the memory")
                    with gr.Row(equal_height=False):
                        search_text = gr.Textbox(
                            label="Text to search for (encoded as a question)", placeholder="e.g. antibiotic treatment", scale=5
                        )
                        search_k = gr.Slider(1, 20, value=5, step=1, label="results", scale=1)
                        search_btn = gr.Button("Search", scale=1, variant="primary")
                    search_results = gr.Dataframe(
                        headers=["rank", "segment", "score q·K", "recall weight", "characters", "snippet"],
                        label="Nearest segments",
                        wrap=True,
                        column_widths=["7%", "8%", "10%", "10%", "11%", "54%"],
                        interactive=False,
                        elem_id="search-results",
                    )
                    gr.Markdown("#### Segments of the document")
                    segments = gr.Dataframe(
                        headers=views.SEGMENT_HEADERS,
                        label="Segments",
                        show_label=False,
                        wrap=True,
                        column_widths=views.SEGMENT_WIDTHS,
                        interactive=False,
                    )

            memory_outputs = [evidence, timings, recall_plot, distance_plot, pca_plot, memory_title]
            demo.load(_user_errors(self.on_load), [session], [status, picker, timer], **light)
            timer.tick(self.on_tick, None, [status, timer], **light)
            example_btn.click(self.example_text, None, [paste], **light)
            refresh_btn.click(
                self.list_documents, [session], [documents_json], api_name="documents", concurrency_limit=None,
                show_progress="hidden",
            ).success(self.update_picker, [session, picker], [picker], **light)
            ingest_btn.click(
                _user_errors(self.ingest), [session, files, paste, save_shared], [session, ingest_status, ingested_id, ingest_info],
                api_name="ingest", **model,
            ).success(self.update_picker, [session, ingested_id], [picker], **light)
            picker.change(_user_errors(self.select_document), [session, picker], [*memory_outputs, segments], **light)
            ask_event = ask_btn.click(
                _user_errors(self.ask), [session, picker, question, mode, options], [session, answer, answer_json],
                api_name="ask", **model,
            )
            question.submit(
                _user_errors(self.ask), [session, picker, question, mode, options], [session, answer, answer_json],
                api_visibility="private", **model,
            ).success(_user_errors(self.show_answer), [session], memory_outputs, **light)
            ask_event.success(_user_errors(self.show_answer), [session], memory_outputs, **light)
            share_btn.click(
                _user_errors(self.save_to_shared), [session, picker], [session, share_status], api_name="save_to_shared",
            ).success(self.update_picker, [session, picker], [picker], **light)
            search_btn.click(
                _user_errors(self.search), [session, picker, search_text, search_k], [search_results], api_name="search", **model,
            )
            batch_btn.click(
                _user_errors(self.batch), [session, batch_file, use_sample, batch_modes],
                [session, batch_status, metrics, results, download], api_name="batch", **model,
            )
        demo.queue(default_concurrency_limit=self.settings.concurrency, max_size=self.settings.queue_size)
        return demo


def build_app(
    settings: AppSettings | None = None, engine_factory: Callable[[], Engine] | None = None
) -> QAApp:
    """The UI with its service; ``app.service.close()`` removes the session folders at shutdown."""
    return QAApp(QAService(settings or AppSettings(), engine_factory))


def build_demo(
    settings: AppSettings | None = None, engine_factory: Callable[[], Engine] | None = None
) -> gr.Blocks:
    """The Gradio app. Nothing heavy happens here: the model starts loading on the first page view
    or request (or when :func:`app.server.launch` starts the server).

    Args:
        settings: Server and model settings; defaults to the embedded default model.
        engine_factory: Builds the :class:`Engine` (tests pass a tiny model); default
            ``Engine(settings.engine_config())``.
    """
    qa = build_app(settings, engine_factory)
    demo = qa.demo
    demo.hmtqa = qa  # type: ignore[attr-defined]  # lets launch() start the model load and clean up
    return demo

