"""Ingestion throughput of HMT against the plain backbone over the same tokens.

HMT reads a long token sequence with ``HMTModel.read_segments`` in blocks (as the QA engine ingests a
document, keeping only the memory state); the plain backbone reads the same tokens in consecutive
segments of the same length L and produces logits for every token (``backbone(input_ids=chunk).logits``),
so both see windows of the same size. The figure of merit is
``hmt_tokens_per_s / backbone_tokens_per_s``; the target is >= 0.65 for L in {256, 1024} and dtype in
{float32, bfloat16}.

Pairing: the sequence is cut into blocks; each block is read by HMT (continuing its memory) and by the
backbone right after (or right before: the order alternates), and the reported ratio is the median
over blocks and repeats of backbone_time / hmt_time. Neighbouring measurements share whatever else
the machine is doing, so the ratio holds up on a CPU shared with another job even when absolute
tokens/s drift. CPU-time ratios (time this process actually ran) are reported beside wall-clock ones.

A separate instrumented run splits HMT's time into the summary pass (eq. 1, batched), the main pass
(the backbone over [P, sensory, segment, P]), recall (eq. 2) and the rest (Python, state updates).

    python -m bench.ingest_speed [--quick] [--data-dir DIR] [--threads 1] [--alternatives]

Over 500 lines: one benchmark with its MAC model, its profiler and its report, used nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

# bench.common sorts before hmt, so its offline environment is set before transformers loads.
from bench.common import (
    apply_threads,
    base_parser,
    finish_machine_info,
    interleaved,
    machine_info,
    median,
    print_table,
    synchronize,
    text_token_ids,
    timed,
    timed_cpu,
    write_results,
)
from hmt import HMTConfig, HMTModel, load_backbone

NAME = "ingest_speed"
TARGET_RATIO = 0.65


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2-135m-instruct")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="segment lengths L")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--sensory", type=int, default=32, help="k, sensory tokens")
    p.add_argument("--num-cached", type=int, default=300, help="N, cached memories")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens read per repeat (default 8192; --quick: 2 segments of the longest L); "
        "rounded down to whole segments",
    )
    p.add_argument("--repeats", type=int, default=None, help="passes over the tokens (default 3; --quick: 1)")
    p.add_argument(
        "--block-tokens",
        type=int,
        default=2048,
        help="tokens per read_segments call and per timed pair (block = max(1, this // L) segments): "
        "small enough that HMT and the backbone alternate every few seconds",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the instrumented stage breakdown")
    p.add_argument(
        "--alternatives",
        action="store_true",
        help="also time variants of HMT (block size, attention kernel of the summary pass) against "
        "the default, interleaved, to size possible changes in hmt/",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- workloads
def hmt_reader(model: HMTModel, ids: torch.Tensor, block_segments: int) -> Callable[[], None]:
    """Stream ``ids`` through HMT block by block from an empty memory, keeping only the state."""
    step = block_segments * model.config.segment_length

    def run() -> None:
        with torch.inference_mode():
            state = None
            for start in range(0, ids.shape[1], step):
                _, state = model.read_segments(ids[:, start : start + step], state)

    return run


def backbone_reader(backbone: Any, ids: torch.Tensor, segment_length: int) -> Callable[[], None]:
    """The plain backbone over the same tokens in windows of L, with logits for every token."""

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, ids.shape[1], segment_length):
                _ = backbone(input_ids=ids[:, start : start + segment_length]).logits

    return run


def _hmt_block(model: HMTModel, chunk: torch.Tensor, box: dict[str, Any]) -> None:
    with torch.inference_mode():
        _, box["state"] = model.read_segments(chunk, box["state"])


def paired_blocks(
    model: HMTModel, backbone: Any, ids: torch.Tensor, block_segments: int, repeats: int, device: str
) -> list[dict[str, float]]:
    """Time HMT and the backbone block by block on the same tokens, alternating which goes first.

    HMT carries its memory from block to block exactly as one streaming ingestion would.
    """
    L = model.config.segment_length
    unit = block_segments * L
    pairs = []
    for r in range(repeats):
        box: dict[str, Any] = {"state": None}
        for u, start in enumerate(range(0, ids.shape[1], unit)):
            chunk = ids[:, start : start + unit]
            hmt_fn = functools.partial(_hmt_block, model, chunk, box)
            base_fn = backbone_reader(backbone, chunk, L)
            if (r + u) % 2 == 0:
                h, b = timed_cpu(hmt_fn, device), timed_cpu(base_fn, device)
            else:
                b, h = timed_cpu(base_fn, device), timed_cpu(hmt_fn, device)
            pairs.append(
                {
                    "repeat": r,
                    "block": u,
                    "tokens": chunk.shape[1],
                    "hmt_wall": h[0],
                    "hmt_cpu": h[1],
                    "backbone_wall": b[0],
                    "backbone_cpu": b[1],
                }
            )
        done = [p["backbone_wall"] / p["hmt_wall"] for p in pairs]
        print(f"  repeat {r + 1}/{repeats}: median ratio so far {median(done):.3f}", flush=True)
    return pairs


# ---------------------------------------------------------------------------------------- FLOP model
def mac_model(backbone: Any, cfg: HMTConfig, n_tokens: int) -> dict[str, float]:
    """Multiply-accumulates of both workloads from the backbone's shape (Llama-style blocks).

    HMT pays for the summary pass (j + 2 positions per segment) and the extra k + 2 positions of the
    main pass, but computes no vocabulary logits; the backbone pays for the LM head on every token.
    The ratio of the two is the speed ratio a perfect implementation would reach if every position
    cost the same; measured ratios are compared against it.
    """
    c = backbone.config
    d = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    kv = getattr(c, "num_key_value_heads", heads)
    ffn = getattr(c, "intermediate_size", 4 * d)
    layers = c.num_hidden_layers
    vocab = backbone.get_output_embeddings().weight.shape[0]
    per_pos = layers * (d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * ffn)

    def seq(t: int) -> float:  # one causal pass over t positions, body only
        return t * per_pos + layers * heads * head_dim * t * (t + 1)

    L, k, j = cfg.segment_length, cfg.sensory_length, cfg.summary_length
    n_seg = n_tokens // L
    base = n_seg * (seq(L) + L * d * vocab)
    main = seq(L + 2) + (n_seg - 1) * seq(L + k + 2)  # the first segment has no sensory tokens
    summary = n_seg * seq(j + 2)
    return {
        "backbone_gmac": base / 1e9,
        "hmt_main_gmac": main / 1e9,
        "hmt_summary_gmac": summary / 1e9,
        "model_ratio": base / (main + summary),
    }


# ---------------------------------------------------------------------------------------- profiling
@contextlib.contextmanager
def stage_profiler(model: HMTModel, device: str) -> Iterator[dict[str, float]]:
    """Accumulate wall time per HMT stage by wrapping the model's methods on this instance only.

    Stages: ``summary`` (HMTModel.summarize, all its backbone passes), ``main`` (backbone calls made
    inside a segment step), ``recall`` (MemoryRecall over the cache), ``step_other`` (the rest of a
    segment step: embedding lookup, concatenation, state push). The caller derives ``outside``.
    """
    acc = {"summary": 0.0, "segment_step": 0.0, "main": 0.0, "recall": 0.0}
    inside_step = [False]

    def wrap(fn: Callable[..., Any], key: str | None) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            name = key or ("main" if inside_step[0] else None)
            if name is None:
                return fn(*args, **kwargs)
            synchronize(device)
            start = time.perf_counter()
            if name == "segment_step":
                inside_step[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                if name == "segment_step":
                    inside_step[0] = False
                synchronize(device)
                acc[name] += time.perf_counter() - start

        return inner

    patched = [
        (model, "summarize", wrap(model.summarize, "summary")),
        (model, "_segment_step", wrap(model._segment_step, "segment_step")),
        (model, "_run_backbone", wrap(model._run_backbone, None)),
        (model.recall, "forward", wrap(model.recall.forward, "recall")),
    ]
    for obj, attr, fn in patched:
        setattr(obj, attr, fn)
    try:
        yield acc
    finally:
        for obj, attr, _ in patched:
            delattr(obj, attr)  # back to the class attribute


def profile_hmt(model: HMTModel, ids: torch.Tensor, block: int, device: str) -> dict[str, float]:
    """One instrumented ingestion; seconds and shares per stage."""
    with stage_profiler(model, device) as acc:
        total = timed(hmt_reader(model, ids, block), device)
    stages = {
        "summary": acc["summary"],
        "main": acc["main"],
        "recall": acc["recall"],
        "step_other": acc["segment_step"] - acc["main"] - acc["recall"],
        "outside": total - acc["summary"] - acc["segment_step"],
    }
    out: dict[str, float] = {"total_s": total}
    for name, seconds in stages.items():
        out[f"{name}_s"] = seconds
        out[f"{name}_share"] = seconds / total
    return out


# ---------------------------------------------------------------------------------------- alternatives
@contextlib.contextmanager
def summary_attention(model: HMTModel, implementation: str) -> Iterator[None]:
    """Run only the summary pass with another attention kernel (e.g. "eager"); the main pass unchanged.

    The summary pass reads short rows (j + 2 positions) in a batch; for short rows a plain matmul +
    softmax can beat the CPU flash kernel behind SDPA. Switching ``config._attn_implementation`` is
    what transformers' ``set_attn_implementation`` does, here per call and reversible.
    """
    config = model._causal_lm().config
    original = model._summary_pass

    def patched(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        saved = config._attn_implementation
        config._attn_implementation = implementation
        try:
            return original(ids, mask)
        finally:
            config._attn_implementation = saved

    model._summary_pass = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model._summary_pass  # back to the class method


def final_position_backbone(model: HMTModel) -> Callable[..., tuple[torch.Tensor, object]] | None:
    """A replacement for ``HMTModel._run_backbone`` that computes the last layer at the final position only.

    While ingesting, HMT needs one vector per backbone call: S_n (the trailing T of the summary pass)
    and M_n (the trailing P of the main pass). All layers but the last must still run over every
    position (their keys and values feed later layers), but the last layer's query, attention output,
    MLP and the final norm are needed at one position. That saves about one layer in
    ``num_hidden_layers`` of both passes. Llama-family decoders with the paper's recall only (SmolLM2 is
    one; recall "content" pools every position of the last layer); None otherwise.
    Returns hidden states of the usual shape whose positions other than the last are that same vector,
    which ``read_segments`` never reads.
    """
    from torch.nn import Identity, ModuleList

    if model.config.recall != "paper":
        return None
    decoder = model._decoder()
    layers = getattr(decoder, "layers", None)
    needed = ("rotary_emb", "norm")
    if layers is None or not all(hasattr(decoder, a) for a in needed) or not hasattr(layers[-1], "self_attn"):
        return None
    from transformers.models.llama.modeling_llama import rotate_half

    original = model._run_backbone
    last = layers[-1]
    attn = last.self_attn
    head_dim = attn.head_dim

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    def run(
        embeds: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past: object = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        if past is not None or use_cache:  # generation keeps the full path
            return original(embeds, mask, position_ids, past, use_cache)
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        norm = decoder.norm
        decoder.layers, decoder.norm = ModuleList(list(layers)[:-1]), Identity()
        try:  # every layer but the last, without the final norm: the residual stream before layer -1
            hidden = decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids).last_hidden_state
        finally:
            decoder.layers, decoder.norm = layers, norm
        b, t, _ = hidden.shape
        x = last.input_layernorm(hidden)
        cos, sin = decoder.rotary_emb(x, position_ids)
        q = rope(attn.q_proj(x[:, -1:]).view(b, 1, -1, head_dim).transpose(1, 2), cos[:, -1:], sin[:, -1:])
        k = rope(attn.k_proj(x).view(b, t, -1, head_dim).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
        # The final position sees every key (causality is trivially met); padding keys are masked out.
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.bool()[:, None, None, :], scale=attn.scaling, enable_gqa=True
        )
        h = hidden[:, -1:] + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
        h = h + last.mlp(last.post_attention_layernorm(h))
        return norm(h).expand(b, t, -1), None

    return run


@contextlib.contextmanager
def patched_run_backbone(model: HMTModel, run: Callable[..., Any]) -> Iterator[None]:
    model._run_backbone = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model._run_backbone  # back to the class method


def check_final_position(model: HMTModel, ids: torch.Tensor) -> float | None:
    """Largest |difference| of S_n and M_n between the trimmed and the full backbone (relative to max |M|)."""
    run = final_position_backbone(model)
    if run is None:
        return None
    L = model.config.segment_length
    x = ids[:, : 3 * L]
    with torch.inference_mode():
        full_records, _ = model.read_segments(x)
        with patched_run_backbone(model, run):
            trim_records, _ = model.read_segments(x)
    diff, scale = 0.0, 0.0
    for a, b in zip(full_records, trim_records, strict=True):
        for u, w in ((a.summary, b.summary), (a.memory, b.memory)):
            diff = max(diff, float((u.float() - w.float()).abs().max()))
            scale = max(scale, float(u.float().abs().max()))
    return diff / max(scale, 1e-12)


def _with_final_position(model: HMTModel, run: Callable[[], None]) -> None:
    trimmed = final_position_backbone(model)
    assert trimmed is not None
    with patched_run_backbone(model, trimmed):
        run()


def _with_eager_summary(model: HMTModel, run: Callable[[], None]) -> None:
    with summary_attention(model, "eager"):
        run()


def measure_alternatives(
    model: HMTModel, ids: torch.Tensor, block: int, repeats: int, device: str
) -> list[dict[str, Any]]:
    """Time HMT variants interleaved with the default over the whole sequence.

    speedup = default time / variant time, median over rounds, by wall clock and by CPU time.
    """
    n_segments = ids.shape[1] // model.config.segment_length
    default = hmt_reader(model, ids, block)
    variants: dict[str, Callable[[], None]] = {"default": default}
    if block > 1:
        variants["block=1 (summary batch of 1)"] = hmt_reader(model, ids, 1)
    if n_segments > block:
        variants[f"block={n_segments} (one call)"] = hmt_reader(model, ids, n_segments)
    variants["summary pass with eager attention"] = functools.partial(_with_eager_summary, model, default)
    if final_position_backbone(model) is not None:
        variants["last layer at the final position only"] = functools.partial(_with_final_position, model, default)
    times = interleaved(variants, repeats, device)
    base = times["default"]
    deviation = check_final_position(model, ids)
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "variant": name,
                "wall_s": [round(w, 3) for w, _ in ts],
                "speedup_wall": median([bw / w for (bw, _), (w, _) in zip(base, ts, strict=True)]),
                "speedup_cpu": median([bc / c for (_, bc), (_, c) in zip(base, ts, strict=True)]),
            }
        )
        if name.startswith("last layer"):
            rows[-1]["max_rel_deviation_of_S_and_M"] = deviation
    return rows


# ---------------------------------------------------------------------------------------- main
def run_cell(backbone: Any, all_ids: torch.Tensor, dtype: str, L: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = HMTConfig(segment_length=L, sensory_length=args.sensory, num_cached=args.num_cached)
    model = HMTModel(backbone, cfg).eval()
    n = (min(args.tokens, all_ids.shape[1]) // L) * L
    ids = all_ids[:, :n].to(args.device)
    block = max(1, args.block_tokens // L)
    # Warm-up on two segments: first calls pay for allocator growth and kernel selection.
    hmt_reader(model, ids[:, : 2 * L], block)()
    backbone_reader(backbone, ids[:, : 2 * L], L)()
    pairs = paired_blocks(model, backbone, ids, block, args.repeats, args.device)

    def total(key: str) -> float:
        return sum(p[key] for p in pairs)

    ratio_wall = [p["backbone_wall"] / p["hmt_wall"] for p in pairs]
    ratio_cpu = [p["backbone_cpu"] / p["hmt_cpu"] for p in pairs]
    tokens_read = n * args.repeats
    row: dict[str, Any] = {
        "L": L,
        "dtype": dtype,
        "tokens": n,
        "segments": n // L,
        "block_segments": block,
        "pairs": len(pairs),
        "hmt_tok_s": tokens_read / total("hmt_wall"),
        "backbone_tok_s": tokens_read / total("backbone_wall"),
        "hmt_tok_cpu_s": tokens_read / total("hmt_cpu"),
        "backbone_tok_cpu_s": tokens_read / total("backbone_cpu"),
        "ratio": median(ratio_wall),
        "ratio_min": min(ratio_wall),
        "ratio_max": max(ratio_wall),
        "ratio_of_totals": total("backbone_wall") / total("hmt_wall"),
        "ratio_cpu": median(ratio_cpu),
        **mac_model(backbone, cfg, n),
        "pair_times": [{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()} for p in pairs],
    }
    row["meets_target"] = row["ratio"] >= TARGET_RATIO
    if not args.no_profile:
        row["profile"] = profile_hmt(model, ids, block, args.device)
    if args.alternatives:
        row["alternatives"] = measure_alternatives(model, ids, block, max(args.repeats, 2), args.device)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tokens is None:
        args.tokens = 2 * max(args.lengths) if args.quick else 8192
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    threads = apply_threads(args.threads)
    info = machine_info(device=args.device, dtype=args.dtypes, threads=threads)
    rows: list[dict[str, Any]] = []
    source = ""
    for dtype in args.dtypes:
        backbone, tokenizer = load_backbone(args.backbone, dtype=dtype, device=args.device)
        ids, source = text_token_ids(tokenizer, max(args.tokens, 2 * max(args.lengths)), args.data_dir)
        for L in args.lengths:
            print(f"[{NAME}] dtype={dtype} L={L}: {args.tokens // L} segments x {args.repeats} repeats ...")
            sys.stdout.flush()
            rows.append(run_cell(backbone, ids, dtype, L, args))
        del backbone

    print_table(
        rows,
        [
            ("dtype", "dtype", "s"),
            ("L", "L", "d"),
            ("tokens", "tokens", "d"),
            ("pairs", "pairs", "d"),
            ("hmt_tok_s", "HMT tok/s", ".0f"),
            ("backbone_tok_s", "backbone tok/s", ".0f"),
            ("ratio", "ratio (median)", ".3f"),
            ("ratio_min", "min", ".3f"),
            ("ratio_max", "max", ".3f"),
            ("ratio_cpu", "ratio (CPU time)", ".3f"),
            ("model_ratio", "FLOP-model ratio", ".3f"),
            ("meets_target", f">= {TARGET_RATIO}", "s"),
        ],
        title=f"Ingestion throughput, HMT / plain backbone (threads={threads}, device={args.device}; "
        f"tok/s are wall clock)",
    )
    if not args.no_profile:
        prof = [{"dtype": r["dtype"], "L": r["L"], **r["profile"]} for r in rows]
        print_table(
            prof,
            [
                ("dtype", "dtype", "s"),
                ("L", "L", "d"),
                ("total_s", "HMT s", ".2f"),
                ("summary_share", "summary", ".1%"),
                ("main_share", "main pass", ".1%"),
                ("recall_share", "recall", ".2%"),
                ("step_other_share", "step other", ".2%"),
                ("outside_share", "outside", ".2%"),
            ],
            title="Where HMT's ingestion time goes (one instrumented run per cell)",
        )
    if args.alternatives:
        alt = [{"dtype": r["dtype"], "L": r["L"], **a} for r in rows for a in r["alternatives"]]
        print_table(
            alt,
            [
                ("dtype", "dtype", "s"),
                ("L", "L", "d"),
                ("variant", "variant", "s"),
                ("speedup_wall", "speedup (wall)", ".3f"),
                ("speedup_cpu", "speedup (CPU)", ".3f"),
            ],
            title="HMT variants (speedup over the default, median of interleaved rounds)",
        )
    payload = {
        "benchmark": NAME,
        "machine": finish_machine_info(info),
        "settings": {
            "backbone": args.backbone,
            "sensory_length": args.sensory,
            "num_cached": args.num_cached,
            "block_tokens": args.block_tokens,
            "repeats": args.repeats,
            "quick": args.quick,
            "token_source": source,
            "target_ratio": TARGET_RATIO,
            "hmt_weights": "freshly initialised HMT parameters (speed does not depend on their values)",
        },
        "results": rows,
        "all_meet_target": all(r["meets_target"] for r in rows),
    }
    write_results(NAME, payload, args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
