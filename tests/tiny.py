"""Tiny random causal LMs (2 layers, width 64) of several families, built from a config offline."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
WIDTH = 64


def tiny_backbone(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=2048)
        model = GPT2LMHeadModel(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.config._attn_implementation = "sdpa"
    model.config.hmt_backbone_name = f"tiny-{family}"
    return model.eval()



def tolerance(dtype: torch.dtype, rel: float = 1e-5, abs: float = 1e-6) -> dict[str, float]:
    """``pytest.approx`` tolerances for a value a model computed in ``dtype``, against a float64 reference.

    ``rel`` and ``abs`` are the float32 ones. A dtype of fewer mantissa bits (bfloat16: 8, eps 2**-7)
    allows 4 of its ulps relative, and widens ``abs`` in the same proportion.
    """
    if dtype == torch.float32:
        return {"rel": rel, "abs": abs}
    wider = max(rel, 4 * torch.finfo(dtype).eps)
    return {"rel": wider, "abs": abs * wider / rel}
