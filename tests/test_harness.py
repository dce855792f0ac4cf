"""lm-eval through the harness's HF wrapper on a quantized checkpoint, with a local task (no hub access)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmquant.cli import main

QUESTIONS = [
    ("The sky is", [" blue", " green"], 0),
    ("Two plus two is", [" four", " seven"], 0),
    ("The sun rises in the", [" west", " east"], 1),
    ("Water is", [" dry", " wet"], 1),
]

TASK = """task: llmquant_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def smoke_task(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "smoke.jsonl"
    lines = [json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS]
    data.write_text("\n".join(lines) + "\n")
    (folder / "llmquant_smoke.yaml").write_text(TASK.format(data=data))
    return folder


@pytest.fixture
def quantized_tiny(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_checkpoint), "-o", str(out), "--method", "rtn", "--group-size", "32"]
    assert main(argv) == 0
    return out


def test_eval_tasks_runs_a_local_task_on_the_quantized_model(
    quantized_tiny: Path, smoke_task: Path, capsys, monkeypatch
) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from llmquant import harness
    from llmquant.nn import QuantLinear

    seen = []
    real_hflm = harness._import_lm_eval()[1]

    class SpyHFLM(real_hflm):  # records the model object the harness is handed
        def __init__(self, pretrained, **kwargs):
            seen.append(pretrained)
            super().__init__(pretrained=pretrained, **kwargs)

    real_import = harness._import_lm_eval
    monkeypatch.setattr(harness, "_import_lm_eval", lambda: (real_import()[0], SpyHFLM, real_import()[2]))
    capsys.readouterr()
    argv = ["eval", str(quantized_tiny), "--tasks", "llmquant_smoke", "--include-path", str(smoke_task)]
    assert main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    acc = results["llmquant_smoke"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * len(QUESTIONS) == round(acc * len(QUESTIONS))
    assert "acc_stderr" in results["llmquant_smoke"]
    (model,) = seen  # llmquant.from_pretrained's model object, not a path the harness loads itself
    assert any(isinstance(m, QuantLinear) for m in model.modules())


def test_eval_tasks_limit_and_unknown_task(
    quantized_tiny: Path, smoke_task: Path, capsys, monkeypatch
) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from llmquant.harness import evaluate_tasks

    out = evaluate_tasks(quantized_tiny, ["llmquant_smoke"], include_path=smoke_task, limit=2)
    assert set(out) == {"llmquant_smoke"} and out["llmquant_smoke"]["acc"] in (0.0, 0.5, 1.0)
    capsys.readouterr()
    code = main(["eval", str(quantized_tiny), "--tasks", "no_such_task", "--include-path", str(smoke_task)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown lm-eval task(s) ['no_such_task']" in err and len(err.splitlines()) == 1


def test_missing_lm_eval_is_one_line(quantized_tiny: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code = main(["eval", str(quantized_tiny), "--tasks", "hellaswag"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'llmquant[eval]'" in err


def test_eval_needs_text_or_tasks(quantized_tiny: Path, capsys) -> None:
    assert main(["eval", str(quantized_tiny)]) == 2
    assert "--text FILE (perplexity) or --tasks NAMES" in capsys.readouterr().err
