"""Peak resident memory of streaming HMT ingestion from 4k to 1M tokens, beside the full-context backbone.

HMT reads a document block by block and keeps at most N memories, so its memory should not grow with
the document: the target is a 1M-token peak within 1.15x of the 4k-token peak. What does grow is what
a store keeps per segment (float32 copies of summary, memory and recall key: 3 x d x 4 bytes), which
is kept here as the QA engine keeps it. The plain backbone over the full context (one forward over n
tokens, no HMT) is measured up to its position limit (8192 for SmolLM2), with logits for every token
and, separately, for the last token only (``logits_to_keep=1``: the body's own memory).

Each size runs in a fresh subprocess so that peaks never mix. The figure is the peak RSS during the
ingestion itself (Linux: the VmHWM counter is reset after the model has loaded, so the transient
float32 copy made while loading a bfloat16 model does not hide everything else); the process-lifetime
peak is reported beside it.

    python -m bench.memory_scale [--quick] [--sizes 4096 16384 ...] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    PG19_BOOK,
    apply_threads,
    base_parser,
    data_dir,
    finish_machine_info,
    machine_info,
    peak_rss_bytes,
    print_table,
    result_path,
    write_results,
)

NAME = "memory_scale"
TARGET_GROWTH = 1.15
DEFAULT_SIZES = [4096, 16_384, 65_536, 262_144, 1_048_576]
QUICK_SIZES = [4096, 16_384]
RESULT_MARK = "MEMORY_SCALE_RESULT "  # prefixes the worker's JSON line on stdout
MB = 2**20
HMT_MODES = ("hmt",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="HMT document sizes in tokens")
    p.add_argument(
        "--backbone-sizes",
        type=int,
        nargs="*",
        default=None,
        help="full-context backbone sizes (default 4096 8192, --quick 4096); sizes past the backbone's "
        "position limit are skipped",
    )
    p.add_argument("--segment-length", type=int, default=256)
    p.add_argument("--sensory", type=int, default=32)
    p.add_argument("--num-cached", type=int, default=300)
    p.add_argument("--block", type=int, default=16, help="segments per read_segments call (the engine's default)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per size (default: none)")
    # Internal: run one measurement in this process and print it (the parent starts these).
    p.add_argument("--worker", choices=[*HMT_MODES, "backbone", "backbone-last"], help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- RSS probes
def rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand memory freed after loading back to the OS before the baseline is taken.

    Loading a bfloat16 model first materialises float32 weights; whether glibc returns those pages at
    once varies from run to run (we saw 820-900 MB after load), which would add noise of the same
    order as the effect measured here. gc + malloc_trim make the baseline reproducible.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def vm_hwm() -> int | None:
    """Peak RSS since the last reset, from /proc/self/status (bytes); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------- token source
def book_ids(tokenizer: Any, data_dir_arg: str | None) -> np.ndarray | None:
    """The PG-19 book's token ids (int32), or None without the data folder.

    Tokenised before the peak counter is reset: the tokenizer's transient lists are not ingestion.
    """
    root = data_dir(data_dir_arg)
    book = root / PG19_BOOK if root is not None else None
    if book is None or not book.is_file():
        return None
    return np.asarray(tokenizer(book.read_text(encoding="utf-8"), add_special_tokens=False).input_ids, np.int32)


def token_blocks(base: np.ndarray | None, vocab: int, n: int, block: int) -> Iterator[np.ndarray]:
    """Yield n token ids in blocks: ``base`` repeated cyclically, else seeded synthetic ids.

    Blocks are made on demand so that a 1M-token run never holds the whole document's ids: only what
    the model and the store keep counts.
    """
    rng = np.random.default_rng(0)
    for start in range(0, n, block):
        stop = min(n, start + block)
        if base is not None:
            yield base[np.arange(start, stop) % len(base)]
        else:
            yield rng.integers(16, vocab, size=stop - start, dtype=np.int32)


def token_source_name(data_dir_arg: str | None) -> str:
    root = data_dir(data_dir_arg)
    if root is not None and (root / PG19_BOOK).is_file():
        return f"{PG19_BOOK}, repeated cyclically"
    return "synthetic uniform token ids (no data folder)"


