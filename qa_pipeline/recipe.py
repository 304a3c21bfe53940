"""The training recipe behind ``hmtqa train``: stage 1 then stage 2 on the shared data."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hmt import HMTConfig, HMTModel, load_backbone
from hmt.training import TrainConfig, close_distributed, init_distributed, train

from .train_data import data_dir, lm_samples, pubmedqa_split, qa_samples, text_splits

logger = logging.getLogger(__name__)


@dataclass
class Recipe:
    """Everything ``hmtqa train`` needs; each field is a flag of the same name."""

    backbone: str = "smollm2-135m-instruct"
    data_dir: str | None = None
    out: str = "runs/default"
    segment_length: int = 256
    sensory_length: int = 32
    num_cached: int = 300
    stage1_steps: int = 100
    stage2_steps: int = 200
    stage2_depth: int = 6  # segments per language-model sample in stage 2
    fuse: int = 3  # abstracts per fused PubMedQA training document
    qa_repeats: int = 1  # fused versions of each training question, each with other distractors and order
    qa_share: float = 0.5  # share of stage-2 samples that are PubMedQA questions
    max_lm_samples: int | None = None
    max_qa_samples: int | None = None
    lr: float = 3e-4
    lr_decay: float = 0.7
    lr_decay_every: int = 100
    grad_accum: int = 2
    batch_size: int = 1  # samples per forward; raise it on a GPU
    trainable: str = "lora"
    bf16: bool = True
    recall_loss_weight: float = 0.5
    seed: int = 0
    save_every: int = 20  # checkpoint every so many steps; a rerun resumes from it
    device: str = "auto"  # "auto": the first GPU when there is one, else the CPU
    max_minutes: float | None = None  # time budget for both stages; stage 2 stops early when it is spent

    def __post_init__(self) -> None:
        if self.qa_repeats < 1:
            raise ValueError(f"qa_repeats must be >= 1 (got {self.qa_repeats})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (got {self.max_minutes})")


def run(recipe: Recipe, *, progress: bool = True) -> dict:
    """Train stage 1, then stage 2; save ``out/stage1`` and ``out/final``; return a summary."""
    rank, _ = init_distributed()
    root = data_dir(recipe.data_dir)
    backbone, tokenizer = load_backbone(recipe.backbone, dtype="float32", device=_device(recipe.device, rank))
    config = HMTConfig(
        segment_length=recipe.segment_length,
        sensory_length=recipe.sensory_length,
        num_cached=recipe.num_cached,
        backbone=recipe.backbone,
    )
    model = HMTModel(backbone, config)
    out = Path(recipe.out)
    L = recipe.segment_length
    splits = text_splits(root)
    train_texts = [s.train for s in splits]
    began = time.perf_counter()

    stage1_data = lm_samples(train_texts, tokenizer, segment_length=L, depth=2, max_samples=recipe.max_lm_samples)
    common = dict(
        lr=recipe.lr,
        lr_decay=recipe.lr_decay,
        lr_decay_every=recipe.lr_decay_every,
        grad_accum=recipe.grad_accum,
        batch_size=recipe.batch_size,
        trainable=recipe.trainable,
        bf16=recipe.bf16,
        seed=recipe.seed,
        save_every=recipe.save_every,
    )
    s1 = TrainConfig(
        stage=1,
        steps=recipe.stage1_steps,
        out_dir=str(out / "stage1-run"),
        max_minutes=_minutes_left(recipe.max_minutes, began),
        **common,
    )
    summary1 = train(model, stage1_data, s1, progress=progress)
    if rank == 0:
        model.save_pretrained(out / "stage1")

    qa_rows = []
    for repeat in range(recipe.qa_repeats):
        # Seeds far apart so no two repeats share a question's distractor draw.
        rows, _ = pubmedqa_split(root, num_docs=recipe.fuse, seed=recipe.seed + 100_000 * repeat)
        qa_rows += rows[: recipe.max_qa_samples] if recipe.max_qa_samples is not None else rows
    qa = qa_samples(qa_rows, tokenizer, segment_length=L)
    lm = lm_samples(train_texts, tokenizer, segment_length=L, depth=recipe.stage2_depth, max_samples=recipe.max_lm_samples)
    stage2_data = _mix(qa, lm, recipe.qa_share, recipe.seed)
    s2 = TrainConfig(
        stage=2,
        steps=recipe.stage2_steps,
        out_dir=str(out / "stage2-run"),
        recall_loss_weight=recipe.recall_loss_weight,
        max_minutes=_minutes_left(recipe.max_minutes, began),
        **common,
    )
    summary2 = train(model, stage2_data, s2, progress=progress)
    result = {
        "recipe": asdict(recipe),
        "stage1": summary1,
        "stage2": summary2,
        "wall_s": time.perf_counter() - began,
        "stage1_samples": len(stage1_data),
        "stage2_samples": {"qa": len(qa), "lm": len(lm)},
    }
    if rank == 0:
        model.save_pretrained(out / "final")
        (out / "final" / "training.json").write_text(json.dumps(result, indent=2))
    close_distributed()
    return result


def _device(name: str, rank: int) -> str:
    """"auto": this rank's GPU when there is one, else the CPU; anything else as given."""
    if name != "auto":
        return name
    return f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _minutes_left(budget: float | None, began: float) -> float | None:
    if budget is None:
        return None
    # A stage always gets at least a moment, so it saves a checkpoint even when the budget is spent.
    return max(budget - (time.perf_counter() - began) / 60, 1e-3)


def _mix(qa: list[dict], lm: list[dict], qa_share: float, seed: int) -> list[dict]:
    """Interleave QA and LM samples so every stretch of steps sees both kinds."""
    if not qa or not lm:
        return qa or lm
    n_qa = len(qa)
    n_lm = max(1, round(n_qa * (1 - qa_share) / max(qa_share, 1e-6)))
    rng = random.Random(seed)
    lm_pick = [lm[i % len(lm)] for i in range(n_lm)]
    mixed = qa + lm_pick
    rng.shuffle(mixed)
    return mixed
