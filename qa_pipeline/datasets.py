"""The biomedical QA data sets as batch-QA rows (:class:`~qa_pipeline.qa_data.QARow`).

* :func:`pubmedqa_fused` -- PubMedQA PQA-L with several abstracts fused into one long document
  (the HMT paper's appendix I); closed yes/no/maybe questions.
* :func:`covid_qa` -- COVID-QA (SQuAD format, whole articles as contexts); open questions.
* :func:`evidence_inference` -- Evidence Inference 2.0 (clinical-trial articles, prompts and
  annotations); closed three-way questions.

:func:`load_batch_data` picks the right reader from a spec string such as ``"pubmedqa:PATH"``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

from .documents.model import join_blocks
from .qa_data import QADataError, QARow, read_rows

logger = logging.getLogger(__name__)

PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
EVIDENCE_INFERENCE_OPTIONS = [
    "significantly increased",
    "significantly decreased",
    "no significant difference",
]

# Prompt ids the Evidence Inference authors flag as "Incorrect: obviously wrong and should not be
# included" (README.annotations.md, "Caveat"). None of them is in the shared test-split sample, but a
# fuller copy of the data would contain them.
_EI_FLAGGED_INCORRECT = frozenset(
    {
        911, 912, 1262, 1261, 3044, 3248, 3111, 3620, 4308, 4490, 4491, 4324, 4325, 4492, 4824, 5000,
        5001, 5002, 5046, 5047, 4948, 5639, 5710, 5752, 5775, 5782, 5841, 5843, 5861, 5862, 5863, 5964,
        5965, 5966, 5975, 4807, 5776, 5777, 5778, 5779, 5780, 5781, 6034, 6065, 6066, 6666, 6667, 6668,
        6669, 7040, 7042, 7944, 8590, 8605, 8606, 8639, 8640, 8745, 8747, 8749, 8877, 8878, 8593, 8631,
        8635, 8884, 8886, 8773, 10032, 10035, 8876, 8875, 8885, 8917, 8921, 8118, 10885, 10886, 10887,
        10888, 10889, 10890,
    }
)  # fmt: skip



# --------------------------------------------------------------------------------------------------
# PubMedQA, fused
# --------------------------------------------------------------------------------------------------


def pubmedqa_fused(
    path: str | Path, *, num_docs: int = 8, limit: int | None = None, seed: int = 0
) -> list[QARow]:
    """Build long-document PubMedQA rows by fusing each target abstract with distractor abstracts.

    Follows appendix I of the HMT paper: the document of question ``i`` is its own abstract plus
    ``num_docs - 1`` other abstracts of the same file, chosen and ordered by
    ``random.Random(seed + i)``, so a row's document depends only on the file, ``i``, ``num_docs``
    and ``seed`` (and not on ``limit``). An abstract's text is its CONTEXTS joined by a space;
    abstracts are separated by a blank line. The gold evidence is the span of the target abstract.

    Args:
        path: The original PubMedQA JSON (object keyed by PMID, e.g. ``ori_pqal.json``).
        num_docs: Abstracts per document, target included (capped at the number of abstracts).
        limit: Keep only the first ``limit`` questions (file order).
        seed: Base seed of the distractor choice and order.

    Returns:
        One row per question, options yes/no/maybe, answer = ``final_decision``.

    Raises:
        QADataError: If the file is not a PubMedQA object or an entry lacks QUESTION/CONTEXTS.
    """
    if num_docs < 1:
        raise ValueError("num_docs must be >= 1")
    with Path(path).open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not data:
        raise QADataError(f"{path}: expected a non-empty JSON object keyed by PMID")
    pmids = list(data)
    abstracts: dict[str, str] = {}
    for pmid, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("QUESTION"), str):
            raise QADataError(f"{path}: entry {pmid} lacks QUESTION")
        contexts = entry.get("CONTEXTS")
        if not isinstance(contexts, list) or not contexts:
            raise QADataError(f"{path}: entry {pmid} lacks CONTEXTS")
        abstracts[pmid] = " ".join(c.strip() for c in contexts if isinstance(c, str) and c.strip())

    n_docs = min(num_docs, len(pmids))
    if n_docs < num_docs:
        logger.warning(
            "only %d abstracts in %s; fusing %d per document instead of %d",
            len(pmids),
            path,
            n_docs,
            num_docs,
        )
    seed_tag = f"-s{seed}" if seed else ""
    rows: list[QARow] = []
    targets = pmids if limit is None else pmids[:limit]
    for index, pmid in enumerate(targets):
        entry = data[pmid]
        rng = random.Random(seed + index)
        others = [p for p in pmids if p != pmid]
        order = [pmid, *rng.sample(others, n_docs - 1)]
        rng.shuffle(order)

        document, sections = join_blocks((p, abstracts[p]) for p in order)
        spans = [[s.title, s.start, s.end] for s in sections]
        target_position = order.index(pmid)
        _, start, end = spans[target_position]

        decision = entry.get("final_decision")
        answer = decision.strip().lower() if isinstance(decision, str) else None
        if answer is not None and answer not in PUBMEDQA_OPTIONS:
            logger.warning("PubMedQA %s: unexpected final_decision %r; answer left unset", pmid, decision)
            answer = None
        rows.append(
            QARow(
                row_id=f"pqa-{pmid}",
                question=entry["QUESTION"].strip(),
                document=document,
                doc_id=f"pqa-{pmid}-m{n_docs}{seed_tag}",
                options=list(PUBMEDQA_OPTIONS),
                answer=answer,
                evidence=[(start, end)],
                metadata={
                    "source": "pubmedqa",
                    "pmid": pmid,
                    "long_answer": entry.get("LONG_ANSWER"),
                    "abstract_spans": spans,
                    "target_position": target_position,
                },
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------
# COVID-QA
# --------------------------------------------------------------------------------------------------


def _nearest_occurrence(text: str, needle: str, hint: int) -> int:
    """Return the start of the occurrence of ``needle`` in ``text`` nearest to ``hint``, or -1."""
    best = -1
    start = text.find(needle)
    while start != -1:
        if best == -1 or abs(start - hint) < abs(best - hint):
            best = start
        if start > hint:
            break  # later occurrences are only further away
        start = text.find(needle, start + 1)
    return best


def _answer_span(context: str, text: str, start: int) -> tuple[int, int] | None:
    """Locate an answer in its context, repairing a slightly wrong offset.

    The returned span excludes leading/trailing whitespace, which many COVID-QA answers carry.
    """
    stripped = text.strip()
    if not stripped:
        return None
    if context[start : start + len(text)] == text:
        s = start + (len(text) - len(text.lstrip()))
    else:
        s = _nearest_occurrence(context, stripped, start)
        if s == -1:
            return None
    return s, s + len(stripped)


def covid_qa(path: str | Path, *, limit: int | None = None) -> list[QARow]:
    """Read COVID-QA (SQuAD format) as open questions over whole articles.

    Each paragraph context (a full article in COVID-QA) becomes one document; each question one row
    whose answer is the first gold answer text (whitespace-stripped) and whose evidence is that
    answer's span. Some offsets in the data are off by a few characters; the answer text is then
    searched for nearest to the given offset. Unanswerable questions are skipped.

    Args:
        path: The SQuAD-format JSON file.
        limit: Keep only the first ``limit`` rows.

    Returns:
        The rows; all gold answer texts are kept in ``metadata["answers"]``.

    Raises:
        QADataError: If the file is not SQuAD-shaped.
    """
    with Path(path).open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise QADataError(f"{path}: expected a SQuAD-format object with a 'data' list")
    rows: list[QARow] = []
    n_context = 0
    repaired = 0
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            n_context += 1
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                logger.warning("COVID-QA: paragraph %d has no context; skipped", n_context)
                continue
            ident = paragraph.get("document_id", article.get("document_id", article.get("title")))
            doc_id = f"covidqa-{ident}" if ident not in (None, "") else f"covidqa-{n_context}"
            for qa in paragraph.get("qas", []):
                if limit is not None and len(rows) >= limit:
                    return rows
                if qa.get("is_impossible") or not qa.get("answers"):
                    continue
                question = (qa.get("question") or "").strip()
                if not question:
                    continue
                answers = [a for a in qa["answers"] if isinstance(a.get("text"), str) and a["text"].strip()]
                if not answers:
                    continue
                first = answers[0]
                given = int(first.get("answer_start", 0))
                span = _answer_span(context, first["text"], given)
                evidence: list[tuple[int, int]] = []
                if span is None:
                    logger.warning("COVID-QA %s: answer text not found in its context", qa.get("id"))
                else:
                    if context[given : given + len(first["text"])] != first["text"]:
                        repaired += 1
                    evidence.append(span)
                rows.append(
                    QARow(
                        row_id=f"covidqa-{qa.get('id', len(rows))}",
                        question=question,
                        document=context,
                        doc_id=doc_id,
                        answer=first["text"].strip(),
                        evidence=evidence,
                        metadata={"source": "covidqa", "answers": [a["text"].strip() for a in answers]},
                    )
                )
    if repaired:
        logger.info("COVID-QA: repaired %d answer offsets", repaired)
    return rows


# --------------------------------------------------------------------------------------------------
# Evidence Inference 2.0
# --------------------------------------------------------------------------------------------------


def _ei_label(raw: str) -> str | None:
    """Map an annotation label to one of the three options (the data has e.g. 'significantly increase')."""
    label = " ".join(raw.strip().lower().split())
    if label.startswith("significantly increase"):
        return "significantly increased"
    if label.startswith("significantly decrease"):
        return "significantly decreased"
    if label.startswith("no significant"):
        return "no significant difference"
    return None  # "invalid prompt" and anything unknown


def _col(row: dict[str, str], *names: str) -> str:
    """First present column among ``names`` (the annotation files differ in header spelling)."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return ""


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes"}


