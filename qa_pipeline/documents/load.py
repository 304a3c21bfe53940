"""Dispatch: :func:`load_documents` picks the loader for a file by its suffix."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .jats import _load_jats
from .json_rows import _load_json, _load_jsonl
from .model import Document, DocumentError
from .pdf import _load_pdf
from .text import _load_text_file

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50_000_000

TEXT_SUFFIXES = (".txt", ".md")
PDF_SUFFIXES = (".pdf",)
XML_SUFFIXES = (".nxml", ".xml")
JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + PDF_SUFFIXES + XML_SUFFIXES + JSON_SUFFIXES + JSONL_SUFFIXES


_LOADERS: dict[str, Callable[[Path, int], list[Document]]] = {
    **dict.fromkeys(TEXT_SUFFIXES, _load_text_file),
    **dict.fromkeys(PDF_SUFFIXES, _load_pdf),
    **dict.fromkeys(XML_SUFFIXES, _load_jats),
    **dict.fromkeys(JSON_SUFFIXES, _load_json),
    **dict.fromkeys(JSONL_SUFFIXES, _load_jsonl),
}


def load_documents(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """Load the document(s) in one file, dispatching on its suffix (case-insensitive).

    * ``.txt`` / ``.md``: one document; strict UTF-8 (a BOM is stripped), CRLF/CR normalised to
      LF, so offsets refer to the normalised text. Markdown ATX headings become sections and the
      first top-level heading the title.
    * ``.pdf``: one document, text layer via pypdf, pages joined with blank lines, one section
      ``"Page N"`` per page with text. pypdf runs in a child process limited to
      :data:`PDF_TIMEOUT_S` seconds and :data:`PDF_MEMORY_LIMIT_MB` of address space.
    * ``.nxml`` / ``.xml``: PMC JATS article: title, abstract(s), body sections and paragraphs in
      reading order, acknowledgements; figure/table captions kept, table bodies dropped. One
      section per abstract and per top-level body section.
    * ``.json``: PubMedQA original format (object keyed by PMID) -> one document per PMID, the
      CONTEXTS joined with blank lines, one section per context titled by its LABEL; question,
      final_decision and long_answer in ``metadata``. A single ``{"text": ...}`` object or a list
      of such objects is also accepted.
    * ``.jsonl``: one document per non-blank line, from ``text`` or ``document`` with optional
      ``id``/``doc_id`` and ``title``; other fields go to ``metadata``.

    Args:
        path: The file.
        max_bytes: Refuse files larger than this (checked before reading).

    Returns:
        The documents, in file order.

    Raises:
        DocumentError: On any bad input (missing, empty, binary, not UTF-8, too big, unknown
            suffix, malformed JSON/JSONL/XML, not JATS, PDF without text layer, ...).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    loader = _LOADERS.get(suffix)
    if loader is None:
        raise DocumentError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    docs = loader(path, max_bytes)
    logger.debug("loaded %d document(s) from %s", len(docs), path)
    return docs
