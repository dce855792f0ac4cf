"""scripts/check_clients.py: the pure parts (error extraction, logit comparison, generation summary);
the clients themselves run only from the script (docs/clients.md), never in this suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_clients.py"


@pytest.fixture(scope="module")
def cc():
    spec = importlib.util.spec_from_file_location("check_clients", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_clients"] = module
    spec.loader.exec_module(module)
    return module


VLLM_STDERR = """Traceback (most recent call last):
  File "vllm_child.py", line 60, in main
    llm = LLM(
pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig
  Value error, Unsupported quantization config: bits=4, sym=False [type=value_error]
    For further information visit https://errors.pydantic.dev
INFO 12-01 shutting down
"""


def test_exception_line_keeps_the_detail(cc) -> None:
    line = cc.exception_line(VLLM_STDERR)
    assert line.startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error")
    assert "Unsupported quantization config: bits=4, sym=False" in line
    assert cc.exception_line("RuntimeError: boom\n") == "RuntimeError: boom"
    assert cc.exception_line("") == "no output"


def test_position_diffs_full_and_topk(cc) -> None:
    ours = torch.tensor([[1.0, 5.0, 2.0], [0.0, 1.0, 9.0]])
    theirs = ours + torch.tensor([[0.0, 0.25, 0.0], [0.5, 0.0, 0.0]])
    assert cc.position_diffs(ours, theirs, None).tolist() == [0.25, 0.5]
    ids, vals = cc.topk_tensors([{1: 5.5, 2: 2.0}, {2: 9.0, 1: 1.0}], 2)
    assert ids.tolist() == [[1, 2], [2, 1]]
    assert cc.position_diffs(ours, vals, ids).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="client gave 1 positions, ours 2"):
        cc.topk_tensors([{1: 0.0}], 2)


class _FakeRef:
    def __init__(self, tokens, margins):
        self.tokens, self.margins = tokens, margins

    def greedy(self, prompt, steps):
        return self.tokens[:steps], self.margins[:steps]


def test_generation_summary_names_ties_and_real_divergences(cc, monkeypatch) -> None:
    monkeypatch.setattr(cc, "MAX_NEW_TOKENS", 4)
    ref = _FakeRef([1, 2, 3, 4], [1.0, 0.0, 0.01, 2.0])
    text, prefix = cc.generation_summary([[1, 2, 3, 4]], ref, [[0]], tie=0.05)
    assert text == "identical 4/4 on 1 prompts" and prefix == 4
    text, prefix = cc.generation_summary([[1, 9, 9, 9], [1, 2, 3, 9]], ref, [[0], [0]], tie=0.05)
    assert "diverges at token 1 (exact tie" in text and "diverges at token 3 (NOT a tie" in text
    assert prefix == 3  # only the non-tie divergence counts against the bar
