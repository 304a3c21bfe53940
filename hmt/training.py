"""Multi-stage BPTT training of an HMTModel (paper appendix F; spec section 3).

Stage 1: memory token carried forward with sensory memory, no recall, 2 segments per sample.
Stage 2: with recall, BPTT over as many segments as a sample has.

A sample is a dict of token id lists:
    ``context_ids``  read first (through memory, gradients flow back through it), may be empty;
    ``input_ids``    the segment(s) that carry the loss, read after the context;
    ``labels``       aligned with ``input_ids``; -100 where no loss;
    ``evidence_segments`` (optional) indices of context segments that hold the answer; with
        ``recall_loss_weight`` > 0 the recall weights of the first ``input_ids`` segment are pulled
        towards them (the official code's post-paper retrieval loss).
    ``query_length`` (optional) how many leading ``input_ids`` tokens are the question: the recall
        query of the first segment is made from them alone, as it is at answer time, so the answer
        that follows cannot leak into what is recalled.
Runs data-parallel under torchrun: each rank reads its own share of the samples and gradients
are averaged across ranks before every optimizer step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .model import HMTModel

logger = logging.getLogger(__name__)

TRAINABLE = ("hmt", "lora", "all")


@dataclass
class TrainConfig:
    """How to train; every field has a CLI flag of the same name in ``hmtqa train``."""

    stage: int = 2  # 1: no recall, 2 segments; 2: with recall, full depth
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    lr_decay: float = 0.7  # StepLR gamma, applied every ``lr_decay_every`` steps (paper: 0.7-0.9 / 100)
    lr_decay_every: int = 100
    weight_decay: float = 0.0
    grad_accum: int = 2  # batches per optimizer step (the paper: batch size 2)
    batch_size: int = 1  # samples read side by side per forward (right-padded; fills a GPU)
    max_grad_norm: float = 1.0
    trainable: str = "hmt"  # "hmt": HMT parameters only; "lora": LoRA adapters + HMT; "all": everything
    lora_r: int = 8
    bf16: bool = False  # bf16 autocast for the backbone passes
    recall_loss_weight: float = 0.0
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    out_dir: str = "runs/hmt"
    resume: bool = True
    max_minutes: float | None = None  # stop (and save) after this much training time, even before ``steps``

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"TrainConfig.stage must be 1 or 2 (got {self.stage!r})")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"TrainConfig.trainable must be one of {TRAINABLE} (got {self.trainable!r})")
        if self.steps < 1 or self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("TrainConfig.steps, grad_accum and batch_size must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 (got {self.max_minutes!r})")


def prepare_model(model: HMTModel, cfg: TrainConfig) -> HMTModel:
    """Set the stage's mode and choose what trains (wrapping the backbone with LoRA if asked)."""
    model.config = model.config.replace(mode="hmt", use_recall=cfg.stage == 2)
    if cfg.trainable == "lora" and not hasattr(model.backbone, "peft_config"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        names = {n.rsplit(".", 1)[-1] for n, _ in model.backbone.named_modules()}
        if not set(targets) & names:  # GPT-2 style attention
            targets = ["c_attn", "c_proj"]
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=4 * cfg.lora_r, lora_dropout=0.0, target_modules=targets)
        from .backbone import quiet_peft

        with quiet_peft():
            model.backbone = get_peft_model(model.backbone, lora)
    for p in model.backbone.parameters():
        p.requires_grad_(cfg.trainable == "all")
    if cfg.trainable == "lora":
        for n, p in model.backbone.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    for p in model.hmt_parameters():
        p.requires_grad_(True)
    if cfg.stage == 1:
        # No recall in stage 1: the recall parameters and T get no gradient, so they do not train.
        for p in (model.summary_prompt, *model.recall.parameter_dict().values()):
            p.requires_grad_(False)
    return model


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return _dist_info()


