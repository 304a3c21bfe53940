"""Batch-QA rows: one question about one document, with its gold answer and evidence if known.

A :class:`QARow` holds the question, the document (inline or by path), the gold answer and the gold
evidence (character spans in the document text). Rows are stored one JSON object per line
(:func:`read_rows` / :func:`write_rows`). The converters of the benchmark data sets into rows are in
:mod:`qa_pipeline.datasets`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

class QADataError(ValueError):
    """A QA row or data file is malformed."""


def _where(line: int | None) -> str:
    return f"line {line}: " if line is not None else ""


@dataclass
class QARow:
    """One question about one document.

    Attributes:
        row_id: Unique id of the row within its data set.
        question: The question text.
        document: Inline document text (either this or ``document_path`` is set).
        document_path: Path of a UTF-8 text file holding the document.
        doc_id: Id to give the document; rows sharing a ``doc_id`` share one ingested document.
        options: Options of a closed question (e.g. ``["yes", "no", "maybe"]``); None for open ones.
        answer: Gold answer; for closed questions one of ``options``.
        evidence: Gold evidence as ``(start, end)`` character spans (end exclusive) in the document.
        metadata: Free-form extra information from the source data set.
        extra: Top-level fields of the input row this format does not define (a user's ids, tags...):
            kept as they are and copied into the row's batch results.
    """

    row_id: str
    question: str
    document: str | None = None
    document_path: str | None = None
    doc_id: str | None = None
    options: list[str] | None = None
    answer: str | None = None
    evidence: list[tuple[int, int]] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def load_document(self) -> str:
        """Return the document text, reading ``document_path`` when the text is not inline.

        Returns:
            The document text.

        Raises:
            QADataError: If neither ``document`` nor ``document_path`` is set.
        """
        if self.document is not None:
            return self.document
        if self.document_path is None:
            raise QADataError(f"row {self.row_id!r} has neither document nor document_path")
        return Path(self.document_path).read_text(encoding="utf-8")

    def document_id(self, text: str | None = None) -> str:
        """The id its document is stored under: ``doc_id``, else a hash of the text (rows sharing a
        document then share one ingestion). ``text`` saves reading ``document_path`` again."""
        if self.doc_id:
            return self.doc_id
        text = self.load_document() if text is None else text
        return "doc-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]

    def to_json(self) -> dict:
        """Return a JSON-serialisable dict; unset optional fields are left out.

        Returns:
            A dict that :meth:`from_json` reads back into an equal row.
        """
        obj: dict[str, Any] = {"row_id": self.row_id, "question": self.question}
        for name in ("document", "document_path", "doc_id", "options", "answer"):
            value = getattr(self, name)
            if value is not None:
                obj[name] = value
        if self.evidence:
            obj["evidence"] = [[int(s), int(e)] for s, e in self.evidence]
        if self.metadata:
            obj["metadata"] = self.metadata
        for key, value in self.extra.items():
            obj.setdefault(key, value)
        return obj

    @classmethod
    def from_json(cls, obj: Any, *, line: int | None = None) -> QARow:
        """Build and validate a row from a decoded JSON object.

        ``row_id`` may also be given as ``id``; when both are missing and ``line`` is known the row
        gets the id ``"line-<line>"``.

        Args:
            obj: The decoded JSON value.
            line: Line number in the source file, used in error messages.

        Returns:
            The validated row.

        Raises:
            QADataError: If a field is missing or has the wrong type or value; the message names the
                line when ``line`` is given.
        """
        where = _where(line)
        if not isinstance(obj, dict):
            raise QADataError(f"{where}expected a JSON object, got {type(obj).__name__}")
        known = ({f for f in cls.__dataclass_fields__} - {"extra"}) | {"id"}
        extra = {k: v for k, v in obj.items() if k not in known}

        row_id = obj.get("row_id", obj.get("id"))
        if row_id is None:
            if line is None:
                raise QADataError("missing row_id")
            row_id = f"line-{line}"
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id).strip() == "":
            raise QADataError(f"{where}row_id must be a non-empty string")
        row_id = str(row_id)

        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise QADataError(f"{where}question must be a non-empty string")

        def opt_str(name: str) -> str | None:
            value = obj.get(name)
            if value is not None and not isinstance(value, str):
                raise QADataError(f"{where}{name} must be a string")
            return value

        document = opt_str("document")
        document_path = opt_str("document_path")
        doc_id = obj.get("doc_id")
        # A PMID or another numeric id is a natural doc_id: take it as its string.
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        doc_id = opt_str("doc_id") if not isinstance(doc_id, str) else doc_id
        answer = opt_str("answer")
        if document is None and not document_path:
            raise QADataError(f"{where}row needs 'document' (text) or 'document_path'")

        options = obj.get("options")
        if options is not None:
            if (
                not isinstance(options, list)
                or not options
                or not all(isinstance(o, str) and o.strip() for o in options)
            ):
                raise QADataError(f"{where}options must be a non-empty list of non-empty strings")
            if answer is not None:
                folded = {o.strip().casefold() for o in options}
                if answer.strip().casefold() not in folded:
                    raise QADataError(f"{where}answer {answer!r} is not one of the options {options}")

        evidence_raw = obj.get("evidence", [])
        if evidence_raw is None:
            evidence_raw = []
        if not isinstance(evidence_raw, list):
            raise QADataError(f"{where}evidence must be a list of [start, end] pairs")
        evidence: list[tuple[int, int]] = []
        for span in evidence_raw:
            ok = (
                isinstance(span, (list, tuple))
                and len(span) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                and 0 <= span[0] < span[1]
            )
            if not ok:
                raise QADataError(
                    f"{where}invalid evidence span {span!r}: need [start, end] ints, 0 <= start < end"
                )
            evidence.append((span[0], span[1]))
        if document is not None:
            for s, e in evidence:
                if e > len(document):
                    raise QADataError(
                        f"{where}evidence span [{s}, {e}] is past the end of the document ({len(document)} chars)"
                    )

        metadata = obj.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise QADataError(f"{where}metadata must be an object")

        return cls(
            row_id=row_id,
            question=question,
            document=document,
            document_path=document_path,
            doc_id=doc_id,
            options=list(options) if options is not None else None,
            answer=answer,
            evidence=evidence,
            metadata=metadata,
            extra=extra,
        )


def read_rows(path: str | Path, *, on_error: Callable[[int, str], None] | None = None) -> list[QARow]:
    """Read rows from a JSONL file (one JSON object per line; blank lines are ignored).

    A relative ``document_path`` is resolved against the data file's folder, so a data set can ship
    its documents next to the rows.

    Args:
        path: The JSONL file.
        on_error: Called as ``on_error(line_no, message)`` for each malformed line, which is then
            skipped. When None the first malformed line raises.

    Returns:
        The valid rows in file order.

    Raises:
        QADataError: On a malformed line (including a duplicate ``row_id``) when ``on_error`` is None.
    """
    path = Path(path)
    base = path.resolve().parent
    rows: list[QARow] = []
    seen: set[str] = set()
    extra_fields: set[str] = set()
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise QADataError(f"line {line_no}: invalid JSON ({exc.msg})") from exc
                row = QARow.from_json(obj, line=line_no)
                if row.row_id in seen:
                    raise QADataError(f"line {line_no}: duplicate row_id {row.row_id!r}")
            except QADataError as exc:
                if on_error is None:
                    raise
                on_error(line_no, str(exc))
                continue
            if row.document_path and not Path(row.document_path).is_absolute():
                row.document_path = str(base / row.document_path)
            seen.add(row.row_id)
            extra_fields.update(row.extra)
            rows.append(row)
    if extra_fields:  # once per file, not once per row
        logger.warning(
            "%s: field(s) %s are not part of the row format; kept and copied to the results", path, sorted(extra_fields)
        )
    return rows


def write_rows(rows: Iterable[QARow], path: str | Path) -> None:
    """Write rows as JSONL (UTF-8, one object per line), creating parent folders.

    Args:
        rows: The rows to write.
        path: Destination file; overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