def _clean_phrase(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".")


def _ei_question(outcome: str, intervention: str, comparator: str) -> str:
    return (
        f"Compared with {_clean_phrase(comparator)}, what was the effect of {_clean_phrase(intervention)} "
        f"on {_clean_phrase(outcome)}?"
    )


def _ei_span(text: str, evidence: str, start: int, end: int) -> tuple[int, int] | None:
    """Check an annotated span against its text; search for the text when the offsets are off."""
    ev = evidence.strip()
    if 0 <= start < end <= len(text):
        if not ev or text[start:end].strip() == ev:
            s = start + (len(text[start:end]) - len(text[start:end].lstrip()))
            return s, s + len(text[start:end].strip())
    if not ev:
        return None
    s = _nearest_occurrence(text, ev, max(start, 0))
    if s == -1:
        return None
    return s, s + len(ev)


def evidence_inference(data_dir: str | Path, *, limit: int | None = None) -> list[QARow]:
    """Read Evidence Inference 2.0 prompts as closed three-way questions over full articles.

    One row per prompt whose article ``txt_files/PMC<id>.txt`` exists and that has at least one
    usable annotation. The answer is the majority label over annotations the verifier accepted
    (``Valid Label``), falling back to all annotations when none was accepted; ties go to the label
    given first. Evidence spans are those of annotations with accepted reasoning (all when none),
    checked against the text and searched for when the offsets do not match. Prompts the data set's
    authors flag as incorrect are skipped.

    Args:
        data_dir: Folder with ``prompts_merged.csv``, ``v2_annotations.csv`` (or
            ``annotations_merged.csv``) and ``txt_files/``.
        limit: Keep only the first ``limit`` rows.

    Returns:
        The rows; ``document_path`` points at the article text, ``doc_id`` is ``"PMC<id>"``.

    Raises:
        QADataError: If the prompts or annotations file is missing.
    """
    data_dir = Path(data_dir)
    prompts_file = data_dir / "prompts_merged.csv"
    ann_file = next(
        (data_dir / n for n in ("v2_annotations.csv", "annotations_merged.csv") if (data_dir / n).exists()),
        None,
    )
    if not prompts_file.exists() or ann_file is None:
        raise QADataError(f"{data_dir}: needs prompts_merged.csv and v2_annotations.csv")

    annotations: dict[str, list[dict[str, str]]] = defaultdict(list)
    with ann_file.open(encoding="utf-8-sig", newline="") as fh:
        for ann in csv.DictReader(fh):
            annotations[_col(ann, "PromptID").strip()].append(ann)

    texts: dict[str, str | None] = {}
    rows: list[QARow] = []
    skipped: Counter[str] = Counter()
    with prompts_file.open(encoding="utf-8-sig", newline="") as fh:
        for prompt in csv.DictReader(fh):
            if limit is not None and len(rows) >= limit:
                break
            prompt_id = _col(prompt, "PromptID").strip()
            pmcid = _col(prompt, "PMCID").strip()
            if prompt_id.isdigit() and int(prompt_id) in _EI_FLAGGED_INCORRECT:
                skipped["flagged incorrect"] += 1
                continue
            txt_path = data_dir / "txt_files" / f"PMC{pmcid}.txt"
            if pmcid not in texts:
                texts[pmcid] = txt_path.read_text(encoding="utf-8") if txt_path.exists() else None
            text = texts[pmcid]
            if text is None:
                skipped["no article text"] += 1
                continue
            anns = [a for a in annotations.get(prompt_id, []) if _ei_label(_col(a, "Label")) is not None]
            if not anns:
                skipped["no usable annotation"] += 1
                continue

            accepted = [a for a in anns if _truthy(_col(a, "Valid Label"))] or anns
            labels = [_ei_label(_col(a, "Label")) for a in accepted]
            counts = Counter(labels)
            top = max(counts.values())
            # Ties go to the label given first (in the data the prompt creator's own annotation).
            answer = next(lab for lab in labels if counts[lab] == top)

            reasoned = [a for a in anns if _truthy(_col(a, "Valid Reasoning"))] or anns
            spans: set[tuple[int, int]] = set()
            dropped = 0
            for a in reasoned:
                try:
                    start = int(float(_col(a, "Evidence Start", "Start Evidence") or -1))
                    end = int(float(_col(a, "Evidence End", "End Evidence") or -1))
                except ValueError:
                    start = end = -1
                span = _ei_span(text, _col(a, "Annotations"), start, end)
                if span is None:
                    dropped += 1
                else:
                    spans.add(span)
            if dropped:
                logger.debug(
                    "Evidence Inference prompt %s: %d evidence span(s) not found", prompt_id, dropped
                )

            rows.append(
                QARow(
                    row_id=f"ei-{prompt_id}",
                    question=_ei_question(
                        _col(prompt, "Outcome"), _col(prompt, "Intervention"), _col(prompt, "Comparator")
                    ),
                    document_path=str(txt_path.resolve()),
                    doc_id=f"PMC{pmcid}",
                    options=list(EVIDENCE_INFERENCE_OPTIONS),
                    answer=answer,
                    evidence=sorted(spans),
                    metadata={
                        "source": "evidence-inference",
                        "prompt_id": prompt_id,
                        "pmcid": pmcid,
                        "outcome": _col(prompt, "Outcome").strip(),
                        "intervention": _col(prompt, "Intervention").strip(),
                        "comparator": _col(prompt, "Comparator").strip(),
                        "label_counts": dict(counts),
                        "label_tie": sum(1 for c in counts.values() if c == top) > 1,
                    },
                )
            )
    if skipped:
        logger.info("Evidence Inference: skipped prompts: %s", dict(skipped))
    return rows


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

