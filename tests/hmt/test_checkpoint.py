"""save_pretrained / from_pretrained and backbone loading."""

import json

import pytest
import torch
from torch.testing import assert_close

from hmt import HMTConfig, HMTModel, load_backbone
from hmt.backbone import resolve_dtype
from tests.tiny import VOCAB, tiny_backbone

CFG = HMTConfig(segment_length=16, sensory_length=4, num_cached=8)


def test_round_trip_gives_identical_logits(tmp_path):
    model = HMTModel(tiny_backbone(), CFG).eval()
    with torch.no_grad():
        model.memory_init.add_(1.0)  # make sure trained values, not a fresh init, are restored
    x = torch.randint(0, VOCAB, (1, 70))
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["hidden_size"] == 64 and meta["hmt_config"]["segment_length"] == 16
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "hmt.safetensors"]  # HMT parameters only, no backbone copy
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone()).eval()
    with torch.no_grad():
        assert_close(loaded(x).logits, model(x).logits)
    assert loaded.config == model.config


def test_saving_twice_replaces_atomically(tmp_path):
    model = HMTModel(tiny_backbone(), CFG)
    model.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_for_other_width_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    HMTModel(tiny_backbone(), CFG).save_pretrained(tmp_path / "ckpt")
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="width 64"):
        HMTModel.from_pretrained(tmp_path / "ckpt", backbone=wider)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HMT checkpoint"):
        HMTModel.from_pretrained(tmp_path)


def test_lora_adapter_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model

    backbone = get_peft_model(
        tiny_backbone(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model = HMTModel(backbone, CFG.replace(backbone="tiny-random")).eval()
    x = torch.randint(0, VOCAB, (1, 40))
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((tmp_path / "ckpt" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-random"  # a name, not this machine's path
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone()).eval()
    with torch.no_grad():
        assert_close(loaded(x).logits, model(x).logits)


def test_unknown_backbone_error_says_what_to_do():
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_backbone("/nonexistent/model-folder")


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"fpu", "avx2", "avx512f"}, torch.float32),  # bfloat16 would be emulated: ~7x slower
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
        ({"fp", "asimd", "bf16"}, torch.bfloat16),  # Arm's BF16 extension ("Features" line)
        (set(), torch.float32),  # flags unknown (not Linux)
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    from hmt import backbone

    monkeypatch.delenv(backbone.AUTO_DTYPE_ENV, raising=False)  # the CPU decides, not HMTQA_TEST_DTYPE
    monkeypatch.setattr(backbone, "_cpu_flags", lambda: frozenset(flags))
    assert resolve_dtype("auto") is expected and resolve_dtype("AUTO", "cpu") is expected
    assert backbone.native_bfloat16("meta") is False  # devices other than CPU and CUDA: float32
    assert resolve_dtype("auto", "meta") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16  # an explicit dtype is kept as asked


@pytest.mark.parametrize("forced, expected", [("float32", torch.float32), ("BF16", torch.bfloat16)])
def test_auto_dtype_can_be_forced(monkeypatch, forced, expected):
    """$HMTQA_AUTO_DTYPE overrides the CPU's choice for "auto" only; an explicit dtype is kept."""
    from hmt import backbone

    monkeypatch.setattr(backbone, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    monkeypatch.setenv(backbone.AUTO_DTYPE_ENV, forced)
    assert resolve_dtype("auto") is expected and resolve_dtype("float16") is torch.float16
    monkeypatch.setenv(backbone.AUTO_DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match="HMTQA_AUTO_DTYPE"):
        resolve_dtype("auto")


def test_cpu_flags_are_read_from_cpuinfo_lines(monkeypatch, tmp_path):
    from hmt import backbone

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nFeatures\t: fp bf16\n")
    real_path = backbone.Path
    monkeypatch.setattr(backbone, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert backbone._cpu_flags() == {"fpu", "avx2", "avx512_bf16", "fp", "bf16"}


def test_passage_head_round_trip_and_fallback(tmp_path):
    """A passage head is saved and loaded beside the segment recall head; without one, passages
    are scored by the segment head itself."""
    plain = HMTModel(tiny_backbone(), CFG)
    assert plain.passage_recall is None and plain.passage_head is plain.recall
    assert not any(name.startswith("passage_recall.") for name in plain.hmt_state_dict())
    model = HMTModel(tiny_backbone(), CFG.replace(passage_recall=True))
    with torch.no_grad():
        model.passage_recall.w_q.weight.add_(0.5)  # trained values, not the identity start
    assert model.passage_head is model.passage_recall
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone())
    assert loaded.config.passage_recall
    for name, value in model.hmt_state_dict().items():
        assert_close(loaded.hmt_state_dict()[name], value)
    assert not torch.equal(loaded.passage_recall.w_q.weight, loaded.recall.w_q.weight)


def test_passage_head_needs_content_recall():
    with pytest.raises(ValueError, match="passage_recall needs recall 'content'"):
        HMTConfig(recall="paper", passage_recall=True)
