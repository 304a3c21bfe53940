"""A real ``hmtqa serve`` process on 127.0.0.1 for the soak and hostile-input benchmarks.

The server runs in its own process, as users meet it: the benchmark's client threads share nothing
with it but the loopback socket, and its stderr is kept to look for tracebacks afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
WARM_UP_NOTE = "Warm-up note. The patient takes aspirin 75 mg daily and has no bleeding."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackServer:
    url: str
    root: Path  # holds the shared store, the session root and the server's log
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def sessions(self) -> list[Path]:
        folder = self.root / "sessions"
        return sorted(folder.glob("session-*")) if folder.is_dir() else []


def model_args(tiny: bool) -> list[str]:
    """``hmtqa`` model flags: the tiny random model (smoke runs, tests) or the defaults (real runs)."""
    return ["--backbone", "tiny-random", "--checkpoint", "none"] if tiny else []


@contextmanager
def serve(root: Path, *, tiny: bool, extra: list[str] | None = None, ready_s: float = 600) -> Iterator[LoopbackServer]:
    """Run ``hmtqa serve`` on a free loopback port until the block ends (then SIGTERM, as a service
    manager would). Waits until the page answers and the model has loaded."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "hmtqa", "serve", "--port", str(port),
        "--store", str(root / "shared"), "--session-root", str(root / "sessions"),
        *model_args(tiny), *(extra or []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LoopbackServer(f"http://127.0.0.1:{port}/", root, proc, log)
    try:
        _wait_ready(server, ready_s)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(server: LoopbackServer, timeout_s: float) -> None:
    """The page is served at once; the model loads behind it. Ready = an ingest went through."""
    from gradio_client import Client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(server.url, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise TimeoutError(f"the server did not answer within {timeout_s:.0f} s")
    # An ingest waits for the model to load; a short note also warms the model up.
    client = Client(server.url, verbose=False)
    client.predict(files=[], text=WARM_UP_NOTE, save_to_shared=False, api_name="/ingest")
