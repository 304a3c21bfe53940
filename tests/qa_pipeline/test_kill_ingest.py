"""kill -9 during ingestion, 10 rounds at random moments of a run: the store opens, every document is in it
whole or not at all, and nothing written before changed (README, "Reliability")."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qa_pipeline.store import MemoryStore

ROUNDS = 10


def _text(round_: int, i: int) -> str:
    words = [f"w{(round_ * 7 + i * 13 + k) % 97}" for k in range(400 + 150 * i)]
    return f"Document {round_}-{i}. " + " ".join(words) + "."


def _digest(store: MemoryStore, doc_id: str) -> str:
    h = hashlib.sha256(store.get_text(doc_id).encode())
    for name, arr in sorted(store.arrays(doc_id).items()):
        h.update(name.encode() + np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


@pytest.mark.timeout(600)
def test_kill_9_during_ingestion_leaves_every_document_whole_or_absent(tmp_path):
    rng = random.Random(0)
    store_dir = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    before: dict[str, str] = {}
    texts: dict[str, str] = {}
    killed = 0
    duration = None
    for r in range(ROUNDS + 1):
        files = []
        for i in range(4):
            path = tmp_path / f"r{r}-d{i}.txt"
            path.write_text(_text(r, i))
            files.append(str(path))
            texts[path.stem] = path.read_text()
        cmd = [
            sys.executable,
            "-m",
            "hmtqa",
            "ingest",
            *files,
            "--store",
            str(store_dir),
            "--backbone",
            "tiny-random",
            "--checkpoint",
            "none",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if duration is None:  # round 0 runs to the end: how long a whole run takes on this machine
            assert proc.wait() == 0
            duration = time.monotonic() - start
        else:  # then a kill at a random moment of the run (start-up included)
            time.sleep(rng.uniform(0.3, 0.97) * duration)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait()
        with MemoryStore.open(store_dir, None) as store:  # opens, read-only, after every kill
            for info in store.list_documents():
                assert store.get_text(info.doc_id) == texts[info.doc_id]  # whole text
                arrays = store.arrays(info.doc_id)
                assert len(store.segments(info.doc_id)) == info.n_segments == arrays["recall_key"].shape[0]
                assert store.search(arrays["recall_key"][0], doc_id=info.doc_id, k=1)[0][1] == 0
                if info.doc_id in before:
                    assert _digest(store, info.doc_id) == before[info.doc_id]  # unchanged
                else:
                    before[info.doc_id] = _digest(store, info.doc_id)
    assert killed >= ROUNDS - 2  # the rounds were really interrupted
    # The next writer clears what killed writers left half-written.
    with MemoryStore.open(store_dir, None) as reader:
        fingerprint = reader.fingerprint
    with MemoryStore.open(store_dir, fingerprint) as store:
        assert not any((store_dir / ".tmp").iterdir())
        assert {d.doc_id for d in store.list_documents()} == set(before)
    print(f"kill -9: {killed} of {ROUNDS} rounds killed mid-run; {len(before)} documents stored, all whole")
