"""GPTQ end to end on a LLaMA-shaped model with random weights and random calibration tokens (GPU).

Measures what issue #3 asks of a lent GPU: wall time of ``llmquant.pipeline.quantize`` and peak GPU
memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) for a LLaMA-7B-shaped model
(hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000), plus the host's peak RSS.

The float model is built on the CPU (meta skeleton, then random fp16 weights in place: no checkpoint
on disk, no download); the pipeline moves one decoder layer at a time to the GPU. Calibration is
``--n-samples`` x ``--seqlen`` uniformly random token ids (the protocol's 128 x 512 by default).
A small smoke model runs first so that a broken environment fails in seconds, not minutes.
``--save DIR`` also writes the GPTQ checkpoint (atomic, read back and verified) and times that.

    python scripts/bench_gptq_gpu.py --out gptq_7b.json [--save /tmp/q7b]
    python scripts/bench_gptq_gpu.py --dry-run   # tiny model on the CPU (what the unit test runs)
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "vocab": 32000}
SMOKE = {"hidden": 256, "intermediate": 688, "layers": 2, "heads": 4, "vocab": 1000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the measurements here (JSON)")
    p.add_argument("--save", type=Path, default=None, help="also save the checkpoint here (GPTQ format)")
    p.add_argument("--layers", type=int, default=LLAMA_7B["layers"], help="decoder layers (default 32)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny model, 4 x 32 tokens, on the CPU")
    return p.parse_args(argv)


def build_model(dims: dict, layers: int, seed: int = 0):  # noqa: ANN201
    """LlamaForCausalLM with random fp16 weights on the CPU (N(0, 0.02), drawn on the GPU if any; norms 1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        vocab_size=dims["vocab"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.float16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are drawn where it is fast
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float16).mul_(0.02))
        for name, buf in model.named_buffers():  # rotary inv_freq was left uninitialised by to_empty
            if name.endswith("inv_freq"):
                base = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
                dim = cfg.hidden_size // cfg.num_attention_heads
                buf.copy_(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return model.eval()


def random_blocks(n: int, seqlen: int, vocab: int, seed: int = 0):  # noqa: ANN201
    import torch

    from llmquant.calibration import CalibrationBlocks, fingerprint

    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    return CalibrationBlocks(ids, mask, f"random tokens {n}x{seqlen}", fingerprint(ids, mask))


def run_once(dims: dict, layers: int, args: argparse.Namespace, device: str) -> dict:
    """Build, quantize (and optionally save) one model; returns the measurements."""
    import torch

    from llmquant.config import GPTQConfig, QuantScheme
    from llmquant.pipeline import quantize

    t0 = time.perf_counter()
    model = build_model(dims, layers)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())  # before the linears become QuantLinear buffers
    blocks = random_blocks(args.n_samples, args.seqlen, dims["vocab"])
    config = GPTQConfig(scheme=QuantScheme(args.bits, args.group_size, True), act_order=args.act_order)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = quantize(model, config, blocks, device=device, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    quant_s = time.perf_counter() - t0
    out = {
        "dims": {**dims, "layers": layers},
        "params": n_params,
        "calibration": blocks.source,
        "config": config.to_dict(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "build_model_s": round(build_s, 2),
        "quantize_wall_s": round(quant_s, 2),
        "modules": len(result.logs),
        "max_damp": max((log.damp for log in result.logs), default=None),
    }
    if device == "cuda":
        out["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    if args.save is not None:
        from llmquant.api import save_quantized

        t0 = time.perf_counter()
        save_quantized(result, args.save, overwrite=True)
        out["save_s"] = round(time.perf_counter() - t0, 2)
    out["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.dry_run:
        args.n_samples, args.seqlen = 4, 32
        result = run_once(SMOKE, SMOKE["layers"], args, "cpu")
    else:
        if not torch.cuda.is_available():
            print("bench_gptq_gpu: no CUDA GPU found (--dry-run runs a CPU smoke test)", file=sys.stderr)
            return 2
        save, args.save = args.save, None
        smoke = run_once(SMOKE, SMOKE["layers"], args, "cuda")
        print(f"smoke model ok: {smoke['quantize_wall_s']} s", flush=True)
        args.save = save
        result = run_once(LLAMA_7B, args.layers, args, "cuda")
    print(json.dumps(result, indent=1), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
