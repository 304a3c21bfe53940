"""The document model (:class:`Document`, :class:`Section`, :class:`DocumentError`) and the helpers
every loader shares: id sanitising, whitespace, safe file reading, strict UTF-8, joining blocks.

Every loader produces one plain-text string per document (``Document.text``); all character
offsets anywhere in the pipeline (sections, chunks, answer spans) refer to that string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_UTF8_BOM = b"\xef\xbb\xbf"
_MAX_ID_LEN = 128
BLOCK_SEPARATOR = "\n\n"


class DocumentError(ValueError):
    """Bad input: message says which file and what is wrong."""


@dataclass
class Section:
    """A titled character span of :attr:`Document.text` (``text[start:end]``)."""

    title: str
    start: int  # character offset into Document.text
    end: int


@dataclass
class Document:
    """One loaded document.

    Attributes:
        doc_id: Stable id. For files the file stem (sanitised to ``[A-Za-z0-9._-]``), for PubMedQA
            the PMID, for JSONL rows the row's ``id``/``doc_id`` or ``<stem>-<line>``.
        title: Human-readable title (may be empty for pasted text).
        text: Full plain text; every offset anywhere refers to this string.
        source: Path or dataset name the document came from.
        sections: Non-overlapping titled spans of ``text``, in order.
        metadata: Extra JSON-serialisable information (format, PMID, question, ...).
    """

    doc_id: str
    title: str
    text: str
    source: str
    sections: list[Section] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def join_blocks(blocks: Iterable[tuple[str | None, str]]) -> tuple[str, list[Section]]:
    """Join text blocks with blank lines, recording where each one lies in the result.

    Args:
        blocks: ``(title, text)`` pairs in order. A block with a title becomes a :class:`Section`
            spanning exactly its text; one titled ``None`` is joined in without a section. Every
            block is kept, empty ones too: drop them first where they should not count.

    Returns:
        The joined text and the sections, whose offsets refer to it.
    """
    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    for title, text in blocks:
        if parts:
            pos += len(BLOCK_SEPARATOR)
        parts.append(text)
        if title is not None:
            sections.append(Section(title, pos, pos + len(text)))
        pos += len(text)
    return BLOCK_SEPARATOR.join(parts), sections


def _sanitise_id(raw: object, fallback: str = "doc") -> str:
    """Map an arbitrary id to ``[A-Za-z0-9._-]+`` so it is safe in file names and URLs."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("_")
    # A leading dot would give hidden files or ".." path components when ids become file names.
    text = text.lstrip(".")[:_MAX_ID_LEN]
    return text or fallback


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _collapse_ws(text: str) -> str:
    # str.split() with no argument splits on all Unicode whitespace (incl. NBSP / thin space),
    # which is what we want inside a paragraph of flowed XML text.
    return " ".join(text.split())


def _is_json_serialisable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reading files safely
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a whole file after checking it exists, is a regular file, non-empty and small enough."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot access file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise DocumentError(f"{path}: is a directory, not a file")
    # Check the size before reading so a huge upload cannot exhaust memory.
    if st.st_size > max_bytes:
        raise DocumentError(f"{path}: file is {st.st_size:,} bytes, over the limit of {max_bytes:,} bytes")
    if st.st_size == 0:
        raise DocumentError(f"{path}: file is empty (0 bytes)")
    try:
        with path.open("rb") as fh:
            # Read one byte past the limit: the file may have grown since stat().
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise DocumentError(f"{path}: file is over the limit of {max_bytes:,} bytes")
    if not data:
        raise DocumentError(f"{path}: file is empty (0 bytes)")
    return data


def _check_not_binary(data: bytes, path: Path) -> None:
    """Reject data that is clearly not UTF-8 text, with a more helpful message than a decode error."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError(f"{path}: file is UTF-16 encoded; only UTF-8 text is supported")
    nul = data.find(b"\x00")
    if nul != -1:
        raise DocumentError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not text")
    sample = data[:8192]
    # Control characters other than tab/newline/form feed/carriage return/escape are rare in
    # real text; a high share of them means the file is binary even without NUL bytes.
    controls = sum(1 for b in sample if (b < 32 and b not in (9, 10, 12, 13, 27)) or b == 127)
    # The minimum count keeps one stray control byte in a tiny file from tripping the ratio.
    if controls >= 8 and controls / len(sample) > 0.05:
        raise DocumentError(
            f"{path}: looks like a binary file ({controls} control bytes in the first {len(sample)})"
        )


def _decode_utf8(data: bytes, path: Path) -> str:
    """Decode strict UTF-8 (BOM stripped, CRLF/CR -> LF); never silently replace bad bytes."""
    _check_not_binary(data, path)
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + bom
        raise DocumentError(
            f"{path}: invalid UTF-8 at byte offset {offset} (byte 0x{data[offset]:02x}); "
            "re-save the file as UTF-8"
        ) from None
    text = _normalise_newlines(text)
    if not text.strip():
        raise DocumentError(f"{path}: file contains only whitespace")
    return text
