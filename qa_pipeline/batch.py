"""Batch QA: many rows, several answer modes, JSONL out (resumable), metrics at the end.

Data-parallel under torchrun: rank r answers rows r, r + world, ...; each rank writes its own
part file and rank 0 merges them into the output once all ranks are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from .documents import Document
from .engine import Engine
from .metrics import summarize
from .qa_data import QARow
from .store import MemoryStore, UnknownDocument

logger = logging.getLogger(__name__)


def _row_doc_id(row: QARow, text: str) -> str:
    return row.doc_id or "doc-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _done_keys(path: Path) -> set[tuple[str, str]]:
    """(row_id, mode) pairs already answered in an earlier run; a torn last line is ignored."""
    done = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done.add((rec["row_id"], rec["mode"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def run_batch(
    engine: Engine,
    rows: list[QARow],
    out_path: str | Path,
    store: MemoryStore,
    *,
    modes: tuple[str, ...] = ("hmt",),
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Answer every row in every mode; append records to ``out_path``; return per-mode metrics.

    Rows already in ``out_path`` (same row id and mode) are skipped, so an interrupted run resumes.
    A row whose document cannot be read is recorded with an ``error`` and counted as wrong.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    out_path = Path(out_path)
    part = out_path if world == 1 else out_path.with_name(f"{out_path.name}.rank{rank}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_keys(out_path) | _done_keys(part)
    mine = rows[rank::world]
    todo = [(row, mode) for row in mine for mode in modes if (row.row_id, mode) not in done]
    with part.open("a", encoding="utf-8") as out:
        for i, (row, mode) in enumerate(todo):
            out.write(json.dumps(_answer_row(engine, store, row, mode)) + "\n")
            out.flush()
            if progress is not None:
                progress(i + 1, len(todo))
    if world > 1:
        dist.barrier()
        if rank == 0:
            with out_path.open("a", encoding="utf-8") as merged:
                for r in range(world):
                    p = out_path.with_name(f"{out_path.name}.rank{r}")
                    if p.is_file() and p != out_path:
                        merged.write(p.read_text(encoding="utf-8"))
                        p.unlink()
        dist.barrier()
    return summarize(load_records(out_path)) if rank == 0 else {}


def load_records(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _answer_row(engine: Engine, store: MemoryStore, row: QARow, mode: str) -> dict:
    record = {
        "row_id": row.row_id,
        "mode": mode,
        "question": row.question,
        "options": row.options,
        "answer": row.answer,
        "evidence": [list(s) for s in row.evidence],
        "prediction": None,
        "evidence_ranked": [],
    }
    start = time.perf_counter()
    try:
        text = row.load_document()
        doc_id = _row_doc_id(row, text)
        record["doc_id"] = doc_id
        try:
            store.get_document(doc_id)
        except UnknownDocument:
            _, ingest = engine.ingest(
                store, Document(doc_id=doc_id, title=doc_id, text=text, source=row.document_path or "batch")
            )
            record["ingest"] = ingest
        start = time.perf_counter()  # latency is the answer's alone; ingestion is reported apart
        ans = engine.ask(store, doc_id, row.question, mode=mode, options=row.options, record=False)
        record["prediction"] = ans.answer
        record["option_scores"] = ans.option_scores
        record["evidence_ranked"] = [[e.char_start, e.char_end] for e in ans.evidence]
        record["timings"] = ans.timings
    except (ValueError, OSError) as err:  # bad row: record it, keep going
        record["error"] = f"{type(err).__name__}: {err}"
        logger.warning("row %s (%s): %s", row.row_id, mode, err)
    record["latency_s"] = time.perf_counter() - start
    return record
