"""Shared test setup: offline hub, deterministic seeds, tiny random backbones."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads, and OpenMP threads spinning against other busy processes
# slow a 2-core machine down 50-fold. HMTQA_TEST_THREADS raises it for the SmolLM2 tests.
torch.set_num_threads(int(os.environ.get("HMTQA_TEST_THREADS", "1")))

from tests.tiny import tiny_backbone  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def llama():
    return tiny_backbone("llama")
