"""Training samples for HMT: long-text language modelling and fused PubMedQA (paper appendix I).

Both produce the sample dicts ``hmt.training.train`` takes. The held-out parts used by
``hmtqa eval`` are cut here too, so training and evaluation can never overlap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .datasets import pubmedqa_fused
from .metrics import spans_overlap
from .prompts import answer_text, question_prompt
from .qa_data import QARow

logger = logging.getLogger(__name__)

# Share of each text kept for training; the rest is held out for perplexity evaluation.
TRAIN_FRACTION = 0.7
# PubMedQA PQA-L train/dev has 500 questions in file order: the first 400 train, the last 100 are held out.
PUBMEDQA_TRAIN = 400

WIKITEXT = "wikitext-2-raw/wiki.test.raw"
PG19 = "pg19/pg1342_pride_and_prejudice.txt"
PUBMEDQA = "pubmedqa/pqal_trainval.json"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data folder: the argument, else $HMTQA_DATA_DIR, else ../shared/data beside the repo."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get("HMTQA_DATA_DIR"):
        path = Path(os.environ["HMTQA_DATA_DIR"])
    else:
        path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} not found; pass --data-dir or set HMTQA_DATA_DIR")
    return path


@dataclass
class TextSplit:
    name: str
    train: str
    heldout: str


def text_splits(root: Path) -> list[TextSplit]:
    """WikiText-2 (test split) and the PG-19 book, each cut at TRAIN_FRACTION on a line boundary."""
    out = []
    for name, rel in (("wikitext-2", WIKITEXT), ("pg19", PG19)):
        text = (root / rel).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * TRAIN_FRACTION)) + 1
        out.append(TextSplit(name, text[:cut], text[cut:]))
    return out


def lm_samples(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    segment_length: int,
    depth: int,
    max_samples: int | None = None,
) -> list[dict]:
    """Cut texts into samples of ``depth`` segments (depth x L tokens), loss on every token."""
    size = depth * segment_length
    samples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for start in range(0, len(ids) - size + 1, size):
            chunk = ids[start : start + size]
            samples.append({"input_ids": chunk, "labels": list(chunk)})
    if max_samples is not None:
        samples = samples[:max_samples]
    return samples


def evidence_segments(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], segment_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the indices of the segments that overlap any character span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc.input_ids, segments_overlapping(enc.offset_mapping, spans, segment_length)


def segments_overlapping(
    offsets: list[tuple[int, int]], spans: list[tuple[int, int]], segment_length: int
) -> list[int]:
    """Indices of the segments (``segment_length`` tokens each) with a token inside any character span."""
    hits = {i // segment_length for i, token in enumerate(offsets) if any(spans_overlap(token, g) for g in spans)}
    return sorted(hits)


def qa_samples(
    rows: list[QARow], tokenizer: PreTrainedTokenizerBase, *, segment_length: int, explain: bool = True
) -> list[dict]:
    """Document read through memory, then the question prompt; loss on the answer tokens only.

    The answer is the decision (e.g. "yes") followed by the long answer, in the prompt format that
    closed-question scoring uses at answer time.
    """
    samples = []
    for row in rows:
        doc_ids, evidence = evidence_segments(tokenizer, row.load_document(), row.evidence, segment_length)
        prompt = tokenizer(question_prompt(tokenizer, row.question, row.options), add_special_tokens=False).input_ids
        explanation = row.metadata.get("long_answer") if explain else None
        target = tokenizer(answer_text(row.answer, tokenizer, explanation), add_special_tokens=False).input_ids
        samples.append(
            {
                "context_ids": doc_ids,
                "input_ids": prompt + target,
                "labels": [-100] * len(prompt) + target,
                "query_length": len(prompt),
                # The recall query: the question text alone (Engine._recall_ids makes the same one).
                "query_ids": tokenizer(row.question.strip(), add_special_tokens=False).input_ids[:segment_length],
                "evidence_segments": evidence,
                "row_id": row.row_id,
            }
        )
    return samples


def pubmedqa_split(root: Path, *, num_docs: int, seed: int = 0) -> tuple[list[QARow], list[QARow]]:
    """Fused PubMedQA rows: (train, held-out) by question, never mixing the two."""
    rows = pubmedqa_fused(root / PUBMEDQA, num_docs=num_docs, seed=seed)
    return rows[:PUBMEDQA_TRAIN], rows[PUBMEDQA_TRAIN:]
