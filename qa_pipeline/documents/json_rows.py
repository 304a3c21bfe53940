"""JSON documents (``.json``) and JSON Lines (``.jsonl``): one document per object.

A row's text comes from ``text`` or ``document`` (a string, a list of paragraphs, or a
``{"contexts", "labels"}`` mapping), with optional ``id``/``doc_id`` and ``title``; other fields go
to ``metadata``. A ``.json`` file in the PubMedQA layout is handed to :mod:`.pubmedqa`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .model import (
    _UTF8_BOM,
    Document,
    DocumentError,
    Section,
    _check_not_binary,
    _collapse_ws,
    _decode_utf8,
    _is_json_serialisable,
    _normalise_newlines,
    _read_bytes,
    _sanitise_id,
)
from .pubmedqa import _contexts_text, _is_pubmedqa, _pubmedqa_documents

logger = logging.getLogger(__name__)


def _row_text(value: object, where: str) -> tuple[str, list[Section]]:
    """Text (and sections) from a row's text field: a string, a list of strings, or a
    PubMedQA-style ``{"contexts": [...], "labels": [...]}`` mapping (the Hugging Face layout)."""
    if isinstance(value, str):
        text = _normalise_newlines(value)
        if not text.strip():
            raise DocumentError(f"{where}: document text is empty")
        return text, []
    if isinstance(value, Mapping) and "contexts" in value:
        return _contexts_text(value.get("contexts"), value.get("labels"), where)
    if isinstance(value, list | tuple):
        return _contexts_text(value, None, where)
    raise DocumentError(f"{where}: document text must be a string, got {type(value).__name__}")


def _extra_metadata(row: Mapping[str, Any], exclude: set[str], where: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in row.items():
        if key in exclude:
            continue
        if _is_json_serialisable(value):
            meta[str(key)] = value
        else:
            logger.debug("%s: dropping non-JSON-serialisable field %r", where, key)
    return meta


class _UniqueIds:
    """Reject duplicate doc ids: downstream stores key documents by id."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def add(self, doc_id: str, where: str) -> None:
        if doc_id in self._seen:
            raise DocumentError(
                f"{where}: duplicate document id {doc_id!r} (first seen at {self._seen[doc_id]})"
            )
        self._seen[doc_id] = where


def _document_from_row(
    row: Mapping[str, Any],
    *,
    where: str,
    source: str,
    default_id: str,
    text_fields: tuple[str, ...],
    id_fields: tuple[str, ...],
    title_fields: tuple[str, ...],
    extra: dict[str, Any],
) -> Document:
    text_key = next((k for k in text_fields if k in row), None)
    if text_key is None:
        raise DocumentError(f"{where}: row has no {' or '.join(repr(k) for k in text_fields)} field")
    text, sections = _row_text(row[text_key], where)
    id_key = next((k for k in id_fields if k in row and row[k] is not None), None)
    doc_id = _sanitise_id(row[id_key], default_id) if id_key else default_id
    title_key = next((k for k in title_fields if k in row), None)
    title = _collapse_ws(str(row[title_key])) if title_key and row[title_key] is not None else ""
    used = {k for k in (text_key, id_key, title_key) if k}
    metadata = {**_extra_metadata(row, used, where), **extra}
    return Document(
        doc_id=doc_id, title=title, text=text, source=source, sections=sections, metadata=metadata
    )


def iter_jsonl(
    path: str | os.PathLike[str], *, on_error: Callable[[int, str], None] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, obj)`` for each non-blank line of a JSONL file.

    Line numbers are 1-based. A malformed line (invalid UTF-8, invalid JSON, or a JSON value that
    is not an object) calls ``on_error(line_number, message)`` and is skipped when ``on_error`` is
    given, so the remaining rows are still processed; otherwise it raises.

    Args:
        path: The ``.jsonl`` file.
        on_error: Optional callback for malformed lines.

    Yields:
        ``(line_number, obj)`` with ``obj`` a dict.

    Raises:
        DocumentError: If the file cannot be opened, or on a malformed line without ``on_error``;
            the message names the file and the line number.
    """
    path = Path(path)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DocumentError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot open file ({exc.strerror or exc})") from None
    with fh:
        for line_number, raw in enumerate(fh, 1):
            if line_number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if not raw.strip():
                continue
            message = None
            obj: Any = None
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                message = f"{path}: line {line_number}: invalid UTF-8 at byte {exc.start} of the line"
            except json.JSONDecodeError as exc:
                message = f"{path}: line {line_number}: malformed JSON ({exc.msg} at column {exc.colno})"
            else:
                if not isinstance(obj, dict):
                    message = f"{path}: line {line_number}: expected a JSON object, got {type(obj).__name__}"
            if message is not None:
                if on_error is None:
                    raise DocumentError(message)
                on_error(line_number, message)
                continue
            yield line_number, obj


def _load_jsonl(path: Path, max_bytes: int) -> list[Document]:
    # Read once for the size / empty / binary checks so failures have a clear file-level message.
    data = _read_bytes(path, max_bytes)
    _check_not_binary(data, path)
    del data
    stem = _sanitise_id(path.stem)
    ids = _UniqueIds()
    docs = []
    for line_number, row in iter_jsonl(path):
        where = f"{path}: line {line_number}"
        doc = _document_from_row(
            row,
            where=where,
            source=str(path),
            default_id=f"{stem}-{line_number}",
            text_fields=("text", "document"),
            id_fields=("id", "doc_id"),
            title_fields=("title",),
            extra={"format": "jsonl", "line": line_number},
        )
        ids.add(doc.doc_id, where)
        docs.append(doc)
    if not docs:
        raise DocumentError(f"{path}: file contains only blank lines")
    return docs


def _load_json(path: Path, max_bytes: int) -> list[Document]:
    text = _decode_utf8(_read_bytes(path, max_bytes), path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if isinstance(obj, dict) and _is_pubmedqa(obj):
        return _pubmedqa_documents(obj, path)
    rows: list[Any]
    if isinstance(obj, dict) and ("text" in obj or "document" in obj):
        rows = [obj]  # a single document object
    elif isinstance(obj, list):
        rows = obj  # a list of document objects, like JSONL in one array
    else:
        raise DocumentError(
            f"{path}: unrecognised JSON layout; expected PubMedQA (an object keyed by PMID whose "
            "values have QUESTION and CONTEXTS), a document object with 'text', or a list of those"
        )
    stem = _sanitise_id(path.stem)
    ids = _UniqueIds()
    docs = []
    for i, row in enumerate(rows):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise DocumentError(f"{where}: expected a JSON object, got {type(row).__name__}")
        doc = _document_from_row(
            row,
            where=where,
            source=str(path),
            default_id=stem if len(rows) == 1 else f"{stem}-{i}",
            text_fields=("text", "document"),
            id_fields=("id", "doc_id"),
            title_fields=("title",),
            extra={"format": "json"},
        )
        ids.add(doc.doc_id, where)
        docs.append(doc)
    if not docs:
        raise DocumentError(f"{path}: JSON list is empty")
    return docs
