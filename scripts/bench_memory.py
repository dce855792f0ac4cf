"""Peak host memory of streamed quantization vs the model size.

Builds a random LLaMA checkpoint on disk (default ~1.6B parameters, 3.2 GB in float16 -- far larger
than one decoder layer), then runs `llmquant quantize` on it in a child process and reports the
child's peak RSS next to: the checkpoint size, one decoder layer (float32 compute copy), the
activation cache, and the child's RSS right after its imports.

    python scripts/bench_memory.py [--hidden 2048 --layers 24 --intermediate 5632] [--method gptq]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_checkpoint(path: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> None:
    """A random float16 LLaMA saved with save_pretrained (in a child, so its memory is not ours)."""
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size={hidden}, intermediate_size={intermediate}, num_hidden_layers={layers},
                  num_attention_heads={hidden // 64}, num_key_value_heads={max(1, hidden // 256)},
                  vocab_size={vocab}, tie_word_embeddings=False)
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu").to(torch.float16)
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
model.save_pretrained({str(path)!r}, max_shard_size="1GB")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmquant-mem-"))
    model_dir, out_dir = work / "model", work / "out"
    if not (model_dir / "config.json").is_file():
        build_checkpoint(model_dir, args.hidden, args.intermediate, args.layers, args.vocab)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    calib = work / "calib.txt"
    calib.write_text(" ".join(f"w{i % 997}" for i in range(args.n_samples * args.seqlen * 4)))
    cmd = [
        sys.executable,
        "-m",
        "llmquant.cli",
        "quantize",
        str(model_dir),
        "-o",
        str(out_dir),
        "--method",
        args.method,
        "--group-size",
        "128",
        "--no-resume",
        "--overwrite",
    ]
    if args.method == "gptq":
        _tokenizer(model_dir, calib, args.vocab)
        cmd += ["--calib", str(calib), "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    h, i, n = args.hidden, args.intermediate, args.layers
    layer_params = 4 * h * h + 3 * h * i  # upper bound (GQA k/v are smaller)
    report = {
        "command": " ".join(sys.argv),
        "quantize_command": " ".join(cmd),
        "checkpoint_bytes": size,
        "params_per_layer": layer_params,
        "one_layer_fp32_bytes": layer_params * 4,
        "activation_cache_bytes": args.n_samples * args.seqlen * h * 4 if args.method == "gptq" else 0,
        "embeddings_fp16_bytes": 2 * args.vocab * h * 2,
        "peak_rss_bytes": peak,
        "wall_seconds": wall,
        "layers": n,
    }
    print(json.dumps(report, indent=2))


def _tokenizer(model_dir: Path, calib: Path, vocab: int) -> None:
    """A word-level tokenizer over the calibration words, saved beside the model (GPTQ needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(calib.read_text().split()))[: vocab - 2]
    tok = Tokenizer(
        models.WordLevel({w: j + 2 for j, w in enumerate(words)} | {"<unk>": 0, "<s>": 1}, "<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(
        model_dir
    )


if __name__ == "__main__":
    main()
