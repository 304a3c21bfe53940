"""FAISS recall and query time over 10k, 100k and 1M stored vectors (inner product, d = 576).

The memory store indexes HMT's recall keys K_n = M_n W_k with an inner-product index; a document of
1M segments is out of reach of one HMT cache but not of FAISS. This measures, per collection size,
what the store's automatic index choice (exact ``IndexFlatIP`` up to ``exact_limit``, HNSW beyond)
costs to build and to query, and how much recall@10 the approximate index gives up against exact
search. The exact flat search is timed at every size too (it provides the ground truth anyway), so
the table shows where exact search stops being fast.

Vectors are clustered Gaussians (cluster centres plus noise), which is closer to memory keys of
related segments than uniform noise and harder for HNSW than well-separated data.

    python -m bench.faiss_scale [--quick] [--sizes 10000 100000 1000000] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from bench.common import (
    apply_threads,
    base_parser,
    finish_machine_info,
    machine_info,
    median,
    peak_rss_bytes,
    print_table,
    write_results,
)

NAME = "faiss_scale"


def _store_api() -> tuple[Callable[..., Any], Callable[..., float], int, str]:
    """The store's own ``build_index`` / ``recall_at_k`` when present, else the local copies below.

    Benchmarking the store's functions keeps the numbers honest about what the application does.
    """
    try:
        from qa_pipeline.store import build_index, recall_at_k

        try:
            from qa_pipeline.vector_index import DEFAULT_EXACT_LIMIT as limit
        except ImportError:
            limit = 200_000
        return build_index, recall_at_k, int(limit), "qa_pipeline.store"
    except ImportError:
        return _build_index, _recall_at_k, 200_000, "bench.faiss_scale (local fallback)"


def _build_index(vectors: np.ndarray, *, exact_limit: int = 200_000) -> faiss.Index:
    """Fallback: exact inner-product index up to ``exact_limit`` vectors, HNSW (M=32, efSearch=128) beyond."""
    n, d = vectors.shape
    if n <= exact_limit:
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Fallback: mean share of each query's exact top-k that the approximate top-k also holds."""
    hits = [len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="collection sizes (default 10k 100k 1M)")
    p.add_argument("--dim", type=int, default=576, help="vector width (SmolLM2-135M's d = d_h = 576)")
    p.add_argument("--queries", type=int, default=100, help="queries per batch")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters the vectors are drawn around")
    p.add_argument("--noise", type=float, default=0.5, help="noise std relative to the unit-variance centres")
    p.add_argument(
        "--exact-limit", type=int, default=None, help="largest size that gets an exact index (default: the store's)"
    )
    p.add_argument(
        "--compare-hnsw",
        action="store_true",
        help="also build and time HNSW at sizes that get an exact index (where would HNSW pay off?)",
    )
    p.add_argument(
        "--ef-search",
        type=int,
        nargs="*",
        default=[32, 64, 128, 256, 512],
        help="efSearch values to sweep on every HNSW index (search only, no rebuild); empty: no sweep",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the query batch (median)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """n float32 vectors around random centres, made in chunks so 1M x 576 never needs a float64 copy."""
    d = centres.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    chunk = 65_536
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.integers(0, centres.shape[0], size=m)
        out[start : start + m] = centres[which] + noise * rng.standard_normal((m, d), dtype=np.float32)
    return out


def time_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int) -> dict[str, float]:
    """Median ms per query for a batch of queries and for the same queries one at a time."""
    index.search(queries[:1], k)  # warm-up
    batch = []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, k)
        batch.append(time.perf_counter() - start)
    single = []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        for q in queries:
            index.search(q[None], k)
        single.append(time.perf_counter() - start)
    n = queries.shape[0]
    return {"batch_ms_per_query": median(batch) * 1e3 / n, "single_ms_per_query": median(single) * 1e3 / n}


