"""Run every benchmark in sequence: ``python -m bench.run_all [--quick]`` (``make bench`` calls this).

Each benchmark runs as ``python -m bench.<name>`` in its own interpreter, so that one benchmark's
threads, allocator state and peak memory never leak into the next. To add a benchmark, append its
module name to ``BENCHMARKS``; it must accept the shared flags of ``bench.common.base_parser``
(--quick, --device, --threads, --data-dir) and write ``bench/results/<name>.json`` (``<name>_quick.json``
with --quick; see ``bench.common.result_path``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# Order: the fast, most important one first; memory_scale's long sizes last.
BENCHMARKS: list[str] = [
    "ingest_speed",
    "answer_latency",
    "faiss_scale",
    "memory_scale",
    "quality",  # last: the longest, and it needs the committed checkpoint
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    p.add_argument("--device", default=None, help="passed through (default: each benchmark's, cpu)")
    p.add_argument("--threads", type=int, default=None, help="passed through")
    p.add_argument("--data-dir", default=None, help="passed through")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared: list[str] = []
    if args.quick:
        shared.append("--quick")
    if args.device:
        shared += ["--device", args.device]
    if args.threads:
        shared += ["--threads", str(args.threads)]
    if args.data_dir:
        shared += ["--data-dir", args.data_dir]
    root = Path(__file__).resolve().parents[1]
    env = os.environ.copy()
    env.setdefault("HF_HUB_OFFLINE", "1")
    outcomes: list[tuple[str, int, float]] = []
    for name in args.only or BENCHMARKS:
        cmd = [sys.executable, "-m", f"bench.{name}", *shared]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        # A failing benchmark must not hide the others' results: run them all, report at the end.
        code = subprocess.call(cmd, cwd=root, env=env)
        outcomes.append((name, code, time.perf_counter() - start))
    print("\n=== summary")
    for name, code, seconds in outcomes:
        print(f"{name:20s} {'ok' if code == 0 else f'FAILED (exit {code})':18s} {seconds:8.1f} s")
    return 0 if all(code == 0 for _, code, _ in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
