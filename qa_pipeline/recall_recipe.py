"""``hmtqa train-recall``: train a recall head of a checkpoint on cached features.

``--head segments`` (the segment recall): load the base checkpoint (backbone, LoRA adapter, T,
M_init); switch its recall to "content" (W_q = W_k = identity, centred); read the training documents
and queries through it once (features cached under ``OUT/features``); fit the head with InfoNCE
(``hmt.recall_head``); save ``OUT/final``.

``--head passages`` (the passage head, ``HMTConfig.passage_recall``): keep the base checkpoint whole
(its segment recall too, so memories, closed answers and perplexity do not change); read the
documents through it as ingestion does, pooling passages of ``passage_tokens``; fit a second head,
started from the segment head, to rank each query's gold passages among its document's passages;
save ``OUT/final`` with the base's other files (decision heads, model card).

``--head tokens`` (the late-interaction passage head, ``HMTConfig.token_recall_dim``): keep the base
checkpoint whole as for passages; keep every token's id and last-layer state of the ingestion pass
and every query's summary-pass token states; fit ``hmt.token_recall.TokenRecall``, started at the
cosine of the tokens' input embeddings, to rank each query's gold passages first (MaxSim over tokens,
``hmt.token_recall_head``); save ``OUT/final`` with the base's other files.

Minutes on a CPU once the features are read, since the backbone's passes are done once.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hmt import HMTModel, load_backbone, resolve_dtype
from hmt.recall_head import fit_recall_head, rank_metrics
from hmt.token_recall_head import fit_token_recall, token_rank_metrics

from .recall_data import RecallDoc, RecallFeatures, extract_features, training_docs
from .token_recall_data import TokenFeatures, extract_token_features
from .train_data import data_dir

logger = logging.getLogger(__name__)


@dataclass
class RecallRecipe:
    """Everything ``hmtqa train-recall`` needs; each field is a flag of the same name."""

    base: str = "default"  # checkpoint whose backbone, adapter, T and M_init are kept
    head: str = "segments"  # "segments": the recall head; "passages": a passage head; "tokens": a late-interaction one
    passage_tokens: int = 128  # --head passages/tokens: passage width (the engine's passage_tokens)
    token_dim: int = 128  # --head tokens: width of each token's key
    # --head tokens: the parts fitted. On the few hundred training questions the key maps (w_e, w_h)
    # overfit (a validation fold's hit@1 fell from 0.52 to 0.47); the question-token weights and the
    # scale alone raised it to 0.57. "all" fits every part.
    token_train: str = "w_weight,log_scale"
    # Which training documents to read: any of pubmedqa, covidqa, evidence-inference, plos ("all": every one).
    sources: str = "all"
    backbone: str = "smollm2-135m-instruct"
    data_dir: str | None = None
    out: str = "runs/recall"
    plos_docs: int = 30  # PLOS articles read for inverse-cloze queries
    cloze_per_1k: float = 1.0  # cloze queries per 1,000 characters of each training document
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2  # pull towards the centred identity start
    val_share: float = 0.1  # documents kept out of the fit, to report the fit's own held-out numbers
    dtype: str = "auto"  # of the feature pass (the dtype answers are made in; auto as in EngineConfig)
    seed: int = 0


def content_model(base: HMTModel) -> HMTModel:
    """A model with ``base``'s backbone, T and M_init, and an untrained recall "content" head."""
    model = HMTModel(base.backbone, base.config.replace(recall="content"))
    with torch.no_grad():
        model.summary_prompt.copy_(base.summary_prompt)
        model.memory_init.copy_(base.memory_init)
    return model.to(dtype=base.dtype)


def passage_model(base: HMTModel) -> HMTModel:
    """``base`` with a passage head that starts as a copy of its segment recall head."""
    if base.config.recall != "content":
        raise ValueError("a passage head needs a base checkpoint with recall 'content'")
    model = HMTModel(base.backbone, base.config.replace(passage_recall=True))
    with torch.no_grad():
        state = base.hmt_state_dict()
        for name, param in model.hmt_state_dict().items():
            param.copy_(state[name.replace("passage_recall.", "recall.")])
    return model.to(dtype=base.dtype)


def token_model(base: HMTModel, dim: int) -> HMTModel:
    """``base`` with a late-interaction passage head of ``dim``, started at the cosine of its tokens'
    centred input embeddings; everything else of ``base`` is kept."""
    model = HMTModel(base.backbone, base.config.replace(token_recall_dim=dim))
    with torch.no_grad():
        state = base.hmt_state_dict()
        for name, param in model.hmt_state_dict().items():
            # A base that has a token head already gets a fresh one: the fit always starts at the start.
            if name in state and not name.startswith("token_recall."):
                param.copy_(state[name])
    model.token_recall.init_from_embeddings(model.backbone.get_input_embeddings().weight)
    return model.to(dtype=base.dtype)


SOURCES = ("pubmedqa", "covidqa", "evidence-inference", "plos")


