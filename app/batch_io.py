"""Reading batch-QA uploads (JSONL rows or CSV) into :class:`QARow` objects, safely.

Uploaded rows may not name files on the server (``document_path``): a web user could otherwise
read any file the server can. Documents must be inline in the upload.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from qa_pipeline.qa_data import QADataError, QARow, read_rows

from .errors import AppError

SAMPLE_BATCH = Path(__file__).with_name("sample_batch.jsonl")
BATCH_SUFFIXES = (".jsonl", ".csv")
CSV_OPTION_SEPARATOR = "|"


def read_batch_upload(path: str | Path, *, display_name: str | None = None, max_rows: int = 500) -> list[QARow]:
    """Rows from an uploaded ``.jsonl`` or ``.csv`` file.

    JSONL rows follow :class:`QARow` (``question``, ``document``, optional ``options``, ``answer``,
    ``evidence`` spans, ``doc_id``, ``row_id``). CSV needs the columns ``document`` and
    ``question``; optional ``options`` (``"a|b|c"``), ``answer``, ``doc_id``, ``row_id``/``id``.

    Raises:
        AppError: With the file name and line for any malformed input.
    """
    path = Path(path)
    name = display_name or path.name
    suffix = path.suffix.lower()
    if suffix not in BATCH_SUFFIXES:
        raise AppError(f"{name}: batch files must be .jsonl or .csv (got {suffix or 'no extension'!r}).")
    try:
        if path.stat().st_size == 0:
            raise AppError(f"{name}: the file is empty.")
        rows = _read_csv(path) if suffix == ".csv" else read_rows(path)
    except QADataError as err:
        raise AppError(f"{name}: {err}") from None
    except UnicodeDecodeError:
        raise AppError(f"{name}: not UTF-8 text (is it a binary file?).") from None
    if not rows:
        raise AppError(f"{name}: no rows found.")
    if len(rows) > max_rows:
        raise AppError(f"{name}: {len(rows)} rows; the web app runs at most {max_rows} (use `hmtqa batch` for more).")
    for row in rows:
        if row.document_path is not None:
            raise AppError(
                f"{name}: row {row.row_id!r} uses document_path; uploads must carry the text inline in "
                "'document' (the server does not read its own files for web users)."
            )
    return rows


def _read_csv(path: Path) -> list[QARow]:
    text = path.read_text(encoding="utf-8-sig")
    if "\x00" in text:
        raise QADataError("looks like a binary file, not CSV")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = {c.strip().lower() for c in reader.fieldnames or [] if c}
    missing = {"document", "question"} - columns
    if missing:
        raise QADataError(f"missing CSV column(s) {sorted(missing)}; need document, question (options, answer optional)")
    rows, seen = [], set()
    for line, raw in enumerate(reader, start=2):  # line 1 is the header
        record = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(record.values()):
            continue
        obj: dict = {"question": record.get("question", ""), "document": record.get("document", "")}
        row_id = record.get("row_id") or record.get("id")
        obj["row_id"] = row_id or f"line-{line}"
        if record.get("doc_id"):
            obj["doc_id"] = record["doc_id"]
        if record.get("options"):
            obj["options"] = [o.strip() for o in record["options"].split(CSV_OPTION_SEPARATOR) if o.strip()]
        if record.get("answer"):
            obj["answer"] = record["answer"]
        if record.get("evidence"):
            try:
                obj["evidence"] = json.loads(record["evidence"])
            except json.JSONDecodeError:
                raise QADataError(f"line {line}: evidence must be JSON like [[start, end]]") from None
        if not obj["document"]:
            raise QADataError(f"line {line}: the document column is empty")
        row = QARow.from_json(obj, line=line)
        if row.row_id in seen:
            raise QADataError(f"line {line}: duplicate row id {row.row_id!r}")
        seen.add(row.row_id)
        rows.append(row)
    return rows


def sample_rows() -> list[QARow]:
    """The small bundled sample (synthetic clinical notes written for this project)."""
    return read_rows(SAMPLE_BATCH)
