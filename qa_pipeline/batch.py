"""Batch QA: many rows, several answer modes, JSONL out (resumable), metrics at the end.

Data-parallel under torchrun: rows are grouped by document and the groups dealt out to the ranks
(so one document is read by one rank only); each rank writes its own part file and rank 0 merges
them into the output once all ranks are done. Every rank may share one store folder (the store
serialises writers with a file lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch.distributed as dist

from .documents import Document
from .engine import Answer, Engine, QAError
from .metrics import spans_overlap, summarize
from .qa_data import QARow
from .recall_eval import gold_segments
from .store import DocumentExists, MemoryStore, SegmentInfo, StoreError, UnknownDocument

logger = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _part_paths(out_path: Path) -> list[Path]:
    """Per-rank part files next to ``out_path`` (also those a crashed run with more ranks left)."""
    return sorted(p for p in out_path.parent.glob(f"{out_path.name}.rank*") if p.is_file())


def _read_lines(path: Path) -> list[tuple[tuple[str, str] | None, str]]:
    """(key, line) for every line of a results file; key None for a torn or foreign line."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            out.append(((str(rec["row_id"]), str(rec["mode"])), line))
        except (json.JSONDecodeError, KeyError, TypeError):
            out.append((None, line))
    return out


class ForeignAnswers(QAError):
    """The output file holds answers given by another model or with other answering settings."""


def check_stamps(out_path: str | Path, stamp: str) -> None:
    """Refuse an output file (or its torchrun part files) holding answers stamped by another model or
    other answering settings: adding answers would mix the two in one set of metrics, and summing up a
    finished file would report another model's metrics as this one's. Records of versions that
    stamped nothing pass with a warning."""
    out_path = Path(out_path)
    for path in (out_path, *_part_paths(out_path)):
        stamps: dict[str | None, int] = {}
        for key, line in _read_lines(path):
            if key is not None:
                other = json.loads(line).get("answered_by")
                stamps[other] = stamps.get(other, 0) + 1
        foreign = {k: n for k, n in stamps.items() if k is not None and k != stamp}
        if foreign:
            raise ForeignAnswers(
                f"{path} holds {sum(foreign.values())} answers of another model or other answering settings "
                f"(stamp {', '.join(sorted(foreign))}; this run's is {stamp}): a changed checkpoint, "
                "threshold, dtype or option, so its metrics would not be this model's. Give another output "
                "file, or delete this one to answer again."
            )
        if stamps.get(None):
            logger.warning("%s: %d answers carry no model stamp (an older version); resuming beside them", path, stamps[None])


def _done_keys(path: Path) -> set[tuple[str, str]]:
    """(row_id, mode) pairs already answered in an earlier run; a torn last line is ignored."""
    return {key for key, _ in _read_lines(path) if key is not None}


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so that appended records start on their own line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, 2)
        if fh.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        fh.truncate(cut)


def merge_parts(out_path: Path) -> None:
    """Append the records of every part file to ``out_path`` (each (row, mode) once), then remove them.

    Idempotent: a merge interrupted half-way is completed by the next one without duplicates.
    """
    parts = [p for p in _part_paths(out_path) if p != out_path]
    if not parts:
        return
    _repair_tail(out_path)
    done = _done_keys(out_path)
    with out_path.open("a", encoding="utf-8") as merged:
        for p in parts:
            for key, line in _read_lines(p):
                if key is not None and key not in done:
                    merged.write(line + "\n")
                    done.add(key)
        merged.flush()
    for p in parts:
        p.unlink(missing_ok=True)


def _doc_key(row: QARow) -> str:
    """Rows with the same key are about the same document (without reading document files)."""
    if row.doc_id:
        return "id:" + row.doc_id
    if row.document is not None:
        return "text:" + hashlib.sha1(row.document.encode("utf-8")).hexdigest()
    return "path:" + str(row.document_path)


def shard_rows(rows: list[QARow], rank: int, world: int) -> list[QARow]:
    """This rank's rows: documents dealt round-robin in order of first appearance, rows kept in order.

    Ranks get disjoint rows, and every row of one document goes to the same rank, so no document is
    read twice.
    """
    if world <= 1:
        return list(rows)
    owner: dict[str, int] = {}
    for row in rows:
        owner.setdefault(_doc_key(row), len(owner) % world)
    return [row for row in rows if owner[_doc_key(row)] == rank]


def pending(rows: Iterable[QARow], out_path: str | Path, modes: tuple[str, ...]) -> int:
    """How many (row, mode) answers are not in ``out_path`` (or its part files) yet."""
    out_path = Path(out_path)
    done = _done_keys(out_path)
    for p in _part_paths(out_path):
        done |= _done_keys(p)
    return sum(1 for row in rows for mode in modes if (row.row_id, mode) not in done)


