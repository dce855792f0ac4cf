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
    """``follow`` from a table of our logits: ``logits[prefix of the client's tokens]`` -> {token: logit}."""

    def __init__(self, logits):
        self.logits = logits

    def follow(self, prompt, theirs):
        steps = []
        for i, tok in enumerate(theirs):
            row = self.logits[tuple(theirs[:i])]
            top = max(row.values())
            steps.append((max(row, key=lambda t: (row[t], -t)), top - row.get(tok, -100.0)))
        return steps


def test_generation_summary_follows_the_client_past_ties(cc, monkeypatch) -> None:
    monkeypatch.setattr(cc, "MAX_NEW_TOKENS", 4)
    ours = {  # our greedy text is 1 2 3 4; token 2 ties exactly with 5 after "1"
        (): {1: 3.0, 7: 1.0},
        (1,): {2: 2.0, 5: 2.0},
        (1, 2): {3: 2.0, 8: 1.99},
        (1, 2, 3): {4: 5.0, 9: 1.0},
        (1, 5): {6: 4.0, 9: 1.0},
        (1, 5, 6): {7: 4.0, 9: 3.98},
        (1, 2, 8): {4: 5.0, 9: 1.0},
    }
    ref = _FakeRef(ours)
    text, first = cc.generation_summary([[1, 2, 3, 4]], ref, [[0]], tie=0.05)
    assert text == "1/1 identical 4/4" and first == 4
    # the client breaks the tie the other way, then stays on our argmax: 4/4, no real divergence
    text, first = cc.generation_summary([[1, 5, 6, 7]], ref, [[0]], tie=0.05)
    assert text == (
        "0/1 identical 4/4; differs at token 1 (exact tie: our margin 0), "
        "fed its tokens: 4/4 our argmax up to exact ties"
    )
    assert first == 4
    # a near-tie (0.02 <= tie) is named but does not count; a real divergence does
    text, first = cc.generation_summary([[1, 5, 6, 9], [1, 2, 8, 9]], ref, [[0], [0]], tie=0.05)
    head, tied, real = text.split("; ")
    assert head == "0/2 identical 4/4"
    assert tied == "differs at token 1 (exact tie: our margin 0), fed its tokens: 3/4 " + (
        "our argmax up to exact ties, 1 near-ties"
    )
    assert real == "differs at token 2 (near-tie: our margin 0.01), fed its tokens: 2/4 " + (
        "our argmax up to exact ties, 1 near-ties, first non-tie at token 3 (our margin 4)"
    )
    assert first == 3


def test_a_child_that_times_out_is_a_row_that_resume_measures_again(cc, monkeypatch, tmp_path) -> None:
    def too_slow(cmd, **kwargs):
        raise cc.subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(cc.subprocess, "run", too_slow)
    client = cc.CLIENTS["transformers-ct"]
    row = cc.Row("compressed-tensors-sym", client.name, "default", client.dtype)
    cc.run_pair(client, row, tmp_path / "ckpt", [[1, 2]], tmp_path, None)
    assert row.status == "timeout" and f"no result after {cc.CHILD_TIMEOUT} s" in row.note
    cc.save_row(tmp_path / "rows.jsonl", row)
    done = cc.Row("awq-sym", "vllm", "default", "bfloat16", status="error", note="refused")
    cc.save_row(tmp_path / "rows.jsonl", done)
    assert list(cc.load_rows(tmp_path / "rows.jsonl")) == [("awq-sym", "vllm", "default")]
