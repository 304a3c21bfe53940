"""Plain text and Markdown (``.txt`` / ``.md``) files, and pasted text."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .model import (
    Document,
    DocumentError,
    Section,
    _decode_utf8,
    _normalise_newlines,
    _read_bytes,
    _sanitise_id,
)

_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown_sections(text: str) -> tuple[str, list[Section]]:
    """Find ATX headings (outside code fences); return (first top-level heading, sections)."""
    headings: list[tuple[int, int, str]] = []  # (offset, level, title)
    in_fence = False
    pos = 0
    for line in text.split("\n"):
        if _MD_FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            m = _MD_HEADING.match(line)
            if m and m.group(2).strip():
                headings.append((pos, len(m.group(1)), m.group(2).strip()))
        pos += len(line) + 1
    sections = []
    for i, (start, _level, title) in enumerate(headings):
        end = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        end = start + len(text[start:end].rstrip())
        sections.append(Section(title, start, end))
    title = ""
    if headings:
        top = min(level for _, level, _ in headings)
        title = next(t for _, level, t in headings if level == top)
    return title, sections


def _load_text_file(path: Path, max_bytes: int) -> list[Document]:
    text = _decode_utf8(_read_bytes(path, max_bytes), path)
    title, sections = "", []
    fmt = "text"
    if path.suffix.lower() == ".md":
        fmt = "markdown"
        title, sections = _markdown_sections(text)
    return [
        Document(
            doc_id=_sanitise_id(path.stem),
            title=title or path.stem,
            text=text,
            source=str(path),
            sections=sections,
            metadata={"format": fmt},
        )
    ]


def load_text(text: str, *, doc_id: str | None = None, title: str = "", source: str = "pasted") -> Document:
    """Wrap pasted text in a :class:`Document`.

    Line endings are normalised (CRLF/CR -> LF) and offsets refer to the normalised text.

    Args:
        text: The document text.
        doc_id: Optional id (sanitised); defaults to ``"doc-"`` + the first 12 hex chars of the
            SHA-1 of the (normalised) text, so pasting the same text twice gives the same id.
        title: Optional title.
        source: Where the text came from, for display.

    Returns:
        The document, with no sections and ``metadata == {"format": "text"}``.

    Raises:
        DocumentError: If ``text`` is not a string or is empty / whitespace only.
    """
    if not isinstance(text, str):
        raise DocumentError(f"{source}: expected text as str, got {type(text).__name__}")
    # A byte-order mark pasted with the text (copied from a UTF-8-BOM file) is not content: files drop it too.
    text = _normalise_newlines(text.removeprefix("\ufeff"))
    if not text.strip():
        raise DocumentError(f"{source}: text is empty")
    if doc_id is None:
        doc_id = "doc-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    else:
        doc_id = _sanitise_id(doc_id)
    return Document(doc_id=doc_id, title=title, text=text, source=source, metadata={"format": "text"})