def ef_sweep(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace, recall_at_k: Callable
) -> list[dict[str, float]]:
    """Recall@k and query time of an HNSW index at several efSearch values (the beam width at query time)."""
    saved = index.hnsw.efSearch
    rows = []
    try:
        for ef in args.ef_search:
            index.hnsw.efSearch = ef
            _, found = index.search(queries, args.k)
            t = time_search(index, queries, args.k, max(1, args.repeats // 2))
            rows.append({"ef_search": ef, "recall_at_k": float(recall_at_k(found, truth, args.k)), **t})
    finally:
        index.hnsw.efSearch = saved
    return rows


def run_size(
    n: int, args: argparse.Namespace, centres: np.ndarray, queries: np.ndarray, api: tuple
) -> dict[str, Any]:
    build_index, recall_at_k, exact_limit, _ = api
    rng = np.random.default_rng(args.seed + n)
    t0 = time.perf_counter()
    vectors = clustered(n, centres, args.noise, rng)
    gen_s = time.perf_counter() - t0

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    _, truth = exact.search(queries, args.k)
    flat_times = time_search(exact, queries, args.k, args.repeats)
    del exact

    t0 = time.perf_counter()
    index = build_index(vectors, exact_limit=exact_limit)
    build_s = time.perf_counter() - t0
    _, found = index.search(queries, args.k)
    times = time_search(index, queries, args.k, args.repeats)
    row = {
        "n": n,
        "index": type(index).__name__,
        "build_s": build_s,
        "generate_s": gen_s,
        "batch_ms_per_query": times["batch_ms_per_query"],
        "single_ms_per_query": times["single_ms_per_query"],
        "recall_at_k": float(recall_at_k(found, truth, args.k)),
        "flat_batch_ms_per_query": flat_times["batch_ms_per_query"],
        "flat_single_ms_per_query": flat_times["single_ms_per_query"],
        "vectors_gb": vectors.nbytes / 2**30,
        "peak_rss_gb_so_far": peak_rss_bytes() / 2**30,
    }
    if args.compare_hnsw and not hasattr(index, "hnsw"):
        del index
        t0 = time.perf_counter()
        hnsw = build_index(vectors, exact_limit=0)  # 0: always the approximate index
        row["hnsw_build_s"] = time.perf_counter() - t0
        _, found = hnsw.search(queries, args.k)
        row["hnsw_recall_at_k"] = float(recall_at_k(found, truth, args.k))
        hnsw_times = time_search(hnsw, queries, args.k, args.repeats)
        row["hnsw_batch_ms_per_query"] = hnsw_times["batch_ms_per_query"]
        row["hnsw_single_ms_per_query"] = hnsw_times["single_ms_per_query"]
        index = hnsw
    if hasattr(index, "hnsw") and args.ef_search:
        row["ef_search_sweep"] = ef_sweep(index, queries, truth, args, recall_at_k)
    if hasattr(index, "hnsw"):
        row["hnsw_M"] = int(index.hnsw.nb_neighbors(1))
        row["hnsw_efSearch"] = int(index.hnsw.efSearch)
        row["hnsw_efConstruction"] = int(index.hnsw.efConstruction)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sizes is None:
        args.sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    threads = apply_threads(args.threads)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    api = _store_api()
    if args.exact_limit is not None:
        api = (api[0], api[1], args.exact_limit, api[3])
    info = machine_info(device="cpu", dtype="float32", threads=threads)
    info["faiss_version"] = faiss.__version__
    info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    if args.device != "cpu":
        print(f"[{NAME}] FAISS runs on the CPU here (faiss-cpu); --device {args.device} ignored")

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    queries = clustered(args.queries, centres, args.noise, rng)
    rows = []
    for n in sorted(args.sizes):
        print(f"[{NAME}] n={n} ...", flush=True)
        rows.append(run_size(n, args, centres, queries, api))

    print_table(
        rows,
        [
            ("n", "vectors", "d"),
            ("index", "index (auto)", "s"),
            ("build_s", "build s", ".2f"),
            ("batch_ms_per_query", f"ms/query (batch {args.queries})", ".3f"),
            ("single_ms_per_query", "ms/query (one by one)", ".3f"),
            ("recall_at_k", f"recall@{args.k}", ".4f"),
            ("flat_batch_ms_per_query", "exact ms/query (batch)", ".3f"),
            ("flat_single_ms_per_query", "exact ms/query (one)", ".3f"),
        ],
        title=f"FAISS inner-product search, d={args.dim} (functions from {api[3]}, exact_limit={api[2]})",
    )
    if args.compare_hnsw:
        print_table(
            [r for r in rows if "hnsw_build_s" in r],
            [
                ("n", "vectors", "d"),
                ("hnsw_build_s", "HNSW build s", ".1f"),
                ("hnsw_batch_ms_per_query", "HNSW ms/query (batch)", ".3f"),
                ("hnsw_single_ms_per_query", "HNSW ms/query (one)", ".3f"),
                ("hnsw_recall_at_k", f"HNSW recall@{args.k}", ".4f"),
            ],
            title="HNSW at the sizes that got an exact index (for comparison)",
        )
    sweeps = [{"n": r["n"], **e} for r in rows for e in r.get("ef_search_sweep", [])]
    if sweeps:
        print_table(
            sweeps,
            [
                ("n", "vectors", "d"),
                ("ef_search", "efSearch", "d"),
                ("recall_at_k", f"recall@{args.k}", ".4f"),
                ("batch_ms_per_query", "ms/query (batch)", ".3f"),
                ("single_ms_per_query", "ms/query (one)", ".3f"),
            ],
            title="HNSW efSearch sweep (M and efConstruction as built by the store)",
        )
    payload = {
        "benchmark": NAME,
        "machine": finish_machine_info(info),
        "settings": {
            "dim": args.dim,
            "queries": args.queries,
            "k": args.k,
            "clusters": args.clusters,
            "noise": args.noise,
            "exact_limit": api[2],
            "functions_from": api[3],
            "repeats": args.repeats,
            "compare_hnsw": args.compare_hnsw,
            "ef_search_sweep": args.ef_search,
            "quick": args.quick,
            "seed": args.seed,
        },
        "results": rows,
    }
    write_results(NAME, payload, args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
