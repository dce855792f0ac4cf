"""Perplexity of a checkpoint as an independent reader decodes it: the cross-check of bench_quality's numbers.

Runs with a client's own Python (``~/.cache/llmquant/clients/<name>/bin/python``, built by
``check_clients.py``), or with llmquant's for the comparison. Same protocol as ``llmquant eval``: the whole
text tokenized without special tokens, its first WINDOWS non-overlapping 2048-token windows, mean
next-token NLL over every predicting position, float32 on the CPU.

    READER: ct         transformers + compressed-tensors (dequantized while loading)
            gptqmodel  transformers + gptqmodel (its CPU kernel)
            llmquant   llmquant.from_pretrained

    python ppl_child.py READER CHECKPOINT TEXT [--windows 12] [--out RESULT.pt]

Prints one line per window and ``READER ppl P``; ``--out`` also saves the per-window NLLs and the first
window's first 256 logit rows (to compare readers position by position).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

SEQLEN = 2048


MODES = {"ct": "dequantize", "gptqmodel": "gptqmodel"}  # reader -> hf_child's loading mode


def load(reader: str, checkpoint: str):
    """The model as ``reader`` decodes it, in float32: the transformers readers load the way
    ``check_clients.py``'s child does (``hf_child.load``)."""
    if reader == "llmquant":
        from llmquant import from_pretrained

        return from_pretrained(checkpoint, dtype=torch.float32, progress=False)
    from hf_child import load as hf_load  # this script's folder is on sys.path when run as a script

    return hf_load({"checkpoint": checkpoint, "dtype": "float32", "mode": MODES[reader]})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reader", choices=[*MODES, "llmquant"])
    parser.add_argument("checkpoint")
    parser.add_argument("text")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    with open(args.text, encoding="utf-8") as fh:
        ids = torch.tensor(tokenizer(fh.read(), add_special_tokens=False)["input_ids"])
    model = load(args.reader, args.checkpoint).eval()
    linears = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")})
    print(f"{args.reader}: q_proj modules {linears}", flush=True)
    nll, head = [], None
    with torch.no_grad():
        for w in range(min(args.windows, ids.numel() // SEQLEN)):
            window = ids[w * SEQLEN : (w + 1) * SEQLEN][None]  # [1, SEQLEN]
            t0 = time.perf_counter()
            logits = model(input_ids=window, use_cache=False).logits[0].float()  # [SEQLEN, V]
            head = logits[:256].clone() if head is None else head
            nll.append(torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:]).item())
            seconds = time.perf_counter() - t0
            print(f"{args.reader} window {w}: nll {nll[-1]:.6f} ({seconds:.1f} s)", flush=True)
    print(f"{args.reader} ppl {math.exp(sum(nll) / len(nll)):.4f} over {len(nll)} windows", flush=True)
    if args.out:
        torch.save({"nll": nll, "head": head}, args.out)


if __name__ == "__main__":
    main()
