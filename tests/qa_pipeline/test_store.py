"""Tests of the persistent memory store (SQLite + safetensors + FAISS in one folder)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from qa_pipeline import store as store_mod
from qa_pipeline.store import (
    DocumentExists,
    DocumentInfo,
    MemoryStore,
    SegmentInfo,
    StoreError,
    StoreMismatch,
    UnknownDocument,
    build_index,
    recall_at_k,
)

D = 16
FP = {
    "backbone": "smollm2-135m-instruct",
    "hmt_checkpoint": "ab" * 32,
    "hidden_size": 576,
    "recall_dim": 576,
    "segment_length": 256,
    "sensory_length": 32,
    "mode": "hmt",
}


def make_doc(n: int, seed: int = 0) -> dict:
    """Random document with n segments of 10 tokens / 20 characters each."""
    rng = np.random.default_rng(seed)
    text = "".join(f"seg{i:03d} " + "x" * 13 for i in range(n))
    segments = [SegmentInfo("", i, 10 * i, 10 * i + 10, 20 * i, 20 * i + 20) for i in range(n)]
    arrays = {
        "summary": rng.standard_normal((n, D)).astype(np.float32),
        "memory": rng.standard_normal((n, D)).astype(np.float32),
        "recall_key": rng.standard_normal((n, D)).astype(np.float32),
        "state.memories": rng.standard_normal((min(n, 3), D)).astype(np.float32),
        "state.segment_ids": np.arange(min(n, 3), dtype=np.int64),
        "state.sensory_ids": np.arange(4, dtype=np.int64),
    }
    return {
        "title": f"Doc {seed}",
        "source": "test",
        "text": text,
        "metadata": {"seed": seed},
        "segments": segments,
        "arrays": arrays,
    }


def doc_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "docs").iterdir())


def tmp_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".tmp").iterdir())


@pytest.fixture
def st(tmp_path):
    with MemoryStore.open(tmp_path / "store", FP) as s:
        yield s


def test_round_trip_and_layout(st: MemoryStore) -> None:
    doc = make_doc(5)
    info = st.add_document("pmid-1", **doc)
    assert isinstance(info, DocumentInfo)
    assert (info.doc_id, info.title, info.n_segments, info.n_tokens, info.metadata) == (
        "pmid-1",
        "Doc 0",
        5,
        50,
        {"seed": 0},
    )
    assert st.get_document("pmid-1") == info
    assert st.get_text("pmid-1") == doc["text"]
    expected = [SegmentInfo("pmid-1", i, 10 * i, 10 * i + 10, 20 * i, 20 * i + 20) for i in range(5)]
    assert st.segments("pmid-1") == expected
    back = st.arrays("pmid-1")
    assert set(back) == set(doc["arrays"])
    for name, arr in doc["arrays"].items():
        np.testing.assert_array_equal(back[name], arr)
        assert back[name].dtype == arr.dtype
    assert set(st.arrays("pmid-1", ["memory"])) == {"memory"}
    with pytest.raises(KeyError, match="stored: "):
        st.arrays("pmid-1", ["nope"])
    # Layout: one folder per document with safetensors + one FAISS file per indexed array.
    (folder,) = doc_dirs(st.root)
    assert sorted(p.name for p in (st.root / "docs" / folder).iterdir()) == [
        "recall_key.faiss",
        "tensors.safetensors",
    ]
    assert (st.root / "store.sqlite").is_file()
    assert st.fingerprint == FP and "pmid-1" in st and len(st) == 1
    # WAL mode so other processes can read while one writes.
    with sqlite3.connect(st.root / "store.sqlite") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {r[0] for r in raw.execute("SELECT key FROM meta")} >= {"schema_version", "fingerprint"}


def test_tuple_segments_accepted(st: MemoryStore) -> None:
    doc = make_doc(3)
    doc["segments"] = [(s.token_start, s.token_end, s.char_start, s.char_end) for s in doc["segments"]]
    st.add_document("t", **doc)
    assert [s.idx for s in st.segments("t")] == [0, 1, 2]


def test_search_finds_planted_vector_with_exact_scores(st: MemoryStore) -> None:
    rng = np.random.default_rng(1)
    query = rng.standard_normal(D).astype(np.float32)
    a, b = make_doc(20, seed=1), make_doc(30, seed=2)
    b["arrays"]["recall_key"][17] = 5 * query  # by far the largest inner product
    st.add_document("a", **a, indexed=("recall_key", "summary"))
    st.add_document("b", **b)

    hits = st.search(query, doc_id="b", k=5)
    assert hits[0][:2] == ("b", 17)
    keys = b["arrays"]["recall_key"]
    exact = keys @ query
    assert [i for _, i, _ in hits] == list(np.argsort(-exact)[:5])
    np.testing.assert_allclose([s for *_, s in hits], exact[[i for _, i, _ in hits]], rtol=1e-5)

    # Across all documents: the merged list is the exact top-k over both.
    hits = st.search(query, k=8)
    assert hits[0][:2] == ("b", 17)
    every = [("a", i, float(s)) for i, s in enumerate(a["arrays"]["recall_key"] @ query)]
    every += [("b", i, float(s)) for i, s in enumerate(exact)]
    every.sort(key=lambda t: -t[2])
    assert [h[:2] for h in hits] == [e[:2] for e in every[:8]]
    np.testing.assert_allclose([h[2] for h in hits], [e[2] for e in every[:8]], rtol=1e-5)

    # Batch of queries, another index, k larger than the document.
    batch = st.search(np.stack([query, -query]), index="summary", doc_id="a", k=100)
    assert len(batch) == 2 and all(len(h) == 20 for h in batch)
    with pytest.raises(ValueError, match="width"):
        st.search(np.zeros(D + 1), doc_id="a")
    with pytest.raises(StoreError, match="no 'memory' index"):
        st.search(query, index="memory", doc_id="a")


def test_index_cache_avoids_rereading(st: MemoryStore, monkeypatch) -> None:
    st.add_document("a", **make_doc(4))
    calls = []
    real = store_mod.files.read_index_file
    monkeypatch.setattr(store_mod.files, "read_index_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        st.search(np.ones(D), doc_id="a")
    assert len(calls) == 1


def test_list_delete_and_answers(st: MemoryStore) -> None:
    for i, name in enumerate(["x", "y", "z"]):
        st.add_document(name, **make_doc(2, seed=i))
    aid = st.add_answer(
        "y", "Is it?", "hmt", {"answer": "yes", "weights": np.array([0.25, 0.75]), "k": np.int64(2)}
    )
    st.add_answer("x", "Why?", "rag", {"answer": "because"})
    (rec,) = st.answers("y")
    assert (rec["id"], rec["question"], rec["mode"]) == (aid, "Is it?", "hmt")
    assert rec["answer"] == {"answer": "yes", "weights": [0.25, 0.75], "k": 2}
    assert [a["doc_id"] for a in st.answers()] == ["y", "x"]

    st.delete_document("y")
    assert [d.doc_id for d in st.list_documents()] == ["x", "z"]
    assert len(doc_dirs(st.root)) == 2 and tmp_entries(st.root) == []
    assert st.answers("y") == []
    assert {h[0] for h in st.search(np.ones(D), k=100)} == {"x", "z"}
    with pytest.raises(UnknownDocument):
        st.delete_document("y")
    with pytest.raises(UnknownDocument):
        st.add_answer("y", "q", "hmt", {})


def test_unknown_id_message(st: MemoryStore) -> None:
    with pytest.raises(UnknownDocument, match="store is empty"):
        st.get_document("nope")
    st.add_document("a", **make_doc(1))
    st.add_document("b", **make_doc(1))
    with pytest.raises(UnknownDocument) as err:
        st.get_text("nope")
    assert str(err.value) == "unknown document id 'nope'; known: a, b"
    assert isinstance(err.value, KeyError) and isinstance(err.value, StoreError)
    for i in range(10):
        st.add_document(f"d{i}", text="", segments=[], arrays={})
    with pytest.raises(UnknownDocument, match=r"known: a, b, d0, .*d7, \.\.\. \(2 more\)$"):
        st.segments("nope")


def test_readd_refused_replace_swaps(st: MemoryStore) -> None:
    st.add_document("a", **make_doc(4, seed=1))
    st.add_document("b", **make_doc(1))
    before = doc_dirs(st.root)
    with pytest.raises(DocumentExists, match="replace=True"):
        st.add_document("a", **make_doc(6, seed=2))
    assert doc_dirs(st.root) == before and st.get_document("a").n_segments == 4

    new = make_doc(6, seed=2)
    st.add_document("a", **new, replace=True)
    assert st.get_document("a").n_segments == 6 and len(st.segments("a")) == 6
    assert [d.doc_id for d in st.list_documents()] == ["a", "b"]  # keeps its place
    np.testing.assert_array_equal(st.arrays("a")["recall_key"], new["arrays"]["recall_key"])
    assert len(doc_dirs(st.root)) == 2 and doc_dirs(st.root) != before and tmp_entries(st.root) == []
    q = new["arrays"]["recall_key"][3]
    assert st.search(q, doc_id="a", k=6)[0][1] == int(np.argmax(new["arrays"]["recall_key"] @ q))


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["sql", "rename"])
def test_crash_mid_add_leaves_store_unchanged(
    st: MemoryStore, monkeypatch, exc: BaseException, where: str
) -> None:
    st.add_document("a", **make_doc(3, seed=1))
    docs_before, dirs_before = st.list_documents(), doc_dirs(st.root)
    old_keys = st.arrays("a")["recall_key"]

    def boom(*args, **kwargs):
        raise exc

    if where == "sql":
        monkeypatch.setattr(store_mod.catalogue.Catalogue, "insert_rows", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    for doc_id, replace in [("b", False), ("a", True)]:
        with pytest.raises(type(exc)):
            st.add_document(doc_id, **make_doc(5, seed=9), replace=replace)
        assert st.list_documents() == docs_before
        assert doc_dirs(st.root) == dirs_before and tmp_entries(st.root) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(st.arrays("a")["recall_key"], old_keys)
    st.add_document("b", **make_doc(2))  # the store still works
    assert len(st) == 2


def test_leftovers_of_killed_writer_removed_on_open(tmp_path) -> None:
    root = tmp_path / "store"
    with MemoryStore.open(root, FP) as s:
        s.add_document("a", **make_doc(2))
        keep = doc_dirs(root)
    (root / ".tmp" / "half-written").mkdir()
    (root / ".tmp" / "half-written" / "tensors.safetensors").write_bytes(b"\0" * 10)
    (root / "docs" / "orphan-0123456789-deadbeef").mkdir()
    with MemoryStore.open(root, FP) as s:
        assert doc_dirs(root) == keep and tmp_entries(root) == []
        assert [d.doc_id for d in s.list_documents()] == ["a"]


def test_second_instance_sees_writes(tmp_path) -> None:
    root = tmp_path / "store"
    with MemoryStore.open(root, FP) as writer, MemoryStore.open(root, None) as reader:
        assert reader.list_documents() == []
        writer.add_document("a", **make_doc(3, seed=1))
        assert [d.doc_id for d in reader.list_documents()] == ["a"]
        q = np.ones(D, np.float32)
        assert reader.search(q, doc_id="a", k=3) == writer.search(q, doc_id="a", k=3)
        new = make_doc(4, seed=2)
        writer.add_document("a", **new, replace=True)
        # The reader's cached index belonged to the old folder; it must see the new version.
        assert len(reader.search(q, doc_id="a", k=10)) == 4
        np.testing.assert_array_equal(reader.arrays("a")["summary"], new["arrays"]["summary"])
        writer.delete_document("a")
        assert reader.search(q, k=10) == [] and "a" not in reader


def test_many_openers_of_one_new_store_all_succeed(tmp_path) -> None:
    """Processes (here threads) that create the same new store at once see one store, not an error."""
    import threading

    def open_it(root: Path, barrier: threading.Barrier, errors: list[str]) -> None:
        barrier.wait()
        try:
            MemoryStore.open(root, fingerprint=FP).close()
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(repr(exc))

    for attempt in range(10):
        barrier, errors = threading.Barrier(6), []
        args = (tmp_path / f"s{attempt}", barrier, errors)
        threads = [threading.Thread(target=open_it, args=args) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_fingerprint_mismatch_refused(tmp_path) -> None:
    root = tmp_path / "store"
    MemoryStore.open(root, FP).close()
    other = {**FP, "hidden_size": 960, "mode": "rmt"}
    with pytest.raises(StoreMismatch) as err:
        MemoryStore.open(root, other)
    msg = str(err.value)
    assert "hidden_size: store has 576, requested 960" in msg
    assert 'mode: store has "hmt", requested "rmt"' in msg
    assert "--store" in msg and "backbone" not in msg
    with pytest.raises(StoreMismatch, match="extra: store has <missing>"):
        MemoryStore.open(root, {**FP, "extra": 1})
    # Key order does not matter.
    MemoryStore.open(root, dict(reversed(list(FP.items())))).close()
    # fingerprint=None: no check, read-only for documents.
    with MemoryStore.open(root) as ro:
        assert ro.fingerprint == FP and not ro.writable
        with pytest.raises(StoreError, match="read-only"):
            ro.add_document("a", **make_doc(1))


def test_fingerprint_adopted_by_store_created_without_one(tmp_path) -> None:
    root = tmp_path / "store"
    with MemoryStore.open(root) as s:
        assert s.fingerprint is None
    with MemoryStore.open(root, {"dims": (1, 2)}) as s:
        assert s.fingerprint == {"dims": [1, 2]}
    MemoryStore.open(root, {"dims": [1, 2]}).close()


def test_open_refuses_non_store_folders(tmp_path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a memory store"):
        MemoryStore.open(other, FP)
    assert sorted(p.name for p in other.iterdir()) == ["thesis.txt"]
    with pytest.raises(StoreError, match="no memory store"):
        MemoryStore.open(tmp_path / "missing", FP, create=False)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(StoreError, match="is a file"):
        MemoryStore.open(other / "thesis.txt", FP)
    empty = tmp_path / "empty"
    empty.mkdir()
    MemoryStore.open(empty, FP).close()  # an empty folder becomes a store


def test_unsafe_doc_ids_stay_inside_store(tmp_path) -> None:
    root = tmp_path / "inner" / "store"
    ids = ["../evil", "a/b", "", "..", "/abs/path", "a\\b", "ünï cödé"]
    with MemoryStore.open(root, FP) as s:
        for i, doc_id in enumerate(ids):
            s.add_document(doc_id, **make_doc(2, seed=i))
        assert [d.doc_id for d in s.list_documents()] == ids
        for i, doc_id in enumerate(ids):
            np.testing.assert_array_equal(s.arrays(doc_id)["memory"], make_doc(2, seed=i)["arrays"]["memory"])
        names = doc_dirs(root)
    assert len(names) == len(ids)
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]
    assert sorted(p.name for p in (tmp_path / "inner").iterdir()) == ["store"]


def test_bad_input_rejected_without_writing(st: MemoryStore) -> None:
    doc = make_doc(3)
    doc["arrays"]["memory"] = doc["arrays"]["memory"][:2]
    with pytest.raises(ValueError, match="'memory' has shape \\(2, 16\\) but the document has 3 segments"):
        st.add_document("a", **doc)
    bad_seg = make_doc(3)
    bad_seg["segments"][1] = SegmentInfo("", 5, 0, 1, 0, 1)
    with pytest.raises(ValueError, match="idx 5"):
        st.add_document("a", **bad_seg)
    past = make_doc(3)
    past["segments"][2] = SegmentInfo("", 2, 20, 30, 40, 999)
    with pytest.raises(ValueError, match="past the text"):
        st.add_document("a", **past)
    nan = make_doc(3)
    nan["arrays"]["summary"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        st.add_document("a", **nan)
    with pytest.raises(ValueError, match="cannot index array 'keys'"):
        st.add_document("a", **make_doc(3), indexed=["keys"])
    assert st.list_documents() == [] and doc_dirs(st.root) == [] and tmp_entries(st.root) == []


def test_closed_store_raises(tmp_path) -> None:
    s = MemoryStore.open(tmp_path / "s", FP)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_documents()


def test_build_index_and_recall_exported() -> None:
    vecs = np.random.default_rng(0).standard_normal((120, D)).astype(np.float32)
    flat, hnsw = build_index(vecs, exact_limit=200), build_index(vecs, exact_limit=50)
    assert type(flat).__name__ == "IndexFlatIP" and type(hnsw).__name__ == "IndexHNSWFlat"
    _, a = flat.search(vecs[:10], 10)
    _, b = build_index(vecs).search(vecs[:10], 10)
    assert recall_at_k(a, b, 10) == 1.0


def test_deleted_text_is_gone_from_the_database_and_its_wal(tmp_path) -> None:
    root = tmp_path / "store"
    secret = "PATIENT-NAME-ZQXJ " * 40
    with MemoryStore.open(root, FP) as st:
        doc = make_doc(3)
        st.add_document("keep", **make_doc(2, seed=1))
        st.add_document("secret", **{**doc, "text": secret + doc["text"]})
        st.add_answer("secret", "Who is PATIENT-NAME-ZQXJ?", "hmt", {"answer": "PATIENT-NAME-ZQXJ"})
        st.delete_document("secret")
        files = [p for p in root.iterdir() if p.name.startswith("store.sqlite")]
        assert files and not any(b"ZQXJ" in p.read_bytes() for p in files)
        assert st.get_text("keep")  # the rest is intact


def test_a_reader_takes_no_write_lock_and_leaves_leftovers_to_writers(tmp_path, monkeypatch) -> None:
    import sqlite3

    root = tmp_path / "store"
    with MemoryStore.open(root, FP) as s:
        s.add_document("a", **make_doc(2))
    (root / ".tmp" / "half-written").mkdir()
    # Another process is in the middle of a write: it holds SQLite's write lock.
    monkeypatch.setattr(store_mod.catalogue, "BUSY_TIMEOUT_S", 0.2)
    other = sqlite3.connect(str(root / "store.sqlite"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with MemoryStore.open(root, None) as reader:  # before: "database is locked" after the timeout
            assert [d.doc_id for d in reader.list_documents()] == ["a"] and not reader.writable
        assert tmp_entries(root) == ["half-written"]  # a reader does not delete what it finds
    finally:
        other.execute("ROLLBACK")
        other.close()
    with MemoryStore.open(root, FP):
        assert tmp_entries(root) == []  # the next writer cleans up