def _pad(rows: list[list[int]], value: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, T) ids and a 0/1 mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def close_distributed() -> None:
    """Leave the torchrun process group: a rank that exits while still in it can abort in gloo's teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def batch_loss(
    model: HMTModel, samples: Sequence[dict], recall_loss_weight: float = 0.0
) -> tuple[torch.Tensor, dict]:
    """Loss of a batch of samples read side by side (right-padded): contexts through memory, then
    the labelled parts. The LM loss is the mean over the batch's labelled tokens; the recall loss
    the mean over the samples that have evidence.
    """
    device = model.device
    cfg = model.config
    state = None
    contexts = [s.get("context_ids") or [] for s in samples]
    if any(contexts):
        ctx, ctx_mask = _pad(contexts, 0, device)
        state = model(ctx, attention_mask=ctx_mask, return_logits=False).memory_state
    ids, mask = _pad([s["input_ids"] for s in samples], 0, device)
    labels, _ = _pad([s["labels"] for s in samples], -100, device)
    summary_mask = None
    if any(s.get("query_length") is not None for s in samples):
        summary_mask = torch.ones_like(ids)
        for i, s in enumerate(samples):
            q = s.get("query_length")
            if q is not None and q < cfg.segment_length:
                summary_mask[i, q : cfg.segment_length] = 0
    query_ids = query_mask = None
    if any(s.get("query_ids") for s in samples):
        # The recall query of the question segment: the question alone, as at answer time.
        query_ids, query_mask = _pad([s.get("query_ids") or s["input_ids"][:1] for s in samples], 0, device)
    want_records = recall_loss_weight > 0 and any(s.get("evidence_segments") for s in samples)
    out = model(
        ids,
        attention_mask=mask,
        labels=labels,
        memory_state=state,
        return_logits=False,
        return_records=want_records,
        summary_mask=summary_mask,
        query_ids=query_ids,
        query_mask=query_mask,
    )
    loss = out.loss if out.loss is not None else torch.zeros((), device=device)
    stats = {
        "lm_loss": float(loss.detach()),
        "tokens": sum(len(s["input_ids"]) + len(s.get("context_ids") or []) for s in samples),
    }
    record = out.records[0] if want_records else None
    if record is not None and record.recall_weights is not None and record.recall_weights.numel():
        losses, hits = [], []
        for i, s in enumerate(samples):
            evidence = s.get("evidence_segments")
            if not evidence:
                continue
            weights = record.recall_weights[i]  # recall of the question's segment, over cached memories
            valid = state.valid[i] if state is not None else torch.ones_like(weights, dtype=torch.bool)
            target = torch.isin(record.recall_segment_ids[i], torch.tensor(evidence, device=device))
            target = (target & valid).float()
            if target.sum() > 0:
                losses.append(-(torch.log(weights.clamp_min(1e-9)) * target / target.sum()).sum())
                hits.append(float(target[weights.masked_fill(~valid, -1).argmax()].item()))
        if losses:
            recall_loss = torch.stack(losses).mean()
            loss = loss + recall_loss_weight * recall_loss
            stats["recall_loss"] = float(recall_loss.detach())
            stats["recall_hit"] = sum(hits) / len(hits)
    return loss, stats


def batches(samples: Sequence[dict], order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group sample indices into batches of one kind (with or without context), keeping ``order``.

    Mixing a long context-free language-model sample with a short question would mostly pad.
    """
    out, pending = [], {True: [], False: []}
    for i in order:
        kind = bool(samples[i].get("context_ids"))
        pending[kind].append(i)
        if len(pending[kind]) == batch_size:
            out.append(pending[kind])
            pending[kind] = []
    out += [b for b in pending.values() if b]
    return out


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors (never pickle)."""
    tensors, meta = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                meta[f"{pid}.{name}"] = str(value)
    save_file(tensors, str(path), metadata=meta)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    sd = opt.state_dict()
    state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def train(
    model: HMTModel,
    samples: Sequence[dict],
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place on ``samples``; returns a summary (final loss, wall time, ...).

    Checkpoints go to ``cfg.out_dir/checkpoint`` (HMT parameters, adapters, optimizer, step) and
    training resumes from there when ``cfg.resume``. A JSONL log is written to ``cfg.out_dir/log.jsonl``.
    """
    rank, world = _dist_info()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = prepare_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        for p in params:  # every rank starts from rank 0's parameters
            dist.broadcast(p.data, src=0)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)
    out_dir = Path(cfg.out_dir)
    ckpt = out_dir / "checkpoint"
    start_step = 0
    if cfg.resume and (ckpt / "trainer_state.json").is_file():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        model.load_hmt_state_dict(load_file(str(ckpt / "hmt.safetensors")))
        if (ckpt / "adapter" / "adapter_model.safetensors").is_file() and hasattr(model.backbone, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.backbone, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
        _load_optimizer(opt, ckpt / "optimizer.safetensors")
        start_step = state["step"]
        with warnings.catch_warnings():  # replaying the schedule without optimizer steps is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_step):
                sched.step()
        logger.info("resumed from %s at step %d", ckpt, start_step)
    order = list(range(len(samples)))
    random.Random(cfg.seed).shuffle(order)
    mine = order[rank::world]  # disjoint shares of the data per rank
    if not mine:
        raise ValueError("no training samples for this rank")
    plan = batches(samples, mine, cfg.batch_size)
    autocast = torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    log_path = out_dir / "log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"stage {cfg.stage}", unit="step")
    began, last = time.perf_counter(), {}
    cursor = start_step * cfg.grad_accum
    for step in range(start_step, cfg.steps):
        if cfg.max_minutes is not None and _out_of_time(began, cfg.max_minutes, world, model.device):
            logger.info("stopping at step %d of %d: max_minutes=%s reached", step, cfg.steps, cfg.max_minutes)
            break
        t0, tokens, stats_acc = time.perf_counter(), 0, []
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            batch = [samples[i] for i in plan[cursor % len(plan)]]
            cursor += 1
            with autocast:
                loss, stats = batch_loss(model, batch, cfg.recall_loss_weight)
            (loss / cfg.grad_accum).backward()
            tokens += stats["tokens"]
            stats_acc.append(stats)
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        elapsed = time.perf_counter() - t0
        last = {
            "step": step + 1,
            "loss": sum(s["lm_loss"] for s in stats_acc) / len(stats_acc),
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens * world / elapsed,
            "stage": cfg.stage,
        }
        recall = [s for s in stats_acc if "recall_loss" in s]
        if recall:
            last["recall_loss"] = sum(s["recall_loss"] for s in recall) / len(recall)
            last["recall_hit"] = sum(s["recall_hit"] for s in recall) / len(recall)
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _checkpoint(model, opt, ckpt, step + 1, cfg)
    if bar is not None:
        bar.close()
    done = last.get("step", start_step)
    if rank == 0:
        _checkpoint(model, opt, ckpt, done, cfg)
    model.eval()
    return {
        **last,
        "wall_s": time.perf_counter() - began,
        "world_size": world,
        "samples": len(samples),
        "stopped_early": done < cfg.steps,
    }


def _out_of_time(began: float, max_minutes: float, world: int, device: torch.device) -> bool:
    """Whether the time budget is spent; under torchrun rank 0's clock decides for every rank."""
    spent = torch.tensor([float(time.perf_counter() - began >= max_minutes * 60)], device=device)
    if world > 1:
        dist.broadcast(spent, src=0)
    return bool(spent.item())


def _checkpoint(model: HMTModel, opt: torch.optim.Optimizer, path: Path, step: int, cfg: TrainConfig) -> None:
    model.save_pretrained(path, save_backbone=cfg.trainable == "all")
    _save_optimizer(opt, path / "optimizer.safetensors")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "train_config": asdict(cfg)}, indent=2))