def _sources(recipe: RecallRecipe) -> tuple[str, ...]:
    if recipe.sources == "all":
        return SOURCES
    picked = tuple(s.strip() for s in recipe.sources.split(",") if s.strip())
    unknown = [s for s in picked if s not in SOURCES]
    if unknown or not picked:
        raise ValueError(f"--sources: unknown {unknown or recipe.sources!r}; choose from {', '.join(SOURCES)} or all")
    return picked


def _training_docs(recipe: RecallRecipe) -> list[RecallDoc]:
    prefixes = tuple(("pqa" if s == "pubmedqa" else s) + "-" for s in _sources(recipe))
    docs = training_docs(data_dir(recipe.data_dir), plos_docs=recipe.plos_docs if "plos" in _sources(recipe) else 0,
                         cloze_per_1k=recipe.cloze_per_1k, seed=recipe.seed)
    return [d for d in docs if d.doc_id.startswith(prefixes)]


def _load_base(recipe: RecallRecipe) -> tuple[HMTModel, object, Path | None]:
    backbone, tokenizer = load_backbone(recipe.backbone, dtype="float32")
    if recipe.base.lower() == "none":
        from hmt import HMTConfig

        return HMTModel(backbone, HMTConfig(backbone=recipe.backbone)), tokenizer, None
    from .engine import DEFAULT_CHECKPOINT

    path = DEFAULT_CHECKPOINT if recipe.base == "default" else Path(recipe.base)
    return HMTModel.from_pretrained(path, backbone=backbone), tokenizer, path


def _split(features: RecallFeatures, val_share: float, seed: int) -> tuple[list[int], list[int]]:
    """Query rows of the fit and of its validation, split by document group."""
    groups = sorted(set(features.query_doc.tolist()))
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[: round(len(groups) * val_share)])
    fit = [i for i, g in enumerate(features.query_doc.tolist()) if g not in val_groups]
    val = [i for i, g in enumerate(features.query_doc.tolist()) if g in val_groups]
    return fit, val


def run(recipe: RecallRecipe, *, progress: bool = True) -> dict:
    """Train and save; returns the summary written to ``OUT/final/recall_training.json`` (or
    ``passage_training.json`` for ``--head passages``)."""
    if recipe.head not in ("segments", "passages", "tokens"):
        raise ValueError(f"--head must be 'segments', 'passages' or 'tokens' (got {recipe.head!r})")
    _sources(recipe)  # a wrong --sources fails now, not after the model has loaded
    if recipe.head == "tokens":
        return _run_tokens(recipe, progress=progress)
    passages = recipe.head == "passages"
    began = time.perf_counter()
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out)
    base, tokenizer, base_path = _load_base(recipe)
    if passages and base_path is None:
        raise ValueError("--head passages needs a base checkpoint with a trained recall head (not --base none)")
    model = (passage_model(base) if passages else content_model(base)).to(dtype=resolve_dtype(recipe.dtype)).eval()
    features, extract_s, reused = _features(
        out / "features",
        RecallFeatures,
        lambda docs, bar: extract_features(model, tokenizer, docs, passage_length=recipe.passage_tokens if passages
                                           else None, progress=bar),
        recipe,
        progress,
    )
    fit_rows, val_rows = _split(features, recipe.val_share, recipe.seed)
    all_examples = features.examples(passages=passages)
    fit, val = all_examples.subset(fit_rows), all_examples.subset(val_rows)
    head = (model.passage_recall if passages else model.recall).float()
    # Passages: "before" is the segment head scoring passages, what answers used without this head.
    before = rank_metrics(head, val)
    t0 = time.perf_counter()
    log = fit_recall_head(head, fit, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                          weight_decay=recipe.weight_decay, center=not passages, seed=recipe.seed)
    fit_s = time.perf_counter() - t0
    after = rank_metrics(head, val)
    after_questions = rank_metrics(head, _kind_subset(all_examples, features, val_rows, "question"))
    summary = {
        "recipe": asdict(recipe),
        # The recipe may say "auto"; this is what the feature pass ran in on this machine.
        "feature_dtype": str(model.dtype).removeprefix("torch."),
        "base_checkpoint": str(base_path) if base_path else None,
        "queries": {kind: features.query_kind.count(kind) for kind in sorted(set(features.query_kind))},
        "segments": int(features.contents.shape[0]),
        "groups": len(features.groups),
        "fit_queries": len(fit_rows),
        "val_queries": len(val_rows),
        "val_before": before,
        "val_after": after,
        "val_after_questions": after_questions,
        "log": log,
        "extract_s": extract_s,
        "fit_s": fit_s,
        "total_s": time.perf_counter() - began,
        "features_reused": reused,
    }
    head.to(dtype=model.dtype)
    final = out / "final"
    # A passage head leaves the base's memories unchanged, so its other files still hold.
    _save_checkpoint(model, final, base_path, base_files=passages)
    (final / ("passage_training.json" if passages else "recall_training.json")).write_text(json.dumps(summary, indent=2))
    return summary


