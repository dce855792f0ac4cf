"""The memory preflight's estimate against the measured peak RSS of the same `llmquant quantize` command.

Runs the command twice in child processes: with ``--dry-run`` (the estimate and its breakdown, as the
user sees it) and for real, measuring the child's peak RSS (``wait4``'s ``ru_maxrss``, what
``/usr/bin/time -v`` reports as "Maximum resident set size") and sampling its RSS from ``/proc`` to
split the peak into the layer walk and the save (the child logs "writing OUT" in between). Without
``--model`` it first builds a random float16 LLaMA of the given shape (never downloaded) with a
word-level tokenizer and a matching calibration text, so calibrated methods run on it.

    python scripts/bench_memory.py --model ~/.cache/llmquant/smollm2-135m-instruct --method gptq \
        --calib ../shared/data/calibration/c4.utf8 --n-samples 16 --seqlen 256 --group-size 64
    python scripts/bench_memory.py --workdir /tmp/mem1b --hidden 2048 --intermediate 5632 --layers 22 \
        --method rtn
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 2**30


def build_checkpoint(path: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> None:
    """A random float16 LLaMA saved with save_pretrained (in a child, so its memory is not ours)."""
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size={hidden}, intermediate_size={intermediate}, num_hidden_layers={layers},
                  num_attention_heads={hidden // 64}, num_key_value_heads={max(1, hidden // 256)},
                  vocab_size={vocab}, tie_word_embeddings=False, max_position_embeddings=2048)
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu").to(torch.float16)
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
model.save_pretrained({str(path)!r}, max_shard_size="1GB")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _tokenizer(model_dir: Path, calib: Path, vocab: int) -> None:
    """A word-level tokenizer over the calibration words, saved beside the model (calibration needs one)."""
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


def estimate(cmd: list[str]) -> dict[str, float]:
    """``--dry-run``'s host breakdown (MiB per term) and its peak (GiB), parsed from its table."""
    out = subprocess.run([*cmd, "--dry-run"], check=True, capture_output=True, text=True).stdout
    terms = {m[1]: float(m[2]) for m in re.finditer(r"^  host: (.+?)\s{2,}([\d.]+) MiB$", out, re.M)}
    peak = re.search(r"^peak host memory \(estimate\)\s+([\d.]+) GiB$", out, re.M)
    avail = re.search(r"^available memory\s+([\d.]+) GiB$", out, re.M)
    assert peak and avail, out
    return {"terms_mib": terms, "peak_gib": float(peak[1]), "available_gib": float(avail[1])}


def measure(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; its peak RSS (kernel's ru_maxrss) and the sampled peaks before / after "writing"."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}

    def read() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            if "writing" in line and "llmquant.api" in line:
                marks.setdefault("save", time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not proc.poll(): wait4 reaps with rusage
        if pid:
            break
        try:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            samples.append((time.monotonic(), int(re.search(r"VmRSS:\s+(\d+) kB", text)[1]) * 1024))
        except (OSError, TypeError):
            pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    save_at = marks.get("save", float("inf"))
    walk = max((r for t, r in samples if t < save_at), default=0)
    save = max((r for t, r in samples if t >= save_at), default=0)
    return {
        "peak_gib": usage.ru_maxrss * 1024 / GiB,
        "walk_peak_sampled_gib": walk / GiB,
        "save_peak_sampled_gib": save / GiB,
        "wall_s": time.monotonic() - t0,
        "exit": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="existing checkpoint (default: build one)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--calib", type=Path, default=None, help="calibration text (default: generated)")
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", default="128")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more `llmquant quantize` options (after --)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmquant-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, calib = args.model or work / "model", args.calib or work / "calib.txt"
    if args.calib is None and not calib.is_file():
        calib.write_text(" ".join(f"w{i % 997}" for i in range(max(args.n_samples, 8) * args.seqlen * 4)))
    if args.model is None and not (model_dir / "config.json").is_file():
        build_checkpoint(model_dir, args.hidden, args.intermediate, args.layers, args.vocab)
        _tokenizer(model_dir, calib, args.vocab)
    out = work / f"out-{args.method}"
    cmd = [
        sys.executable, "-m", "llmquant.cli", "quantize", str(model_dir), "-o", str(out),
        "--method", args.method, "--group-size", args.group_size, "--calib", str(calib),
        "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen), "--no-resume", "--overwrite",
        *args.extra,
    ]  # fmt: skip
    est = estimate(cmd)
    got = measure(cmd)
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    report = {"command": " ".join(cmd), "checkpoint_gib": size / GiB, "estimate": est, "measured": got}
    report["measured_over_estimate"] = got["peak_gib"] / est["peak_gib"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
