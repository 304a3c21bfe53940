"""Soak: N API sessions ingest and ask at once against a real ``hmtqa serve`` on loopback.

Each session (its own gradio_client, so its own private store) loops until the deadline: paste a new
note, ask an open and a closed question about it, and check that every note it ingested is still
listed. The loop is bounded: no new round starts after ``--duration`` seconds, and the run ends when
the rounds in flight finish. Afterwards the server must still answer, its log must hold no traceback,
and on SIGTERM it must remove its session folders.

    python -m bench.soak                      # 8 sessions, 5 minutes, the default model
    python -m bench.soak --tiny --duration 20 # smoke run with the tiny random model
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.loopback import serve

DRUGS = ("warfarin", "heparin", "apixaban", "metformin", "digoxin", "amiodarone", "insulin", "lithium")
MODES = ("hmt+retrieval", "hmt")


def note_text(session: int, round_: int) -> str:
    """A short clinical note, different for every session and round (so every ingest is a new document)."""
    rng = random.Random(session * 10_000 + round_)
    drug = DRUGS[(session + round_) % len(DRUGS)]
    dose = rng.randint(1, 50) * 5
    lines = [
        f"Note {session}-{round_}. The patient was started on {drug} {dose} mg daily.",
        f"Follow-up after {rng.randint(2, 12)} weeks showed a stable course and no bleeding.",
        f"Renal function was {'normal' if rng.random() < 0.5 else 'reduced'}; the dose of {drug} was kept.",
    ]
    return " ".join(lines * 6)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(max(values)),
    }


class Session(threading.Thread):
    """One simulated user: rounds of ingest, ask (open), ask (closed), list, until the deadline."""

    def __init__(self, index: int, url: str, deadline: float) -> None:
        super().__init__(name=f"soak-{index}", daemon=True)
        self.index, self.url, self.deadline = index, url, deadline
        self.doc_ids: list[str] = []
        self.ask_s: list[float] = []
        self.ingest_s: list[float] = []
        self.errors: list[str] = []
        self.lost: list[str] = []
        self.client = None

    def run(self) -> None:
        from gradio_client import Client

        try:
            self.client = Client(self.url, verbose=False)
        except Exception as err:  # noqa: BLE001 - every failure is a finding of the soak
            self.errors.append(f"connect: {err}")
            return
        round_ = 0
        while time.monotonic() < self.deadline:
            try:
                self.one_round(round_)
            except Exception as err:  # noqa: BLE001
                self.errors.append(f"round {round_}: {type(err).__name__}: {err}")
            round_ += 1

    def one_round(self, round_: int) -> None:
        c = self.client
        t = time.perf_counter()
        _, doc_id, _ = c.predict(files=[], text=note_text(self.index, round_), save_to_shared=False, api_name="/ingest")
        self.ingest_s.append(time.perf_counter() - t)
        self.doc_ids.append(doc_id)
        mode = MODES[round_ % len(MODES)]
        for question, options in (("Which drug was started?", ""), ("Was the dose kept?", "yes, no, maybe")):
            t = time.perf_counter()
            answer, record = c.predict(doc_id=doc_id, question=question, mode=mode, options=options, api_name="/ask")
            self.ask_s.append(time.perf_counter() - t)
            if record.get("doc_id") != doc_id or record.get("question") != question:
                self.errors.append(f"round {round_}: an answer for another request: {record.get('doc_id')!r}")
            if options and answer not in ("yes", "no", "maybe"):
                self.errors.append(f"round {round_}: closed answer {answer!r} is not an option")
        self.check_listing()

    def check_listing(self) -> None:
        """Nothing lost: every document this session ingested is still in its listing."""
        listed = {d["doc_id"] for d in self.client.predict(api_name="/documents")}
        self.lost = [d for d in self.doc_ids if d not in listed]


def run(*, sessions: int, duration_s: float, tiny: bool, root: Path) -> dict:
    with serve(root, tiny=tiny) as server:
        start = time.monotonic()
        workers = [Session(i, server.url, start + duration_s) for i in range(sessions)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall_s = time.monotonic() - start
        for w in workers:  # a last look, after every session has stopped writing
            if w.client is not None:
                try:
                    w.check_listing()
                except Exception as err:  # noqa: BLE001
                    w.errors.append(f"final listing: {err}")
        from gradio_client import Client

        t = time.perf_counter()
        Client(server.url, verbose=False).predict(api_name="/documents")
        after_s = time.perf_counter() - t
        sessions_during = len(server.sessions())
    log = server.log_text()
    asks = [s for w in workers for s in w.ask_s]
    ingests = [s for w in workers for s in w.ingest_s]
    return {
        "sessions": sessions,
        "duration_s": duration_s,
        "wall_s": wall_s,
        "model": "tiny-random" if tiny else "default (SmolLM2-135M-Instruct + checkpoint)",
        "documents": sum(len(w.doc_ids) for w in workers),
        "asks": len(asks),
        "errors": [e for w in workers for e in w.errors],
        "lost": [d for w in workers for d in w.lost],
        "ask_latency_s": percentiles(asks),
        "ingest_latency_s": percentiles(ingests),
        "asks_per_session": [len(w.ask_s) for w in workers],
        "next_request_s": after_s,
        "session_folders_while_serving": sessions_during,
        "session_folders_after_shutdown": len(server.sessions()),
        "tracebacks_in_server_log": log.count("Traceback"),
    }


def passed(res: dict) -> bool:
    return (
        not res["errors"]
        and not res["lost"]
        and res["tracebacks_in_server_log"] == 0
        and res["session_folders_after_shutdown"] == 0
        and all(n > 0 for n in res["asks_per_session"])
    )


def report(res: dict) -> str:
    a, i = res["ask_latency_s"], res["ingest_latency_s"]
    return "\n".join([
        f"soak: {res['sessions']} sessions for {res['duration_s']:.0f} s ({res['wall_s']:.0f} s with the last rounds), "
        f"model {res['model']}",
        f"  {res['documents']} documents ingested, {res['asks']} questions answered "
        f"(per session: {', '.join(map(str, res['asks_per_session']))})",
        f"  ask latency   p50 {a['p50']:.2f} s, p95 {a['p95']:.2f} s, max {a['max']:.2f} s" if a["p50"] is not None else "  no asks",
        f"  ingest latency p50 {i['p50']:.2f} s, p95 {i['p95']:.2f} s" if i["p50"] is not None else "  no ingests",
        f"  errors {len(res['errors'])}, documents lost {len(res['lost'])}, tracebacks in the server log "
        f"{res['tracebacks_in_server_log']}, next request after the soak {res['next_request_s']:.2f} s",
        f"  session folders: {res['session_folders_while_serving']} while serving, "
        f"{res['session_folders_after_shutdown']} after SIGTERM",
        "  PASS" if passed(res) else "  FAIL: " + "; ".join(res["errors"][:5] + res["lost"][:5]),
    ])


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--duration", type=float, default=300.0, help="seconds during which new rounds start")
    p.add_argument("--tiny", action="store_true", help="the tiny random model instead of the default one")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.duration = min(ns.duration, 20.0)
    info = common.machine_info(device="cpu", dtype="bfloat16", threads=0)
    with tempfile.TemporaryDirectory(prefix="hmtqa-soak-") as tmp:
        res = run(sessions=ns.sessions, duration_s=ns.duration, tiny=ns.tiny, root=Path(tmp))
    res["machine"] = common.finish_machine_info(info)
    print(report(res))
    if not ns.tiny:
        res["quick"] = ns.quick
        common.write_results("soak", res, ns.out)
    return 0 if passed(res) else 1


if __name__ == "__main__":
    sys.exit(main())