def batch_metrics(out_path: str | Path, rows: Iterable[QARow] | None = None, modes: Iterable[str] | None = None) -> dict:
    """Per-mode metrics of the records in ``out_path`` (one record per (row, mode), the last kept).

    With ``rows``/``modes``, only the records of those rows and modes count (an output file shared by
    several data sets or runs with other modes does not mix into this run's numbers). Each mode also
    gets ``n_errors``: records whose row could not be answered (counted as wrong).
    """
    path = Path(out_path)
    latest: dict[tuple[str, str], dict] = {}
    if path.is_file():
        for key, line in _read_lines(path):
            if key is not None:
                latest[key] = json.loads(line)
    if rows is not None or modes is not None:
        row_ids = None if rows is None else {r.row_id for r in rows}
        mode_set = None if modes is None else set(modes)
        latest = {
            k: v
            for k, v in latest.items()
            if (row_ids is None or k[0] in row_ids) and (mode_set is None or k[1] in mode_set)
        }
    records = list(latest.values())
    metrics = summarize(records)
    for mode, m in metrics.items():
        m["n_errors"] = sum(1 for r in records if str(r.get("mode") or "default") == mode and r.get("error"))
    return metrics


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
    Under torch.distributed every rank must call this with the same rows; rank 0 returns the
    metrics of all ranks, the others an empty dict.
    """
    rank, world = _rank_world()
    out_path = Path(out_path)
    part = out_path if world == 1 else out_path.with_name(f"{out_path.name}.rank{rank}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = engine.answer_stamp
    check_stamps(out_path, stamp)
    if world == 1:
        merge_parts(out_path)  # records of an interrupted torchrun run
    done = _done_keys(out_path)
    for p in _part_paths(out_path):
        done |= _done_keys(p)
    mine = shard_rows(rows, rank, world)
    todo = [(row, mode) for row in mine for mode in modes if (row.row_id, mode) not in done]
    _repair_tail(part)
    with part.open("a", encoding="utf-8") as out:
        for i, (row, mode) in enumerate(todo):
            record = _answer_row(engine, store, row, mode)
            record["rank"] = rank
            record["answered_by"] = stamp
            out.write(json.dumps(record, default=str) + "\n")
            out.flush()
            if progress is not None:
                progress(i + 1, len(todo))
    if world > 1:
        dist.barrier()
        if rank == 0:
            merge_parts(out_path)
        dist.barrier()
    return batch_metrics(out_path, rows, modes) if rank == 0 else {}


def load_records(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def segment_ranking(answer: Answer, segments: list[SegmentInfo]) -> list[int] | None:
    """The answer's evidence as the document's HMT segment ids, best first: one granularity for
    every mode, so hit@k means the same thing in each and has one chance level.

    hmt modes: the whole recall, by weight. dense-rag: the segments its ranked chunks fall in, each at
    the rank of its best chunk. none: None, the mode reads one window and ranks nothing.
    """
    if answer.recall:
        return [int(idx) for idx, _ in sorted(answer.recall, key=lambda r: -r[1])]
    if answer.mode != "dense-rag":
        return None
    ranked: list[int] = []
    for ev in answer.evidence:
        for seg in segments:
            if seg.idx not in ranked and spans_overlap((seg.char_start, seg.char_end), (ev.char_start, ev.char_end)):
                ranked.append(seg.idx)
    return ranked


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
    # The user's own fields (ids, tags) travel with the row; they never replace a result field.
    record.update({k: v for k, v in row.extra.items() if k not in record})
    start = time.perf_counter()
    try:
        text = row.load_document()
        doc_id = row.document_id(text)
        record["doc_id"] = doc_id
        try:
            store.get_document(doc_id)
            if store.get_text(doc_id) != text:
                raise StoreError(
                    f"the store already holds a different document under id {doc_id!r}; give the row "
                    "another doc_id or use another --store"
                )
        except UnknownDocument:
            try:
                _, ingest = engine.ingest(
                    store, Document(doc_id=doc_id, title=doc_id, text=text, source=row.document_path or "batch")
                )
                record["ingest"] = ingest
            except DocumentExists:
                pass  # another process ingested it meanwhile
        start = time.perf_counter()  # latency is the answer's alone; ingestion is reported apart
        ans = engine.ask(store, doc_id, row.question, mode=mode, options=row.options, record=False)
        record["prediction"] = ans.answer
        record["sentence"] = ans.sentence  # open questions: the sentence the model wrote
        record["quoted"] = ans.quoted  # ... and whether the short answer is quoted from the document
        record["best_guess"] = ans.best_guess  # what an abstained answer would have said
        record["option_scores"] = ans.option_scores
        record["evidence_ranked"] = [[e.char_start, e.char_end] for e in ans.evidence]
        record["prompt_passages"] = ans.prompt_passages  # the first ones were the prompt's text
        record["prompt_spans"] = [list(s) for s in Engine.prompt_spans(ans.evidence[: ans.prompt_passages])]
        segments = store.segments(doc_id)
        record["segments_ranked"] = segment_ranking(ans, segments)
        record["gold_segments"] = gold_segments(segments, row.evidence)
        record["n_segments"] = len(segments)
        record["confidence"] = ans.confidence
        record["abstained"] = ans.abstained
        record["support"] = None if ans.support is None else [ans.support.char_start, ans.support.char_end]
        record["timings"] = ans.timings
    except (ValueError, OSError, StoreError) as err:  # bad row: record it, keep going
        record["error"] = f"{type(err).__name__}: {err}"
        logger.warning("row %s (%s): %s", row.row_id, mode, err)
    record["latency_s"] = time.perf_counter() - start
    return record
