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

# HMTQA_TEST_DTYPE=bfloat16 (or float32) runs the suite in the dtype that `auto` picks on another kind of
# CPU: a bfloat16-native Xeon, or an AVX2-only one. It sets the library's override of "auto", which
# subprocesses (CLI, torchrun) inherit too. Tolerances follow the dtype a test ran in (tests.tiny.tol).
if os.environ.get("HMTQA_TEST_DTYPE"):
    from hmt.backbone import AUTO_DTYPE_ENV, resolve_dtype  # noqa: E402

    resolve_dtype(os.environ["HMTQA_TEST_DTYPE"])  # an unknown name fails here, not in every test
    os.environ[AUTO_DTYPE_ENV] = os.environ["HMTQA_TEST_DTYPE"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def llama():
    return tiny_backbone("llama")
