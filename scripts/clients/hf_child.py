"""Child of ``check_clients.py``: load a checkpoint through transformers in a client virtualenv.

Runs with the client's Python (transformers + compressed-tensors, or transformers + gptqmodel), never
with llmquant importable. Reads a JSON request, writes a ``torch.save`` result:

- ``logits``: float32 [T, V] per prompt (one forward over the prompt),
- ``generated``: greedy token ids per prompt, argmax of the raw logits at every step with the KV cache
  (no EOS stop, no logits processors: the same rule ``check_clients.py`` applies to llmquant),
- ``loading``: transformers' loading info (missing = re-initialized, unexpected, mismatched keys),
- ``versions`` and ``modules``: the installed client packages and the class names of the linears used.

Usage: ``python hf_child.py REQUEST.json RESULT.pt``
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import sys
from collections import Counter
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "compressed-tensors", "gptqmodel", "optimum", "accelerate")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def load(request: dict):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, request["dtype"]), "output_loading_info": True}
    if request["mode"] == "dequantize":  # compressed-tensors: decompress while loading
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    if request["mode"] == "gptqmodel":
        kwargs["device_map"] = "cpu"
    model, info = AutoModelForCausalLM.from_pretrained(request["checkpoint"], **kwargs)
    loading = {k: sorted(str(x) for x in v) for k, v in info.items() if k != "error_msgs"}
    return model.eval(), loading


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = int(out.logits[0, -1].float().argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, loading = load(request)
    logits, generated = [], []
    with torch.no_grad():
        for prompt in request["prompts"]:
            logits.append(model(torch.tensor([prompt])).logits[0].float())
            generated.append(greedy(model, prompt, request["max_new_tokens"]))
    modules = Counter(type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj"))
    result = {
        "logits": logits,
        "generated": generated,
        "loading": loading,
        "versions": versions(),
        "modules": dict(modules),
    }
    torch.save(result, sys.argv[2])


if __name__ == "__main__":
    main()