_PREFIXES = {
    "jsonl": "jsonl",
    "rows": "jsonl",
    "pubmedqa": "pubmedqa",
    "pqa": "pubmedqa",
    "covidqa": "covidqa",
    "covid-qa": "covidqa",
    "evidence-inference": "evidence-inference",
    "evidence_inference": "evidence-inference",
    "ei": "evidence-inference",
}


def _detect_kind(path: Path) -> str:
    """Guess the data-set kind of an unprefixed path from its name and content."""
    if path.is_dir():
        if (path / "prompts_merged.csv").exists():
            return "evidence-inference"
        raise QADataError(f"{path}: folder is not an Evidence Inference data set (no prompts_merged.csv)")
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    try:
        with path.open(encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except json.JSONDecodeError:
        return "jsonl"  # not one JSON value: most likely JSONL under another extension
    if isinstance(data, dict):
        if isinstance(data.get("data"), list):
            return "covidqa"
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "QUESTION" in first and "CONTEXTS" in first:
            return "pubmedqa"
        if "question" in data:
            return "jsonl"  # a one-row JSONL file
    raise QADataError(f"{path}: cannot tell the data-set format; use a prefix such as 'pubmedqa:PATH'")


def load_batch_data(spec: str, *, limit: int | None = None, fuse: int = 8, seed: int = 0) -> list[QARow]:
    """Load batch-QA rows from a spec string.

    Accepted specs: a ``.jsonl`` file of rows; ``"pubmedqa:PATH"``, ``"covidqa:PATH"``,
    ``"evidence-inference:DIR"`` (also ``"jsonl:PATH"``). Without a prefix the format is detected:
    a folder with ``prompts_merged.csv`` is Evidence Inference, a JSON object keyed by PMID is
    PubMedQA, a SQuAD object with ``data`` is COVID-QA, anything else is read as JSONL rows.

    Args:
        spec: The spec string.
        limit: Keep only the first ``limit`` rows.
        fuse: Abstracts per fused PubMedQA document.
        seed: Seed of the PubMedQA distractor choice.

    Returns:
        The rows.

    Raises:
        FileNotFoundError: If the path does not exist.
        QADataError: If the format cannot be told or the data are malformed.
    """
    kind: str | None = None
    target = spec
    head, sep, rest = spec.partition(":")
    if sep and head.strip().lower() in _PREFIXES:
        kind = _PREFIXES[head.strip().lower()]
        target = rest
    path = Path(target).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"batch data not found: {path}")
    if kind is None:
        kind = _detect_kind(path)
    logger.info("loading %s rows from %s", kind, path)
    if kind == "pubmedqa":
        return pubmedqa_fused(path, num_docs=fuse, limit=limit, seed=seed)
    if kind == "covidqa":
        return covid_qa(path, limit=limit)
    if kind == "evidence-inference":
        return evidence_inference(path, limit=limit)
    rows = read_rows(path)
    return rows if limit is None else rows[:limit]
