"""HMT: the Hierarchical Memory Transformer (He et al., NAACL 2025) as a plug-in for causal LMs."""

from .backbone import DEFAULT_BACKBONE, load_backbone, native_bfloat16, resolve_dtype
from .config import MODES, HMTConfig
from .memory import MemoryRecall, MemoryState
from .model import HMTModel, HMTOutput, SegmentRecord

__all__ = [
    "DEFAULT_BACKBONE",
    "MODES",
    "HMTConfig",
    "HMTModel",
    "HMTOutput",
    "MemoryRecall",
    "MemoryState",
    "SegmentRecord",
    "load_backbone",
    "native_bfloat16",
    "resolve_dtype",
]
