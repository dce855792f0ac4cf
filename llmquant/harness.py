"""lm-evaluation-harness tasks on a (quantized) checkpoint, through the harness's Hugging Face wrapper.

The checkpoint is loaded by :func:`llmquant.api.load_any` (``from_pretrained`` for a quantized one, with
the dequantize-once cache off CUDA) and
the model object itself is handed to ``lm_eval.models.huggingface.HFLM(pretrained=<model>)``, so the
harness scores exactly the modules llmquant serves. lm-eval is an optional extra
(``pip install 'llmquant[eval]'``), imported only here and only when called. Tasks may come from the
harness's registry or from local YAML files (``include_path``); a local task on a local ``json`` data
file needs no hub access.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MISSING = "lm-eval is not installed; install the extra: pip install 'llmquant[eval]'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ValueError(f"{MISSING} ({exc})") from exc
    return lm_eval, HFLM, TaskManager


def evaluate_tasks(
    path: str | Path,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on the checkpoint at ``path``; returns task -> {metric: value}.

    ``limit``: evaluate only the first N documents of each task (a smoke test); ``include_path``: a
    folder of extra task YAML files.
    """
    from transformers import AutoTokenizer

    from .api import load_any

    lm_eval, HFLM, TaskManager = _import_lm_eval()  # noqa: N806  (classes)
    if not tasks:
        raise ValueError("--tasks needs at least one task name")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"task folder {include_path} does not exist")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; add --include-path for local task files")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any(
        path, dev, torch.float32 if dev == "cpu" else None, dequantize_cache=torch.device(dev).type != "cuda"
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot
    )
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, Any]:
    """``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5, ...}`` (numbers only, filter suffix dropped)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.split(",")[0]] = value
    return out
