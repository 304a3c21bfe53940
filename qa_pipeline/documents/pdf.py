"""PDF files: the text layer, read with pypdf in a child process under a time and memory limit.

One document per file, pages joined with blank lines, one section ``"Page N"`` per page with text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model import (
    Document,
    DocumentError,
    _collapse_ws,
    _normalise_newlines,
    _read_bytes,
    _sanitise_id,
    join_blocks,
)

logger = logging.getLogger(__name__)


# pypdf runs in a child process with these limits, so a decompression bomb, a pathological
# content stream or a reader bug cannot exhaust the server's memory, hang it, or crash it.
PDF_TIMEOUT_S = 60.0
PDF_MEMORY_LIMIT_MB = 2048

# Runs in the child: reads the request from stdin, then hands over to _isolated_child_main. sys.path
# comes from the parent so the same modules are found however the parent was started.
_CHILD_BOOTSTRAP = (
    "import pickle, sys\n"
    "request = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = request['sys_path']\n"
    f"from {__name__} import _isolated_child_main\n"
    "_isolated_child_main(request)\n"
)


def _extract_pdf_text(data: bytes) -> dict[str, Any]:
    """Read a PDF with pypdf (runs in the child process; see :func:`_run_isolated`).

    Returns:
        JSON-serialisable ``{"page_texts", "num_pages", "title", "page_errors"}``: raw text per page,
        the page count, the metadata title (or ``None``) and ``[page_number, message]`` for each page
        whose text could not be extracted.

    Raises:
        DocumentError: For encrypted PDFs (message without the file name; the parent adds it).
        Exception: Anything pypdf raises on a broken file; the parent reports it as unreadable.
    """
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        # Many PDFs are "encrypted" with an empty user password only to set permissions.
        try:
            ok = reader.decrypt("")
        except (PyPdfError, NotImplementedError) as exc:
            raise DocumentError(f"PDF is encrypted and cannot be opened ({exc})") from None
        if not ok:
            raise DocumentError("PDF is password-protected")
    pages = list(reader.pages)
    page_texts: list[str] = []
    page_errors: list[list[Any]] = []
    for number, page in enumerate(pages, 1):
        try:
            page_texts.append(page.extract_text() or "")
        except Exception as exc:  # pypdf raises many exception types on broken content streams
            # One broken page should not lose the rest of the document.
            page_errors.append([number, f"{type(exc).__name__}: {exc}"[:300]])
            page_texts.append("")
    title = None
    try:
        if reader.metadata is not None and isinstance(reader.metadata.title, str):
            title = str(reader.metadata.title)
    except Exception:  # unreadable metadata only costs the title
        title = None
    return {"page_texts": page_texts, "num_pages": len(pages), "title": title, "page_errors": page_errors}


def _limit_memory(memory_mb: int) -> None:
    """Cap this process's address space (where the platform supports it)."""
    try:
        import resource
    except ImportError:  # not on POSIX: the time limit still applies
        return
    limit = memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _isolated_child_main(request: dict[str, Any]) -> None:
    """Child side of :func:`_run_isolated`: run the target, write one JSON reply to stdout."""
    import importlib
    import sys

    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply
    reply: dict[str, Any]
    try:
        _limit_memory(request["memory_mb"])
        module_name, _, qualname = request["target"].partition(":")
        func: Any = importlib.import_module(module_name)
        for attr in qualname.split("."):
            func = getattr(func, attr)
        reply = {"ok": func(request["data"])}
    except DocumentError as exc:
        reply = {"error": "document", "message": str(exc)}
    except MemoryError:
        reply = {"error": "memory"}
    except BaseException as exc:  # the parent turns any failure into a DocumentError
        reply = {"error": "crash", "message": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        text = json.dumps(reply)
    except MemoryError:
        text = json.dumps({"error": "memory"})
    out.write(text)
    out.flush()


def _run_isolated(
    func: Callable[[bytes], Any], data: bytes, path: Path, *, timeout_s: float, memory_mb: int
) -> Any:
    """Run ``func(data)`` in a fresh Python process under a time and an address-space limit.

    ``func`` must be importable by its module and qualified name, and return JSON-serialisable
    data. A subprocess rather than multiprocessing: spawn would re-import the parent's
    ``__main__`` (the whole web app) in every child.

    Raises:
        DocumentError: Naming ``path`` (as given, never the child's tracebacks) when ``func``
            raises, runs out of time or memory, or the child dies.
    """
    import pickle
    import subprocess
    import sys

    request = {
        "sys_path": [p for p in sys.path if isinstance(p, str)],
        "target": f"{func.__module__}:{func.__qualname__}",
        "data": data,
        "memory_mb": memory_mb,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_BOOTSTRAP],
            input=pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise DocumentError(
            f"{path}: PDF could not be read within {timeout_s:g} s; it may be damaged or too complex"
        ) from None
    except OSError as exc:
        logger.error("could not start the PDF reader process: %s", exc)
        raise DocumentError(f"{path}: cannot read PDF (the PDF reader could not be started)") from None
    if proc.stderr:  # pypdf's own warnings about the file, for the server log
        logger.debug("%s: PDF reader said: %s", path, proc.stderr.decode("utf-8", "replace")[-2000:])
    try:
        reply = json.loads(proc.stdout)
        if not isinstance(reply, dict):
            raise ValueError("reply is not an object")
    except ValueError:
        reply = None
    if reply is None:  # the child died before replying (killed, crashed, out of memory at startup)
        stderr = proc.stderr.decode("utf-8", "replace")[-2000:]
        if "MemoryError" in stderr:
            reply = {"error": "memory"}
        else:
            logger.warning("%s: PDF reader exited with code %s: %s", path, proc.returncode, stderr)
            raise DocumentError(
                f"{path}: cannot read PDF (the PDF reader stopped with exit code {proc.returncode})"
            )
    if "ok" in reply:
        return reply["ok"]
    if reply.get("error") == "memory":
        raise DocumentError(
            f"{path}: PDF could not be read within {memory_mb:,} MB of memory; it may be damaged or a "
            "decompression bomb"
        )
    if reply.get("error") == "document":
        raise DocumentError(f"{path}: {reply.get('message')}")
    raise DocumentError(f"{path}: cannot read PDF ({reply.get('message')})")


def _load_pdf(path: Path, max_bytes: int) -> list[Document]:
    data = _read_bytes(path, max_bytes)
    if not data.lstrip().startswith(b"%PDF"):
        raise DocumentError(f"{path}: not a PDF file (no %PDF header)")
    # Looked up at call time so the module constants (and tests) can change the limits and extractor.
    result = _run_isolated(
        _extract_pdf_text, data, path, timeout_s=PDF_TIMEOUT_S, memory_mb=PDF_MEMORY_LIMIT_MB
    )
    try:
        page_texts = [str(t) for t in result["page_texts"]]
        num_pages = int(result["num_pages"])
        raw_title = result.get("title")
        page_errors = list(result.get("page_errors") or [])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DocumentError(f"{path}: cannot read PDF (unexpected reply from the PDF reader)") from None
    for number, message in page_errors:
        logger.warning("%s: could not extract text from page %s: %s", path, number, message)

    pages = [(f"Page {number}", _normalise_newlines(t).strip()) for number, t in enumerate(page_texts, 1)]
    pages = [(title, t) for title, t in pages if t]
    if not pages and page_errors:
        # Not a scan: the reader failed on the pages (e.g. pypdf's LimitReachedError on a stream that
        # decompresses to more than its limit, a decompression bomb).
        number, message = page_errors[0]
        raise DocumentError(
            f"{path}: no text could be read from this PDF ({len(page_errors)} of {num_pages} page(s) failed; "
            f"page {number}: {message})"
        )
    if not pages:
        raise DocumentError(
            f"{path}: PDF has no text layer (scanned PDF?); run OCR on it first or paste the text"
        )
    text, sections = join_blocks(pages)
    title = _collapse_ws(raw_title) if isinstance(raw_title, str) else ""
    return [
        Document(
            doc_id=_sanitise_id(path.stem),
            title=title or path.stem,
            text=text,
            source=str(path),
            sections=sections,
            metadata={"format": "pdf", "num_pages": num_pages, "pages_with_text": len(pages)},
        )
    ]
