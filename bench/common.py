"""Shared helpers of the benchmarks: arguments, machine info, timing, token sources, tables, JSON.

Every benchmark records the machine it ran on next to its numbers, because throughput on a shared
CPU means little without the CPU model, the thread count and how loaded the machine was.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Offline before transformers is imported anywhere: the embedded backbone needs no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PG19_BOOK = Path("pg19") / "pg1342_pride_and_prejudice.txt"


# ---------------------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark shares; each script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). On a CPU shared with another job, 1 is "
        "often faster than oversubscribing the cores.",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="shared data folder (default: $HMTQA_DATA_DIR, else ../shared/data beside the repo); "
        "synthetic token ids when it is missing",
    )
    p.add_argument("--out", default=None, help="JSON result path (default: bench/results/<name>.json)")
    return p


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count if asked; return the count in effect (it goes into the JSON)."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(*, device: str, dtype: str | Sequence[str] | None, threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, library versions, threads, dtype, load, date."""
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "dtype": dtype if isinstance(dtype, str) or dtype is None else list(dtype),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        # A busy machine (e.g. a training job beside us) slows everything: keep the load with the numbers.
        info["loadavg_1_5_15_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def finish_machine_info(info: dict[str, Any]) -> dict[str, Any]:
    """Add the load at the end of the run (the load during it lies somewhere between)."""
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ---------------------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_cpu(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call of ``fn``.

    CPU time counts only the cycles this process got, so it barely moves when another job takes the
    cores for a while; wall time is what a user waits. On an idle machine with one thread they agree.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: str | torch.device = "cpu"
) -> dict[str, list[tuple[float, float]]]:
    """Time each function ``repeats`` times, round-robin (a, b, a, b, ...): (wall, cpu) per call.

    Round-robin matters on a shared machine: whatever else runs slows every candidate alike, so ratios
    of neighbouring measurements stay meaningful even when absolute numbers drift. The order flips on
    every other round so that neither candidate always runs right after the other.
    """
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(timed_cpu(fns[name], device))
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ---------------------------------------------------------------------------------------- token source
def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The shared data folder: the argument, else $HMTQA_DATA_DIR, else ../shared/data; None if absent.

    Uses ``qa_pipeline.train_data.data_dir``'s lookup, but a missing folder is not an error:
    throughput does not depend on which tokens are read, so benchmarks fall back to synthetic ids.
    """
    from qa_pipeline.train_data import data_dir as shared_data_dir

    try:
        return shared_data_dir(explicit)
    except FileNotFoundError:
        return None


def text_token_ids(
    tokenizer: Any, n_tokens: int, data_dir_arg: str | os.PathLike | None = None, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """(1, n_tokens) token ids of real text (a PG-19 book, repeated if too short), else synthetic ids.

    Returns the ids and a short description of where they came from (it goes into the JSON).
    """
    root = data_dir(data_dir_arg)
    book = root / PG19_BOOK if root is not None else None
    if book is not None and book.is_file():
        ids = tokenizer(book.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        reps = -(-n_tokens // len(ids))
        source = f"{PG19_BOOK} ({len(ids)} tokens{f', repeated x{reps}' if reps > 1 else ''})"
        return torch.tensor((ids * reps)[:n_tokens], dtype=torch.long)[None], source
    return synthetic_token_ids(tokenizer, n_tokens, seed), "synthetic uniform token ids (no data folder)"


def synthetic_token_ids(tokenizer: Any, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Uniform random ids below the special tokens' range; deterministic for a seed."""
    vocab = int(getattr(tokenizer, "vocab_size", None) or len(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    # Skip the first few ids: SmolLM2 (and many BPE vocabularies) put special tokens there.
    return torch.randint(16, vocab, (1, n_tokens), generator=generator)


# ---------------------------------------------------------------------------------------- output
def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], title: str = "") -> None:
    """Print ``rows`` as an aligned text table; ``columns`` = (key, header, format spec)."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)

    body = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)))
    sys.stdout.flush()


def result_path(name: str, out: str | os.PathLike | None = None, quick: bool = False) -> Path:
    """``out`` if given, else ``bench/results/<name>.json`` (``<name>_quick.json`` for --quick runs,
    so that a smoke run never overwrites the numbers of a full one)."""
    if out:
        return Path(out)
    return RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"


def write_results(
    name: str, payload: dict[str, Any], out: str | os.PathLike | None = None, quick: bool | None = None
) -> Path:
    """Write ``payload`` as JSON to :func:`result_path`, atomically (temp file + rename).

    ``quick=None`` reads the flag from ``payload["settings"]["quick"]`` (or ``payload["quick"]``), so
    every benchmark's smoke run lands in ``<name>_quick.json`` without each script having to say so.
    """
    if quick is None:
        settings = payload.get("settings")
        quick = bool((settings.get("quick") if isinstance(settings, dict) else None) or payload.get("quick"))
    path = result_path(name, out, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, default=_json_default)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read and committed
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"\nwrote {path}")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