def _features(cache: Path, kind, extract, recipe: RecallRecipe, progress: bool):
    """``kind`` features cached at ``cache``, or read now by ``extract(docs, progress_callback)`` and
    cached; returns (features, seconds the reading took, reused)."""
    if kind.exists(cache):
        # The time of the run that read them, so a rerun's summary still says what the features cost.
        timing = cache / "extract.json"
        return kind.load(cache), json.loads(timing.read_text())["extract_s"] if timing.is_file() else None, True
    docs = _training_docs(recipe)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(docs), desc="reading documents", unit="doc")
    t0 = time.perf_counter()
    features = extract(docs, (lambda i, n: bar.update(1)) if bar else None)
    extract_s = time.perf_counter() - t0
    if bar:
        bar.close()
    features.save(cache)
    (cache / "extract.json").write_text(json.dumps({"extract_s": extract_s}))
    return features, extract_s, False


def _save_checkpoint(model: HMTModel, final: Path, base_path: Path | None, *, base_files: bool) -> None:
    """Save ``model`` at ``final`` with the base's LoRA adapter (folded into the backbone at load, so
    copied unchanged) and, with ``base_files``, the base's other files that still hold: decision
    heads and their thresholds, training records, model card."""
    model.save_pretrained(final)
    if base_path is None:
        return
    if (base_path / "adapter").is_dir():
        shutil.copytree(base_path / "adapter", final / "adapter")
        meta = json.loads((final / "config.json").read_text())
        meta["has_adapter"] = True
        (final / "config.json").write_text(json.dumps(meta, indent=2))
    if base_files:
        for f in sorted(base_path.iterdir()):
            if f.is_file() and not (final / f.name).exists():
                shutil.copy2(f, final / f.name)


def _kind_subset(examples, features: RecallFeatures, rows: list[int], kind: str):
    picked = [i for i in rows if features.query_kind[i] == kind]
    return examples.subset(picked)


def _run_tokens(recipe: RecallRecipe, *, progress: bool) -> dict:
    """``--head tokens``: cached token features, a fitted ``TokenRecall``, the base's other files."""
    began = time.perf_counter()
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out)
    base, tokenizer, base_path = _load_base(recipe)
    if base_path is None:
        raise ValueError("--head tokens needs a base checkpoint (not --base none)")
    model = token_model(base, recipe.token_dim).to(dtype=resolve_dtype(recipe.dtype)).eval()
    cache = out / "token_features"
    features, extract_s, reused = _features(
        cache,
        TokenFeatures,
        lambda docs, bar: extract_token_features(model, tokenizer, docs, width=recipe.passage_tokens, progress=bar),
        recipe,
        progress,
    )
    if reused and features.width != recipe.passage_tokens:
        raise ValueError(f"cached token features in {cache} are for passages of {features.width} tokens, "
                         f"not --passage-tokens {recipe.passage_tokens}; give another --out")
    docs, queries = features.examples()
    # Validation by document, as for the pooled heads: the fit never sees a held-out document.
    names = sorted(set(q.doc for q in queries))
    random.Random(recipe.seed).shuffle(names)
    val_docs = set(names[: round(len(names) * recipe.val_share)])
    fit = [q for q in queries if q.doc not in val_docs]
    val = [q for q in queries if q.doc in val_docs]
    _, questions = features.examples(("question",))
    val_questions = [q for q in questions if q.doc in val_docs]
    head = model.token_recall.float()
    embeddings = model.backbone.get_input_embeddings().weight.detach().float()
    width = recipe.passage_tokens
    before = token_rank_metrics(head, embeddings, docs, val, width=width) if val else None
    t0 = time.perf_counter()
    trainable = None if recipe.token_train == "all" else tuple(
        part.strip() for part in recipe.token_train.split(",") if part.strip()
    )
    log = fit_token_recall(head, embeddings, docs, fit, width=width, steps=recipe.steps,
                           batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
                           seed=recipe.seed, trainable=trainable)
    fit_s = time.perf_counter() - t0
    summary = {
        "recipe": asdict(recipe),
        "feature_dtype": str(model.dtype).removeprefix("torch."),
        "base_checkpoint": str(base_path),
        "queries": {kind: features.query_kind.count(kind) for kind in sorted(set(features.query_kind))},
        "documents": len(features.doc_names),
        "tokens": int(features.doc_ids.shape[0]),
        "fit_queries": len(fit),
        "val_queries": len(val),
        # "before": the untrained head (cosine of input embeddings), on the same held-out documents.
        "val_before": before,
        "val_after": token_rank_metrics(head, embeddings, docs, val, width=width) if val else None,
        "val_after_questions": token_rank_metrics(head, embeddings, docs, val_questions, width=width)
        if val_questions
        else None,
        "log": log,
        "extract_s": extract_s,
        "fit_s": fit_s,
        "total_s": time.perf_counter() - began,
        "features_reused": reused,
    }
    head.to(dtype=model.dtype)
    final = out / "final"
    _save_checkpoint(model, final, base_path, base_files=True)  # memories and pooled heads unchanged
    (final / "token_recall_training.json").write_text(json.dumps(summary, indent=2))
    return summary
