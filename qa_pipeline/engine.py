"""The QA engine: one loaded HMT model that ingests documents into a store and answers questions.

Everything user-facing (CLI, batch, web app) goes through :class:`Engine`.

Over 500 lines: the Engine is the pipeline's one entry point (ingest, recall, ask in four modes).
The modes share the prompt, memory and answering code, which must stay the same across them for the
side-by-side comparisons to mean anything; evidence, support and decisions live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hmt import DEFAULT_BACKBONE, HMTConfig, HMTModel, load_backbone, resolve_dtype

from .answer_text import answer_phrase, quoted_answer, short_answer
from .decision import DecisionHeads, below
from .documents import Document
from .metrics import merge_spans
from .prompts import option_text, prompt_frame, question_text, tokenize
from .reader import Reader
from .store import DocumentExists, DocumentInfo, MemoryStore, SegmentInfo, StoreMismatch
from .support import Support, open_confidence, supporting_sentence

logger = logging.getLogger(__name__)

ANSWER_MODES = ("hmt", "hmt+retrieval", "dense-rag", "none")
# The modes whose prompt holds the document's text: a reader (EngineConfig.reader) answers their open
# questions. Mode hmt answers from the memory tokens alone, which only the memory model can read.
READER_MODES = ("hmt+retrieval", "dense-rag", "none")
# The mode the UI and the CLI answer in unless told otherwise: the best HMT mode on the dev sets
# (`hmtqa eval qa`; README "Question answering"): hmt+retrieval has the best PubMedQA macro-F1 and COVID-QA token F1.
DEFAULT_MODE = "hmt+retrieval"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct-hmt"
# The reader that writes open answers for the default memory model (EngineConfig.reader "default"):
# chosen by COVID-QA dev token F1 within the answer-latency budget (README, "Results").
DEFAULT_READER = "qwen2.5-coder-0.5b-instruct"

_DOC_CACHE = 16  # documents' arrays kept in memory (memories and passages count apart)
ProgressFn = Callable[[int, int, float], None]  # (segments done, segments total, tokens/s)


class QAError(ValueError):
    """Bad input to the engine (empty question, too long, unknown mode...)."""


@dataclass
class EngineConfig:
    """How the pipeline loads its model and answers; CLI flags and app settings map onto it."""

    backbone: str = DEFAULT_BACKBONE
    # HMT checkpoint folder; "default" = the committed checkpoint for the default backbone (if any);
    # None = untrained HMT parameters (initialised from ``seed``).
    checkpoint: str | None = "default"
    # "auto": bfloat16 where the CPU or GPU computes it natively, else float32 (bfloat16 is emulated,
    # about 7x slower, on AVX2-only CPUs).
    dtype: str = "auto"
    device: str | None = None
    segment_length: int = 256  # used without a checkpoint (a checkpoint brings its own)
    sensory_length: int = 32
    num_cached: int | None = (
        None  # memories the recall attends over; None: the checkpoint's (300 without one)
    )
    seed: int = 0
    block_segments: int = 16  # segments fed to the model per streaming step while ingesting
    evidence_k: int = 5  # evidence segments returned with an answer
    retrieval_segments: int = 3  # raw segments put into the prompt in mode hmt+retrieval
    # Open questions in mode hmt+retrieval: the prompt's text is the passages of this many tokens that the
    # model's passage ranking scores highest, ``retrieval_segments * segment_length`` tokens in all,
    # instead of whole segments: its late-interaction head over the passage's token keys when it has one
    # (``HMTModel.token_recall``), else a pooled head over the passage's mean state; 128 = the summary
    # pass's j. 0: whole recalled segments (closed questions always, since the decision heads were
    # fitted on that prompt).
    passage_tokens: int = 128
    dense_k: int = 4  # chunks put into the prompt in mode dense-rag
    dense_chunk_chars: int = 800
    dense_model: str = "all-minilm-l6-v2"
    # Mode "none": the backbone reads the document truncated to this many tokens. SmolLM2 allows 8192;
    # the default keeps CPU latency sane.
    full_context_tokens: int = 2048
    max_new_tokens: int = 64
    # Open answers never repeat a run of this many tokens (0: off). A 135M model's greedy answers
    # otherwise loop on one sentence until max_new_tokens; 6 also rules out any repeated 8-token phrase.
    no_repeat_ngram: int = 6
    # Closed questions: rank options by how much the document raises their likelihood (score with the
    # document minus score without it) instead of by likelihood alone. A small model's prior for an
    # option ("yes") otherwise outweighs what the document says.
    calibrate_options: bool = False
    # Closed questions in the HMT modes: decide with the checkpoint's decision head for the option set
    # (qa_pipeline/decision.py) when it has one. False: plain likelihood (for comparisons).
    decision_heads: bool = True
    # Open questions: the short answer is quoted from the document, the part of the supporting
    # sentence (the evidence sentence sharing most words with what the model wrote) that does not
    # restate the question, instead of the model's own words. A 135M model paraphrases and invents
    # ("Gulf of Mexico" for an article on Pescador Island); the sentence it points to is right more
    # often than its wording. The model's sentence is still shown. A reader's answers too: on all 309
    # COVID-QA dev questions its quoted answers score token F1 0.305 against 0.286 for its own phrase
    # (hmt+retrieval; dense-rag 0.290 against 0.275).
    quote_answers: bool = True
    # Open questions in the modes with text in the prompt (READER_MODES): this chat model (an embedded
    # name, hub id or folder) writes the answer from the passages the memory recalled (or dense-rag's
    # chunks, or mode none's window). None: the memory model answers. "default": DEFAULT_READER with the
    # default backbone, else none. The reader never changes recall, the evidence shown or closed
    # answers: those stay the memory model's.
    reader: str | None = "default"


def reader_name(config: EngineConfig) -> str | None:
    """The reader ``config`` selects: "default" is DEFAULT_READER for the default backbone; reading with
    the memory model itself (or "none") is no reader."""
    name = config.reader
    if name == "default":
        name = DEFAULT_READER if config.backbone == DEFAULT_BACKBONE else None
    if not name or name.lower() in ("none", config.backbone.lower()):
        return None
    return name


@dataclass
class Evidence:
    segment: int  # segment index (chunk index in dense-rag; -1 for the truncated window in none)
    char_start: int
    char_end: int
    weight: float  # recall weight (hmt modes) or cosine similarity (dense-rag)
    snippet: str
    passage: bool = False  # a passage of ``segment`` ranked by a passage head, not the whole segment


NOT_IN_DOCUMENT = "The document does not seem to say."


@dataclass
class Answer:
    doc_id: str
    question: str
    mode: str
    answer: str
    options: list[str] | None
    option_scores: dict[str, float] | None
    evidence: list[Evidence]
    recall: list[tuple[int, float]]  # (segment, weight) for every recalled segment, by segment
    timings: dict[str, float]
    # 0-1. Closed: the probability of the chosen option. Open: from the answer's likelihood and how
    # concentrated the recall is (see ``open_confidence``).
    confidence: float | None = None
    # True when confidence (or, open questions, recall_score) fell below the checkpoint's threshold:
    # ``answer`` then says the document does not seem to say (the model's own best answer stays in
    # option_scores / ``best_guess``).
    abstained: bool = False
    abstain_reason: str | None = None  # which threshold turned the answer away, in words
    support: Support | None = None  # the evidence sentence that supports the answer
    # Open questions: the sentence the model wrote; ``answer`` is its short answer, the part that does
    # not restate the question (``answer_text.answer_phrase``), of the supporting sentence when
    # ``quoted``, else of this one.
    sentence: str | None = None
    # Open questions: the short answer (or, abstained, the best guess) is quoted from the supporting
    # sentence of the document (``EngineConfig.quote_answers``), not the model's own words.
    quoted: bool = False
    # How many of ``evidence`` (best first) went into the prompt as text: 0 in mode hmt, the document
    # window in mode none.
    prompt_passages: int = 0
    # The model that wrote an open answer when it is not the memory model (EngineConfig.reader).
    reader: str | None = None
    # Open questions in the HMT modes: how well the document's best passage matches the question, by
    # one of the model's passage heads (its logit, before the softmax over the document's passages):
    # the one the checkpoint's threshold was fitted on (``DecisionHeads.open_recall_signal``; the
    # late-interaction head in the default checkpoint). The softmax share says which passage is best
    # *in this document*; this raw score also says how good the best one is, so it is low when the
    # document is about something else (not when a document on the question's subject lacks the
    # answer: bench.not_in_document). None without passage keys (or token keys, for that head).
    recall_score: float | None = None
    # Open questions: the mean log-likelihood of the tokens the model wrote (as it chose them), the
    # answer-likelihood half of ``confidence``.
    answer_logprob: float | None = None
    query: list[float] | None = field(default=None, repr=False)  # the recall query q, for plots
    # Closed questions: each option's log-likelihood and the state the decision is read from (the
    # decision head's inputs; kept out of the JSON record).
    option_logprobs: list[float] | None = field(default=None, repr=False)
    decision_state: np.ndarray | None = field(default=None, repr=False)

    @property
    def fuller_sentence(self) -> str | None:
        """The sentence the model wrote, when the answer shown is only part of it (else None)."""
        if not self.sentence or self.abstained or self.sentence.rstrip(".") == self.answer:
            return None
        return self.sentence

    @property
    def best_guess(self) -> str | None:
        """When the answer abstained: what the model would have said (its option, or the short answer
        of the sentence it wrote); else None."""
        if not self.abstained:
            return None
        if self.option_scores:
            return max(self.option_scores, key=self.option_scores.get)
        if self.quoted and self.support is not None:
            return quoted_answer(self.support.text, self.question)
        return answer_phrase(self.sentence, self.question) if self.sentence else None

    def to_json(self, with_query: bool = False) -> dict:
        data = asdict(self)
        if not with_query:
            data.pop("query")
        data.pop("option_logprobs")
        data.pop("decision_state")
        return data


@dataclass
class _Response:
    """What answering produced, before evidence and timings are added."""

    answer: str
    option_scores: dict[str, float] | None
    first_token_s: float
    confidence: float | None = None  # closed: probability of the chosen option
    threshold: float | None = None  # the decision head's "not in the document" threshold
    answer_logprob: float | None = None  # open: mean token log-likelihood of the answer
    option_logprobs: list[float] | None = None
    decision_state: np.ndarray | None = None


class Engine:
    """Loads the model once; ingests documents into stores; answers in four modes."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model, self.tokenizer, self.checkpoint_id = self._load_model()
        # Closed questions' decision heads and the "not in the document" thresholds (checkpoint's).
        use = self._checkpoint_path is not None and self.config.decision_heads
        self.decision_heads = DecisionHeads.load(self._checkpoint_path) if use else DecisionHeads()
        self.model.eval()
        cfg = self.config
        # Modes dense-rag and none use the plain backbone: one segment as wide as the window.
        self.plain = HMTModel(
            self.model.backbone,
            HMTConfig(
                segment_length=cfg.full_context_tokens, sensory_length=0, mode="none", backbone=cfg.backbone
            ),
        ).eval()
        self._reader: Reader | None = None  # loaded on first use: ingestion never needs it
        self._reader_lock = threading.Lock()
        self._dense = None
        self._dense_indexes: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._doc_arrays: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._frame: tuple[str, str] | None = None  # the prompt around the user's turn

    @property
    def reader(self) -> Reader | None:
        """The model that writes open answers in READER_MODES (EngineConfig.reader), loaded on first use;
        None when the memory model answers."""
        name = reader_name(self.config)
        if name is None:
            return None
        with self._reader_lock:
            if self._reader is None:
                self._reader = Reader(name, dtype=self.config.dtype, device=self.config.device)
        return self._reader

    # ------------------------------------------------------------------ model
    def _load_model(self) -> tuple[HMTModel, object, str]:
        cfg = self.config
        checkpoint = cfg.checkpoint
        if checkpoint == "default":
            checkpoint = (
                str(DEFAULT_CHECKPOINT)
                if cfg.backbone == DEFAULT_BACKBONE and DEFAULT_CHECKPOINT.is_dir()
                else None
            )
        self._checkpoint_path = Path(checkpoint) if checkpoint else None
        backbone, tokenizer = load_backbone(cfg.backbone, dtype="float32", device=cfg.device)
        if checkpoint:
            model = HMTModel.from_pretrained(checkpoint, backbone=backbone)
            if cfg.num_cached is not None:  # an answer-time setting: the store keeps every segment
                model.config = model.config.replace(num_cached=cfg.num_cached)
            checkpoint_id = _checkpoint_id(Path(checkpoint))
        else:
            # Seeded so that every process builds the same untrained memory parameters.
            rng = torch.random.get_rng_state()
            torch.manual_seed(cfg.seed)
            model = HMTModel(
                backbone,
                HMTConfig(
                    segment_length=cfg.segment_length,
                    sensory_length=cfg.sensory_length,
                    num_cached=cfg.num_cached if cfg.num_cached is not None else 300,
                    backbone=cfg.backbone,
                ),
            )
            torch.random.set_rng_state(rng)
            checkpoint_id = f"untrained-seed{cfg.seed}"
        model.to(dtype=resolve_dtype(cfg.dtype, cfg.device))
        return model, tokenizer, checkpoint_id

    @property
    def fingerprint(self) -> dict:
        """What a store records about the model that wrote it; a different one is refused."""
        m = self.model
        return {
            "backbone": self.config.backbone,
            "hmt_checkpoint": self.checkpoint_id,
            "hidden_size": m.hidden_size,
            "recall_dim": m.recall_dim,
            "segment_length": m.config.segment_length,
            "sensory_length": m.config.sensory_length,
            "dtype": str(m.dtype).replace("torch.", ""),
        }

    @property
    def answer_stamp(self) -> str:
        """A short hash of everything an answer depends on besides its question and document: the
        model (``fingerprint``), its decision heads and thresholds, and the answering settings.
        Batch output files carry it, so answers of another model are never mixed into one's metrics."""
        settings = {k: v for k, v in asdict(self.config).items() if k not in ("checkpoint", "device")}
        settings["dtype"] = self.fingerprint["dtype"]  # as resolved: "auto" and "float32" answer alike
        body = {"model": self.fingerprint, "heads": self.decision_heads.digest(), "settings": settings}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def recall_scale(self) -> float:
        """Recall's logits are this times the inner product of a query and a stored key."""
        with torch.no_grad():
            return float(self.model.recall.scale())

    def open_store(self, path: str | Path, *, create: bool = True) -> MemoryStore:
        """Open (``create``: or make) the store at ``path`` for this model; another model's store is refused."""
        return MemoryStore.open(path, fingerprint=self.fingerprint, create=create)

    def check_store(self, store: MemoryStore) -> None:
        """Refuse a store written by another model (e.g. one opened read-only, without a fingerprint).

        Raises:
            StoreMismatch: the store records a different model fingerprint.
        """
        stored = store.fingerprint
        if stored is None:
            return
        wanted = json.loads(json.dumps(self.fingerprint))
        if stored != wanted:
            diff = "; ".join(
                f"{k}: store has {stored.get(k)!r}, this model {wanted.get(k)!r}"
                for k in sorted(set(stored) | set(wanted))
                if stored.get(k) != wanted.get(k)
            )
            raise StoreMismatch(
                f"memory store at {store.root} was made by a different model ({diff}); its memories "
                "cannot be read by this one. Open it with the model that made it, or use another store."
            )

    # ------------------------------------------------------------------ ingestion
    def ingest(
        self,
        store: MemoryStore,
        document: Document,
        *,
        replace: bool = False,
        progress: ProgressFn | None = None,
    ) -> tuple[DocumentInfo, dict]:
        """Read a document segment by segment through HMT and save its memories in ``store``.

        Returns the stored document's info and timings (seconds, tokens/s). Memory stays bounded:
        the model holds at most N memories; per-segment vectors go to small numpy arrays.
        """
        if not document.text.strip():
            raise QAError(f"document {document.doc_id!r} is empty")
        self.check_store(store)
        if not replace and document.doc_id in store:  # before the (long) read, not after it
            raise DocumentExists(
                f"document {document.doc_id!r} is already in the store; replace it explicitly "
                "(replace=True, or --replace on the command line) or give the document another id"
            )
        start = time.perf_counter()
        token_ids, token_starts = self._tokenize_document(document.text)
        ids = torch.from_numpy(token_ids)[None].to(self.model.device)
        n_tokens = ids.shape[1]
        if n_tokens == 0:
            raise QAError(f"document {document.doc_id!r} has no tokens")
        L = self.model.config.segment_length
        total = math.ceil(n_tokens / L)
        block = self.config.block_segments * L
        summaries, memories, keys, segments, passages, token_keys = [], [], [], [], [], []
        width = self.config.passage_tokens or None
        state = self.model.init_memory(1)
        tokenize_s = time.perf_counter() - start
        with torch.inference_mode():
            for pos in range(0, n_tokens, block):
                records, state = self.model.read_segments(ids[:, pos : pos + block], state, passage_length=width)
                # .copy(): in float32 .float() is a no-op and a numpy view would keep the segment's whole
                # hidden states alive (r.memory is a view of the main pass's output).
                for r in records:
                    summaries.append(r.summary[0].float().cpu().numpy().copy())
                    memories.append(r.memory[0].float().cpu().numpy().copy())
                    keys.append(r.recall_key[0].float().cpu().numpy().copy())
                    segments.append(SegmentInfo(document.doc_id, r.index, r.token_start, r.token_end, 0, 0))
                    if r.passage_contents is not None:
                        passages.append(
                            (self.model.passage_head.keys(r.passage_contents[0]).float().cpu().numpy(), r.passage_tokens[0])
                        )
                    if r.token_keys is not None:
                        token_keys.append(r.token_keys[0].float().cpu().numpy())
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    progress(len(segments), total, min(pos + block, n_tokens) / max(elapsed, 1e-9))
        read_s = time.perf_counter() - start - tokenize_s
        _char_spans(segments, token_starts, len(document.text))
        k = self.model.config.sensory_length
        arrays = {
            "summary": np.stack(summaries),
            "memory": np.stack(memories),
            "recall_key": np.stack(keys),
            "state.sensory_ids": token_ids[-k:] if k else token_ids[:0],
        }
        if passages:
            arrays.update(_passage_arrays(passages, segments, token_starts, width))
        if token_keys:
            # (n, L, dim): one key per token for the late-interaction passage head; a short last
            # segment's rows past its end stay zero (its passage_tokens say how many are real).
            grid = np.zeros((len(token_keys), L, token_keys[0].shape[-1]), dtype=np.float32)
            for i, k in enumerate(token_keys):
                grid[i, : k.shape[0]] = k
            arrays["passage_token_key"] = grid
        metadata = dict(document.metadata)
        metadata["sections"] = [asdict(s) for s in document.sections]
        info = store.add_document(
            document.doc_id,
            title=document.title,
            source=document.source,
            text=document.text,
            metadata=metadata,
            segments=segments,
            arrays=arrays,
            replace=replace,
            n_tokens=n_tokens,
        )
        with self._lock:
            for cache in (self._doc_arrays, self._dense_indexes):
                for key in [key for key in cache if key[:2] == (str(store.root), document.doc_id)]:
                    del cache[key]
        total_s = time.perf_counter() - start
        return info, {
            "tokenize_s": tokenize_s,
            "read_s": read_s,
            "total_s": total_s,
            "tokens": n_tokens,
            "segments": len(segments),
            "tokens_per_s": n_tokens / max(read_s, 1e-9),
        }

    # ------------------------------------------------------------------ tokenizing
    # A fast tokenizer is not safe to share between threads: a call that changes a setting (here
    # ``split_special_tokens``, on for documents and off for prompts) takes a mutable borrow in Rust,
    # so a concurrent call fails with "Already borrowed" or, worse, runs with the other call's
    # setting. Every use of the tokenizer goes through the two methods below, under one lock.
    def _tokenize(self, text: str, *, document: bool = False, offsets: bool = False):
        """:func:`prompts.tokenize` under the engine's tokenizer lock (one tokenizer, many threads)."""
        with self._tokenizer_lock:
            return tokenize(self.tokenizer, text, document=document, offsets=offsets)

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _pieces(text: str, chunk_chars: int):
        """``(start, end)`` pieces of ``text`` of at most ``chunk_chars``, cut just before whitespace
        (where BPE splits anyway), so a million-token document is never tokenized in one call."""
        pos = 0
        while pos < len(text):
            end = min(len(text), pos + chunk_chars)
            if end < len(text):
                half = pos + chunk_chars // 2
                cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end))
                end = cut if cut > pos else end
            yield pos, end
            pos = end

    def _tokenize_document(self, text: str, chunk_chars: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and each token's start character, as compact arrays (no million Python tuples)."""
        ids, starts = [], []
        for pos, end in self._pieces(text, chunk_chars):
            enc = self._tokenize(text[pos:end], document=True, offsets=True)
            ids.append(np.asarray(enc.input_ids, dtype=np.int64))
            starts.append(np.asarray([o[0] for o in enc.offset_mapping], dtype=np.int64) + pos)
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(ids), np.concatenate(starts)

    def count_tokens(self, text: str, *, stop_after: int | None = None, chunk_chars: int = 200_000) -> int:
        """How many tokens ``text`` is as a document (as :meth:`ingest` tokenizes it); with
        ``stop_after``, the count so far as soon as it passes that."""
        n = 0
        for pos, end in self._pieces(text, chunk_chars):
            n += len(self._tokenize(text[pos:end], document=True).input_ids)
            if stop_after is not None and n > stop_after:
                break
        return n

    # ------------------------------------------------------------------ answering
    def _cached(self, key: tuple, load: Callable[[], dict | None]) -> dict | None:
        """A document's arrays from the engine's small LRU cache, loaded on a miss."""
        with self._lock:
            if key not in self._doc_arrays:
                self._doc_arrays[key] = load()
                while len(self._doc_arrays) > _DOC_CACHE:
                    self._doc_arrays.popitem(last=False)
            self._doc_arrays.move_to_end(key)
            return self._doc_arrays[key]

    def _arrays(self, store: MemoryStore, doc_id: str, version: tuple = ()) -> dict:
        # ``version`` changes when the document is replaced (also by another process).
        return self._cached(
            (str(store.root), doc_id, *version),
            lambda: store.arrays(doc_id, ["memory", "recall_key", "state.sensory_ids"]),
        )

    def _recall_ids(self, question: str) -> torch.Tensor:
        """The recall query's tokens: the question text alone, as in training (not the chat prompt
        around it, whose fixed header and suffix made every question's query nearly the same)."""
        return self._encode(question.strip())[:, : self.model.config.summary_length]

    def _encode(self, text: str, *, document: bool = False) -> torch.Tensor:
        ids = self._tokenize(text, document=document).input_ids
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    def _encode_prompt(self, question: str, options: list[str] | None = None, context: str | None = None):
        """The answering prompt's ids: the frame's control tokens parsed, the user's turn (question,
        options, document passages) as text, so a document holding ``<|im_end|>`` cannot end the turn."""
        if self._frame is None:
            self._frame = prompt_frame(self.tokenizer)
        before, after = self._frame
        ids = (
            self._tokenize(before).input_ids
            + self._tokenize(question_text(question, options, context), document=True).input_ids
            + self._tokenize(after).input_ids
        )
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    def _query(self, recall_ids: torch.Tensor, head: torch.nn.Module | None = None) -> np.ndarray:
        """The recall query of a question: its inner products with the stored recall keys rank
        segments exactly as the model's recall does (the logits, up to the recall's scale).
        ``head``: another recall head of the model (the passage head), for its own keys."""
        with torch.inference_mode():
            summary = self.model.summarize(recall_ids)[:, 0]
            return (head or self.model.recall).queries(summary)[0].float().cpu().numpy()

    def query_vector(self, question: str, options: list[str] | None = None) -> np.ndarray:
        """The recall query ``ask`` forms for ``question``: search the store's recall keys with it.

        Raises:
            QAError: empty question, or longer than one segment with its prompt.
        """
        question = (question or "").strip()
        if not question:
            raise QAError("the question is empty")
        ids = self._encode_prompt(question, options)
        if ids.shape[1] > self.model.config.segment_length:
            raise QAError(
                f"the question is {ids.shape[1]} tokens with its prompt; the limit is one segment "
                f"({self.model.config.segment_length} tokens). Shorten it."
            )
        return self._query(self._recall_ids(question))

    def _memory_for(self, store: MemoryStore, doc_id: str, recall_ids: torch.Tensor, version: tuple = ()):
        """Rebuild the document's memory for this question: FAISS top-N recall keys + sensory tokens.

        With N >= the document's segments this is exactly the cache HMT held after reading it; past
        N, FAISS picks the N memories the question scores highest, so recall is not capped at N.
        """
        model = self.model
        arrays = self._arrays(store, doc_id, version)
        n = arrays["memory"].shape[0]
        query = self._query(recall_ids)
        if n > model.config.num_cached:
            hits = store.search(query, index="recall_key", doc_id=doc_id, k=model.config.num_cached)
            chosen = np.sort(np.array([idx for _, idx, _ in hits], dtype=np.int64))
        else:
            chosen = np.arange(n)
        state = model.memory_from_cache(
            torch.from_numpy(arrays["memory"][chosen])[None],
            torch.from_numpy(chosen)[None],
            torch.from_numpy(arrays["recall_key"][chosen])[None],
        )
        sensory = torch.from_numpy(arrays["state.sensory_ids"]).to(model.device)[None]
        if sensory.numel():
            state.sensory_ids, state.sensory_mask = sensory, torch.ones_like(sensory)
        state.segments_seen = n
        _, weights, seg_ids = model.query_recall(recall_ids, state, query_ids=recall_ids)
        recall = sorted(zip(seg_ids[0].tolist(), weights[0].tolist(), strict=True))
        return state, recall, query.tolist()

    def recall(self, store: MemoryStore, doc_id: str, question: str) -> list[tuple[int, float]]:
        """The model's recall for ``question`` over document ``doc_id``: (segment, weight) by segment.

        Exactly the recall ``ask`` uses in modes hmt and hmt+retrieval (its evidence is the top of it).

        Raises:
            QAError: empty question; UnknownDocument: no such document.
        """
        question = (question or "").strip()
        if not question:
            raise QAError("the question is empty")
        self.check_store(store)
        version = (store.get_document(doc_id).version,)
        _, recall, _ = self._memory_for(store, doc_id, self._recall_ids(question), version)
        return recall

    def ask(
        self,
        store: MemoryStore,
        doc_id: str,
        question: str,
        *,
        mode: str = DEFAULT_MODE,
        options: list[str] | None = None,
        max_new_tokens: int | None = None,
        on_token: Callable[[str], None] | None = None,
        record: bool = True,
    ) -> Answer:
        """Answer ``question`` about document ``doc_id``.

        Args:
            mode: "hmt" (memory only), "hmt+retrieval" (memory + raw text of the top recalled
                segments), "dense-rag" (MiniLM top-k chunks, plain backbone), "none" (plain backbone
                on the document truncated to ``full_context_tokens``).
            options: for closed questions; each option is scored by likelihood, the best is the answer.
            on_token: called with the text decoded so far after each generated token (streaming).
            record: save the answer in the store.
        """
        if mode not in ANSWER_MODES:
            raise QAError(f"unknown mode {mode!r}; choose one of {', '.join(ANSWER_MODES)}")
        question = (question or "").strip()
        if not question:
            raise QAError("the question is empty")
        options = [o.strip() for o in options if o and o.strip()] if options else None
        question_ids = self._encode_prompt(question, options)
        L = self.model.config.segment_length
        if question_ids.shape[1] > L:
            raise QAError(
                f"the question is {question_ids.shape[1]} tokens with its prompt; the limit is one segment "
                f"({L} tokens). Shorten it."
            )
        self.check_store(store)
        info = store.get_document(doc_id)  # raises UnknownDocument with the known ids
        start = time.perf_counter()
        text = store.get_text(doc_id)
        version = (info.version,)
        recall, query, state, evidence, in_prompt, context = [], None, None, [], 0, None
        model, prompt_ids, recall_score = self.model, question_ids, None
        recall_ids = self._recall_ids(question)
        if mode in ("hmt", "hmt+retrieval"):
            state, recall, query = self._memory_for(store, doc_id, recall_ids, version)
            evidence = self._segment_evidence(store, doc_id, text, recall, self.config.evidence_k)
            scored = None if options else self._passage_scores(store, doc_id, recall_ids, version)
            if scored is not None:
                recall_score = scored[2]
            if mode == "hmt+retrieval":
                in_prompt = self.config.retrieval_segments
                passages = None if scored is None else self._passage_evidence(text, *scored[:2])
                if passages is not None:
                    evidence, in_prompt = passages
                # The passages the recall chose go in as text, in the answering segment itself (wider
                # than L), so the memory token that answers is recalled by the same query.
                context = self._context(text, evidence[:in_prompt])
                prompt_ids = self._encode_prompt(question, options, context)
        elif mode == "dense-rag":
            model = self.plain
            evidence = self._dense_evidence(store, doc_id, text, question, version)
            in_prompt = self.config.dense_k
            context = self._context(text, evidence[:in_prompt])
            prompt_ids = self._encode_prompt(question, options, context)
        else:
            model = self.plain
            budget = (
                self.config.full_context_tokens
                - question_ids.shape[1]
                - (max_new_tokens or self.config.max_new_tokens)
                - 16
            )
            if budget <= 0:
                raise QAError(
                    f"mode 'none' has no room for the document: full_context_tokens="
                    f"{self.config.full_context_tokens} is used up by the question and the answer; raise it"
                )
            window_end = self._prefix_chars(text, budget)
            evidence, in_prompt = [Evidence(-1, 0, window_end, 1.0, text[:300])], 1
            context = text[:window_end]
            prompt_ids = self._encode_prompt(question, options, context)
        recall_s = time.perf_counter() - start
        reader = self.reader if not options and mode in READER_MODES else None
        if reader is not None:
            read = reader.answer(
                question,
                context,
                max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                no_repeat_ngram=self.config.no_repeat_ngram,
                start=start,
                on_token=on_token,
            )
            response = _Response(read.answer, None, read.first_token_s, answer_logprob=read.answer_logprob)
        else:
            response = self._respond(
                model,
                prompt_ids,
                question_ids,
                state,
                options,
                max_new_tokens,
                on_token,
                start,
                recall_ids if model is self.model else None,
            )
        confidence = response.confidence
        if confidence is None:
            confidence = open_confidence(response.answer_logprob, recall)
        # Thresholds were fitted on the HMT answering pass; the plain-backbone modes never abstain. A
        # reader's answers keep the recall-score threshold (the memory's), not the confidence one, which
        # was fitted on the memory model's own answers.
        why = None
        if model is self.model:
            if options and response.threshold and confidence is not None and confidence < response.threshold:
                why = below("confidence", confidence, response.threshold)
            elif not options:
                why = self.decision_heads.open_abstains(None if reader else confidence, recall_score, mode)
        abstained = why is not None
        sentence = None if options else response.answer
        phrase = response.answer if options else answer_phrase(response.answer, question)
        support = supporting_sentence(text, evidence, response.answer, question)
        quote = quoted_answer(support.text, question) if support and not options and self.config.quote_answers else ""
        phrase = quote or phrase
        total_s = time.perf_counter() - start
        result = Answer(
            doc_id=info.doc_id,
            question=question,
            mode=mode,
            answer=NOT_IN_DOCUMENT if abstained else phrase,
            options=options,
            option_scores=response.option_scores,
            evidence=evidence,
            recall=recall,
            timings={"recall_s": recall_s, "first_token_s": response.first_token_s, "total_s": total_s},
            confidence=confidence,
            abstained=abstained,
            abstain_reason=why,
            support=support,
            sentence=sentence,
            quoted=bool(quote),
            prompt_passages=in_prompt,
            reader=reader.name if reader is not None else None,
            recall_score=recall_score,
            answer_logprob=response.answer_logprob,
            query=query,
            option_logprobs=response.option_logprobs,
            decision_state=response.decision_state,
        )
        if record and store.writable:
            store.add_answer(doc_id, question, mode, result.to_json())
        return result

    def _respond(
        self, model, prompt_ids, question_ids, state, options, max_new_tokens, on_token, start, recall_ids
    ):
        """Score the options (closed question) or generate (open question).

        ``question_ids`` is the question's prompt without any document: the baseline of calibrated scores.
        ``recall_ids`` (HMT modes) make the recall query; the whole prompt is one answering segment.
        """
        memory_kw = {"query_ids": recall_ids, "whole_prompt": True} if recall_ids is not None else {}
        with torch.inference_mode():
            if options:
                return self._decide(model, prompt_ids, question_ids, state, options, start, memory_kw)
            first, new, logprobs, kept, answer = None, [], [], 0, ""
            for step in model.iter_generate(
                prompt_ids,
                max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                memory_state=state,
                eos_token_id=self.tokenizer.eos_token_id,
                no_repeat_ngram_size=self.config.no_repeat_ngram,
                token_logprobs=logprobs,
                **memory_kw,
            ):
                first = first if first is not None else time.perf_counter() - start
                if int(step[0]) == self.tokenizer.eos_token_id:
                    break
                new.append(int(step[0]))
                text = self.decode(new)
                answer = short_answer(text)
                if on_token is not None:
                    on_token(answer)
                if answer != text.strip():
                    break  # the short answer ended: its first sentence, or its paragraph
                kept = len(new)  # tokens that are all answer so far
            # The answer's mean token log-likelihood, as the decoder chose it: over the answer's own
            # tokens, not the end token nor the token that began the next sentence.
            answer_logprob = float(torch.cat(logprobs[:kept]).mean()) if kept and logprobs else None
            return _Response(answer, None, first or 0.0, answer_logprob=answer_logprob)

    def _decide(self, model, prompt_ids, question_ids, state, options, start, memory_kw) -> _Response:
        """A closed question's answer: the decision head's choice where the checkpoint has one for
        these options, else the option with the highest (optionally calibrated) likelihood."""
        option_ids = [self._encode(option_text(o, self.tokenizer), document=True)[0] for o in options]
        totals, _, hidden = model.score_options(
            prompt_ids, option_ids, state, return_hidden=True, **memory_kw
        )
        logprobs, hidden = totals.numpy(), hidden.reshape(-1).numpy()  # [last state, mean state]
        # The head is fitted on the HMT model's answering pass; the plain backbone keeps likelihood.
        decided = self.decision_heads.decide(options, logprobs, hidden) if model is self.model else None
        threshold = None
        if decided is not None:
            probs, threshold = decided
            scores = {o: float(np.log(max(p, 1e-300))) for o, p in zip(options, probs, strict=True)}
        else:
            if self.config.calibrate_options:
                # The same model, the question alone: no memory, no document in the prompt.
                prior, _ = model.score_options(question_ids, option_ids, None)
                totals = totals - prior
            scores = {o: float(s) for o, s in zip(options, totals.tolist(), strict=True)}
            probs = np.exp(totals.numpy() - totals.numpy().max())
            probs = probs / probs.sum()
        best = max(scores, key=scores.get)
        return _Response(
            best,
            scores,
            time.perf_counter() - start,
            confidence=float(probs.max()),
            threshold=threshold,
            option_logprobs=logprobs.tolist(),
            decision_state=hidden,
        )

    def _segment_evidence(
        self, store: MemoryStore, doc_id: str, text: str, recall: list[tuple[int, float]], k: int
    ) -> list[Evidence]:
        segments = {s.idx: s for s in store.segments(doc_id)}
        top = sorted(recall, key=lambda r: -r[1])[:k]
        out = []
        for idx, weight in top:
            s = segments[idx]
            out.append(Evidence(idx, s.char_start, s.char_end, weight, text[s.char_start : s.char_end][:400]))
        return out

    def _passage_scores(
        self,
        store: MemoryStore,
        doc_id: str,
        recall_ids: torch.Tensor,
        version: tuple = (),
        signal: str | None = None,
    ) -> tuple[dict, np.ndarray, float | None] | None:
        """The document's passage arrays, the logits that rank its passages for the question (one per
        real passage, ``arrays["passage_tokens"] > 0``, flattened, in order) and the recall score;
        None when the document has no passage keys (ingested with ``passage_tokens=0``, or by an
        older version) or passages are off.

        The ranking is the model's late-interaction head (``HMTModel.token_recall``) when it has one
        and the document holds token keys, else its pooled passage head (``HMTModel.passage_head``:
        the checkpoint's own, or the segment recall head). The recall score is the best logit of the
        head named by ``signal`` (default: the one the checkpoint's "not in the document" threshold
        was fitted on, ``DecisionHeads.open_recall_signal``): how well the best passage matches. It
        is None when that head cannot score this document (no token keys), since a threshold fitted
        on one head's logits says nothing of another's."""
        if not self.config.passage_tokens:
            return None
        arrays = self._passage_arrays(store, doc_id, version)
        if arrays is None:
            return None
        real = arrays["passage_tokens"].reshape(-1) > 0
        token_logits = None
        if self.model.token_recall is not None and "passage_token_key" in arrays:
            token_logits = self._token_logits(arrays, recall_ids)[real]
        signal = signal or self.decision_heads.open_recall_signal
        pooled = None
        # The pooled head's logits cost a summary pass of their own: only when they rank or score.
        if token_logits is None or signal == "passage":
            head = self.model.passage_head
            query = self._query(recall_ids, head)
            with torch.no_grad():
                scale = float(head.scale())
            keys = arrays["passage_key"].reshape(-1, arrays["passage_key"].shape[-1])[real]
            pooled = (keys @ query) * scale
        logits = pooled if token_logits is None else token_logits
        if signal == "tokens":
            score = None if token_logits is None else float(token_logits.max())
        else:
            score = float(pooled.max())
        return arrays, logits, score

    def _token_logits(self, arrays: dict, recall_ids: torch.Tensor) -> np.ndarray:
        """Late-interaction logits of every passage slot (n * P, flattened; empty slots -inf)."""
        head = self.model.token_recall
        counts = torch.from_numpy(arrays["passage_tokens"])  # (n, P)
        n, per_segment = counts.shape
        token_keys = torch.from_numpy(arrays["passage_token_key"])  # (n, L, dim)
        width = token_keys.shape[1] // per_segment
        device = self.model.device
        grid = token_keys.view(n * per_segment, width, -1).to(device)
        mask = (torch.arange(width)[None] < counts.reshape(-1, 1)).to(device)
        with torch.inference_mode():
            hidden = self.model.query_token_states(recall_ids)[0]
            queries, weights = head.queries(self.model._embed(recall_ids[:, : hidden.shape[0]])[0], hidden)
            return head.scores(queries, weights, grid, mask).float().cpu().numpy()

    @property
    def recall_signal(self) -> str:
        """The head whose best logit says best how well a document matches a question: the one that
        ranks passages (``_passage_scores``). A recall-score threshold is fitted on it."""
        return "tokens" if self.model.token_recall is not None else "passage"

    def recall_score(
        self, store: MemoryStore, doc_id: str, question: str, signal: str | None = None
    ) -> float | None:
        """``Answer.recall_score`` of an open question, without answering it (fitting its threshold):
        the best logit of the ``signal`` head (default: the checkpoint's threshold's)."""
        self.check_store(store)
        info = store.get_document(doc_id)
        scored = self._passage_scores(
            store, doc_id, self._recall_ids(question.strip()), (info.version,), signal
        )
        return None if scored is None else scored[2]

    def _passage_evidence(self, text: str, arrays: dict, logits: np.ndarray) -> tuple[list[Evidence], int]:
        """Passages ranked by their ``_passage_scores`` logits, best first, and how many fill the
        prompt's budget (``retrieval_segments * segment_length`` tokens).

        A passage's weight is its share of the head's softmax over all the document's passages: the
        weight recall would give it if passages were the memories.
        """
        tokens = arrays["passage_tokens"].reshape(-1)
        real = np.flatnonzero(tokens > 0)
        weights = np.zeros(tokens.shape, dtype=np.float64)
        weights[real] = np.exp(logits - logits.max())
        weights /= weights.sum()
        per_segment = arrays["passage_tokens"].shape[1]
        spans = arrays["passage_chars"].reshape(-1, 2)
        budget = self.config.retrieval_segments * self.model.config.segment_length
        order = real[np.argsort(-logits, kind="stable")]
        # The best passages while their tokens fit the budget (at least one).
        in_prompt = max(1, int((np.cumsum(tokens[order]) <= budget).sum()))
        evidence = []
        for flat in order[: max(in_prompt, self.config.evidence_k)].tolist():
            start, end = (int(c) for c in spans[flat])
            snippet = text[start:end][:400]
            evidence.append(Evidence(flat // per_segment, start, end, float(weights[flat]), snippet, passage=True))
        return evidence, in_prompt

    def _passage_arrays(self, store: MemoryStore, doc_id: str, version: tuple = ()) -> dict | None:
        def load() -> dict | None:
            try:
                arrays = store.arrays(doc_id, ["passage_key", "passage_tokens", "passage_chars"])
            except KeyError:  # stored without passage keys
                return None
            try:
                arrays.update(store.arrays(doc_id, ["passage_token_key"]))
            except KeyError:  # stored by a model without a late-interaction head
                pass
            return arrays

        return self._cached((str(store.root), doc_id, *version, "passages"), load)

    def _dense_evidence(
        self, store: MemoryStore, doc_id: str, text: str, question: str, version: tuple = ()
    ) -> list[Evidence]:
        from .dense import DenseEmbedder, DenseIndex, chunk_text

        key = (str(store.root), doc_id, *version)
        with self._lock:
            if self._dense is None:
                self._dense = DenseEmbedder(self.config.dense_model)
            embedder = self._dense
            index = self._dense_indexes.get(key)
            if index is not None:
                self._dense_indexes.move_to_end(key)
        if index is None:
            # Embedding a long document takes seconds: done outside the engine-wide lock, so other
            # questions do not wait for it (two first questions on one document may both build it).
            spans = chunk_text(text, max_chars=self.config.dense_chunk_chars)
            index = DenseIndex(embedder)
            # Identifiers (chunk index, start, end): evidence names the chunk, not its rank.
            index.add([(i, s, e) for i, (s, e) in enumerate(spans)], [text[s:e] for s, e in spans])
            with self._lock:
                self._dense_indexes[key] = index
                while len(self._dense_indexes) > 16:
                    self._dense_indexes.popitem(last=False)
        hits = index.search(question, k=max(self.config.dense_k, self.config.evidence_k))
        return [Evidence(int(i), int(s), int(e), float(score), text[s:e][:400]) for (i, s, e), score in hits]

    @staticmethod
    def prompt_spans(evidence: list[Evidence]) -> list[tuple[int, int]]:
        """The character spans of the document that the prompt holds as text for ``evidence`` (the
        items put in the prompt), in document order. Passages that touch are one piece of text (a
        passage ends after a fixed count of tokens, often mid-sentence); whole segments and dense
        chunks stay apart, as the decision heads were fitted on that prompt."""
        spans = [(e.char_start, e.char_end) for e in evidence]
        return merge_spans(spans) if evidence and all(e.passage for e in evidence) else sorted(spans)

    @classmethod
    def _context(cls, text: str, evidence: list[Evidence]) -> str:
        """Raw text of the evidence passages, pieces apart by "..." (``prompt_spans``)."""
        return "\n...\n".join(text[start:end].strip() for start, end in cls.prompt_spans(evidence))

    def _prefix_chars(self, text: str, max_tokens: int) -> int:
        """Characters of ``text`` that fit in ``max_tokens`` tokens."""
        enc = self._tokenize(text[: max_tokens * 12], offsets=True)
        if len(enc.input_ids) <= max_tokens:
            return min(len(text), max_tokens * 12) if len(enc.input_ids) else 0
        return enc.offset_mapping[max_tokens - 1][1] if max_tokens else 0


def _char_spans(segments: list[SegmentInfo], token_starts: np.ndarray, n_chars: int) -> None:
    """Give segments contiguous character spans that cover the text: ``[0, b1), [b1, b2), ... [bn, end)``.

    A boundary is where the segment's first token starts. Byte-level BPE splits a multi-byte
    character over several tokens with the same offsets, so token offsets alone would make
    neighbouring segments overlap (or leave the spaces between them out).
    """
    bound = 0
    for i, seg in enumerate(segments):
        seg.char_start = bound
        if i + 1 < len(segments):
            nxt = int(token_starts[segments[i + 1].token_start])
            bound = min(max(bound, nxt), n_chars)
        else:
            bound = n_chars
        seg.char_end = bound


def _passage_arrays(
    passages: list[tuple[np.ndarray, torch.Tensor]], segments: list[SegmentInfo], token_starts: np.ndarray, width: int
) -> dict[str, np.ndarray]:
    """Per-segment passage arrays for the store: recall keys (n, P, d_h), real tokens (n, P) and
    character spans (n, P, 2), P = passages in a full segment; a short last segment's extra rows are
    zero with 0 tokens. Spans tile each segment's span, with boundaries where a passage's first token starts."""
    runs = max(k.shape[0] for k, _ in passages)
    keys = np.zeros((len(passages), runs, passages[0][0].shape[1]), dtype=np.float32)
    tokens = np.zeros((len(passages), runs), dtype=np.int64)
    chars = np.zeros((len(passages), runs, 2), dtype=np.int64)
    for i, ((key, count), seg) in enumerate(zip(passages, segments, strict=True)):
        n = int((count > 0).sum())
        keys[i, :n], tokens[i, :n] = key[:n], count[:n].cpu().numpy()
        starts = [seg.char_start] + [int(token_starts[seg.token_start + j * width]) for j in range(1, n)]
        chars[i, :n, 0] = starts
        chars[i, :n, 1] = starts[1:] + [seg.char_end]
    return {"passage_key": keys, "passage_tokens": tokens, "passage_chars": chars}


def _checkpoint_id(path: Path) -> str:
    """Content hash of what a checkpoint changes: HMT parameters, its HMTConfig (summary fraction,
    recall kind... change the memories it writes), LoRA adapter, fine-tuned backbone."""
    digest = hashlib.sha256((path / "hmt.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text()).get("hmt_config", {})
    digest.update(json.dumps(config, sort_keys=True).encode())
    for sub in ("adapter", "backbone"):
        folder = path / sub
        if folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    digest.update(f.relative_to(path).as_posix().encode())
                    digest.update(f.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"