# ---------------------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, reset the peak counter, ingest ``args.tokens`` tokens, report RSS figures."""
    import torch

    from hmt import HMTConfig, HMTModel, load_backbone

    apply_threads(args.threads)
    backbone, tokenizer = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    n = args.tokens
    result: dict[str, Any] = {"mode": args.worker, "tokens": n}
    if args.worker in HMT_MODES:
        cfg = HMTConfig(
            segment_length=args.segment_length, sensory_length=args.sensory, num_cached=args.num_cached
        )
        model = HMTModel(backbone, cfg).eval()
        block_tokens = args.block * cfg.segment_length
    else:
        block_tokens = n
    vocab = int(getattr(tokenizer, "vocab_size", None) or len(tokenizer))
    blocks = token_blocks(book_ids(tokenizer, args.data_dir), vocab, n, block_tokens)
    release_freed_memory()
    result["rss_after_load_mb"] = rss_now() / MB
    result["peak_counter_reset"] = reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        if args.worker in HMT_MODES:
            summaries: list[np.ndarray] = []
            memories: list[np.ndarray] = []
            keys: list[np.ndarray] = []
            state = None
            done, report_every = 0, max(n // 10, block_tokens)
            for chunk in blocks:
                ids = torch.from_numpy(chunk).long()[None].to(args.device)
                records, state = model.read_segments(ids, state)
                # What a store keeps per segment: small float32 numpy copies; the records go.
                # .copy(): in float32, .float() is a no-op and .numpy() of a view would keep the
                # whole block's hidden states alive (r.memory is a view of the main pass's output).
                for r in records:
                    summaries.append(r.summary[0].float().cpu().numpy().copy())
                    memories.append(r.memory[0].float().cpu().numpy().copy())
                    keys.append(r.recall_key[0].float().cpu().numpy().copy())
                del records, ids
                done += chunk.shape[0]
                if done % report_every < chunk.shape[0] and done < n:
                    rate = done / (time.perf_counter() - start)
                    print(f"  [{NAME} worker] {done}/{n} tokens, {rate:.0f} tok/s", file=sys.stderr, flush=True)
            arrays = {"summary": np.stack(summaries), "memory": np.stack(memories), "recall_key": np.stack(keys)}
            result["segments"] = len(memories)
            result["store_arrays_mb"] = sum(a.nbytes for a in arrays.values()) / MB
            result["cached_memories"] = state.num_cached
        else:
            ids = torch.from_numpy(next(blocks)).long()[None].to(args.device)
            keep = 1 if args.worker == "backbone-last" else 0  # 0 = logits for every position
            logits = backbone(input_ids=ids, logits_to_keep=keep).logits
            result["logits_mb"] = logits.numel() * logits.element_size() / MB
    seconds = time.perf_counter() - start
    hwm = vm_hwm()
    peak_mb = (hwm / MB) if hwm is not None and result["peak_counter_reset"] else None
    result.update(
        {
            "seconds": seconds,
            "tok_s": n / seconds,
            "ingest_peak_rss_mb": peak_mb,
            # What reading the document added on top of the loaded model (the part that could scale).
            "growth_over_load_mb": peak_mb - result["rss_after_load_mb"] if peak_mb is not None else None,
            "process_peak_rss_mb": peak_rss_bytes() / MB,
            "rss_at_end_mb": rss_now() / MB,
        }
    )
    return result


def run_worker(mode: str, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its stderr (progress) passes through."""
    cmd = [
        sys.executable, "-m", "bench.memory_scale", "--worker", mode, "--tokens", str(tokens),
        "--backbone", args.backbone, "--dtype", args.dtype, "--device", args.device,
        "--segment-length", str(args.segment_length), "--sensory", str(args.sensory),
        "--num-cached", str(args.num_cached), "--block", str(args.block),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            text=True,
            timeout=args.timeout,
            cwd=Path(__file__).resolve().parents[1],
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        return {"mode": mode, "tokens": tokens, "error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    return {
        "mode": mode,
        "tokens": tokens,
        "error": f"worker exited with {proc.returncode} after {time.perf_counter() - start:.0f} s",
    }


# ---------------------------------------------------------------------------------------- main
def backbone_limit(name: str) -> int | None:
    """The backbone's position limit from its config (without loading the weights)."""
    from transformers import AutoConfig

    from hmt.backbone import TINY_RANDOM, resolve_backbone_path

    if name == TINY_RANDOM:
        return 8192
    config = AutoConfig.from_pretrained(resolve_backbone_path(name))
    return getattr(config, "max_position_embeddings", None)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per HMT variant: growth of the ingestion peak from the smallest to the largest size, vs the target."""
    out: dict[str, Any] = {}
    smallest = {}
    for mode in HMT_MODES:
        hmt = sorted(
            (r for r in rows if r["mode"] == mode and r.get("ingest_peak_rss_mb")), key=lambda r: r["tokens"]
        )
        if not hmt:
            continue
        smallest[mode] = hmt[0]["ingest_peak_rss_mb"]
        if len(hmt) < 2:
            continue
        growth = hmt[-1]["ingest_peak_rss_mb"] / hmt[0]["ingest_peak_rss_mb"]
        out[mode] = {
            "smallest_tokens": hmt[0]["tokens"],
            "largest_tokens": hmt[-1]["tokens"],
            "growth": growth,
            "target_growth": TARGET_GROWTH,
            "meets_target": growth <= TARGET_GROWTH,
            "target_checked_at_1M": hmt[-1]["tokens"] >= 1_048_576,
        }
    for r in rows:  # every row against plain HMT's smallest peak (its own variant's for the variants)
        ref = smallest.get(r["mode"], smallest.get("hmt"))
        if r.get("ingest_peak_rss_mb") and ref:
            r["vs_smallest_hmt"] = r["ingest_peak_rss_mb"] / ref
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(args)), flush=True)
        return 0
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    bb_sizes = args.backbone_sizes if args.backbone_sizes is not None else ([4096] if args.quick else [4096, 8192])
    limit = backbone_limit(args.backbone)
    skipped = [n for n in bb_sizes if limit is not None and n > limit]
    bb_sizes = [n for n in bb_sizes if n not in skipped]
    info = machine_info(device=args.device, dtype=args.dtype, threads=args.threads or 0)
    info["torch_threads"] = args.threads or "torch default (set in each worker)"
    out_path = result_path(NAME, args.out, args.quick)
    rows: list[dict[str, Any]] = []
    # Small sizes first and the backbone before the long HMT runs, so that an interrupted run still
    # leaves the comparison; results are rewritten after every size.
    plan = [("backbone", n) for n in bb_sizes] + [("backbone-last", n) for n in bb_sizes]
    small = [(m, n) for n in sorted(sizes) if n <= 16_384 for m in HMT_MODES]
    plan = small + plan + [(m, n) for n in sorted(sizes) if n > 16_384 for m in HMT_MODES]
    for mode, n in plan:
        print(f"[{NAME}] {mode} {n} tokens ...", flush=True)
        row = run_worker(mode, n, args)
        rows.append(row)
        if "error" in row:
            print(f"[{NAME}]   {row['error']}", flush=True)
        payload = {
            "benchmark": NAME,
            "machine": finish_machine_info(dict(info)),
            "settings": {
                "backbone": args.backbone,
                "dtype": args.dtype,
                "segment_length": args.segment_length,
                "sensory_length": args.sensory,
                "num_cached": args.num_cached,
                "block_segments": args.block,
                "backbone_position_limit": limit,
                "backbone_sizes_skipped_over_limit": skipped,
                "hmt_modes": list(HMT_MODES),
                "token_source": token_source_name(args.data_dir),
                "quick": args.quick,
                "planned": [f"{m}:{t}" for m, t in plan],
            },
            "results": rows,
            "summary": summarise(rows),
        }
        write_results(NAME, payload, out_path)

    print_table(
        rows,
        [
            ("mode", "mode", "s"),
            ("tokens", "tokens", "d"),
            ("ingest_peak_rss_mb", "peak RSS MB (ingest)", ".0f"),
            ("vs_smallest_hmt", "x HMT smallest", ".3f"),
            ("growth_over_load_mb", "over load MB", ".0f"),
            ("process_peak_rss_mb", "process peak MB", ".0f"),
            ("rss_after_load_mb", "after load MB", ".0f"),
            ("store_arrays_mb", "store arrays MB", ".1f"),
            ("logits_mb", "logits MB", ".0f"),
            ("seconds", "seconds", ".1f"),
            ("tok_s", "tok/s", ".0f"),
            ("error", "error", "s"),
        ],
        title=f"Peak resident memory, dtype={args.dtype}, device={args.device} (HMT: L={args.segment_length}, "
        f"k={args.sensory}, N={args.num_cached}, blocks of {args.block} segments)",
    )
    for mode, summary in summarise(rows).items():
        print(
            f"\n{mode}: peak growth {summary['smallest_tokens']} -> {summary['largest_tokens']} tokens: "
            f"x{summary['growth']:.3f} (target <= x{TARGET_GROWTH}, "
            f"{'met' if summary['meets_target'] else 'NOT met'})"
        )
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
