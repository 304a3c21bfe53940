"""PubMedQA in its original layout (``.json``: an object keyed by PMID), one document per PMID.

The CONTEXTS are joined with blank lines, one section per context titled by its LABEL; question,
final_decision and long_answer go to ``metadata``. The same context joining serves JSON rows
whose text is a list of paragraphs or a Hugging Face style ``{"contexts", "labels"}`` mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .model import (
    Document,
    DocumentError,
    Section,
    _is_json_serialisable,
    _normalise_newlines,
    _sanitise_id,
    join_blocks,
)

logger = logging.getLogger(__name__)


def _contexts_text(contexts: object, labels: object, where: str) -> tuple[str, list[Section]]:
    """Join context paragraphs with blank lines; one section per context, titled by its label."""
    if not isinstance(contexts, list | tuple) or not all(isinstance(c, str) for c in contexts):
        raise DocumentError(f"{where}: contexts must be a list of strings")
    if not isinstance(labels, list | tuple) or len(labels) != len(contexts):
        if labels is not None:
            logger.warning(
                "%s: %s labels for %s contexts; using numbered sections",
                where,
                len(labels) if isinstance(labels, list | tuple) else "no",
                len(contexts),
            )
        labels = [None] * len(contexts)
    blocks: list[tuple[str | None, str]] = []
    for i, (context, label) in enumerate(zip(contexts, labels, strict=True), 1):
        context = _normalise_newlines(context).strip()
        if context:
            blocks.append((str(label).strip().title() if label else f"Context {i}", context))
    if not blocks:
        raise DocumentError(f"{where}: document has no non-empty contexts")
    return join_blocks(blocks)


def _is_pubmedqa(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(
        isinstance(v, Mapping) and ("CONTEXTS" in v or "QUESTION" in v) for v in obj.values()
    )


def _pubmedqa_documents(obj: Mapping[str, Any], path: Path) -> list[Document]:
    docs = []
    for pmid, entry in obj.items():
        where = f"{path}: PMID {pmid}"
        if "CONTEXTS" not in entry:
            raise DocumentError(f"{where}: missing CONTEXTS")
        text, sections = _contexts_text(entry["CONTEXTS"], entry.get("LABELS"), where)
        metadata: dict[str, Any] = {
            "format": "pubmedqa",
            "pmid": str(pmid),
            "question": entry.get("QUESTION"),
            "final_decision": entry.get("final_decision"),
            "long_answer": entry.get("LONG_ANSWER"),
        }
        # Keep the remaining fields (MESHES, YEAR, reasoning_* ...) under lower-case names.
        for key, value in entry.items():
            if key in ("CONTEXTS", "QUESTION", "final_decision", "LONG_ANSWER"):
                continue
            if _is_json_serialisable(value):
                metadata.setdefault(str(key).lower(), value)
        docs.append(
            Document(
                doc_id=_sanitise_id(pmid),
                title=f"PMID {pmid}",
                text=text,
                source=str(path),
                sections=sections,
                metadata=metadata,
            )
        )
    return docs
