"""Evaluation phase: every saved checkpoint and the float model scored on the same windows.

Each quantized run is loaded from its SAVED checkpoint with ``llmquant.from_pretrained(path,
dtype=torch.float32)`` (what a user gets), the float checkpoint with transformers in float32. All models
are held in memory at once and scored by ``llmquant.evaluate.evaluate_models`` with the float model as
the base: its logits are computed once per window and serve every run's KL, and every number is bitwise
that of ``llmquant.evaluate.evaluate(model, ids, base_model=float_model)``. The quantized models use the
dequantize-once cache (``llmquant.nn.cache_dense_weights``): about 0.55 GB per model (float32, dense) +
~1.5 GB; that it changes no logit is checked per model on a short prefix of the first window (expected
max |difference|: 0). Per-window scores go to ``OUT/eval_windows.jsonl`` as they are computed; with
``--resume`` the scores of models whose stamp (checkpoint identity) is unchanged are reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHECK_TOKENS = 64  # prefix of window 0 used to check the dense cache against the per-forward path


def stored_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype string ("F16", "F32", "I32" ...) from the headers only."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[key] = fh.get_slice(key).get_dtype()
    return out


def upcast_tensors(checkpoint: Path, float_dtypes: dict[str, str]) -> list[str]:
    """Unquantized tensors stored wider than in the float checkpoint (F32 where it has F16/BF16)."""
    mine = stored_dtypes(checkpoint)
    return sorted(k for k, d in mine.items() if d == "F32" and float_dtypes.get(k) in ("F16", "BF16"))


def enable_dense_cache(model: Any, window: Any) -> float:
    """Turn on the dequantize-once cache; returns the max |logit difference| it makes on a prefix."""
    import torch

    from llmquant.nn import cache_dense_weights

    prefix = window[:CHECK_TOKENS].unsqueeze(0)  # [1, CHECK_TOKENS]
    with torch.inference_mode():
        before = model(input_ids=prefix, use_cache=False).logits
        cache_dense_weights(model)
        after = model(input_ids=prefix, use_cache=False).logits
    return float((before - after).abs().max())


def load_models(results: dict[str, dict], model_dir: Path, window: Any) -> dict[str, Any]:
    """The float model and every checkpoint in ``results`` without an error, by run id (float first).

    Records in each result its dense-cache check and its upcast tensors, or why it cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llmquant.loading import from_pretrained

    models = {"float16": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()}
    float_dtypes = stored_dtypes(model_dir)
    for rid, res in results.items():
        if "error" in res:
            continue
        try:
            model = from_pretrained(res["checkpoint"], dtype=torch.float32, progress=False)
            res["dense_check_max_abs_diff"] = enable_dense_cache(model, window)
            res["upcast_tensors"] = upcast_tensors(Path(res["checkpoint"]), float_dtypes)
        except Exception as exc:  # a checkpoint our reader cannot load: say why in the table
            res["error"] = f"cannot load with llmquant.from_pretrained: {type(exc).__name__}: {exc}"[:300]
            continue
        models[rid] = model
    return models


def read_done(path: Path, seqlen: int, eval_sha: str, stamps: dict[str, str]) -> dict[tuple[str, int], Any]:
    """Scores in the per-window file that are still valid: same text, window length and checkpoint."""
    from llmquant.evaluate import WindowScore

    done = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("seqlen") != seqlen or rec.get("eval_sha") != eval_sha:
            continue
        if rec["run"] in stamps and rec.get("stamp") == stamps[rec["run"]]:
            key = (rec["run"], rec["window"])
            done[key] = WindowScore(rec["run"], rec["window"], rec["nll"], rec["kl"], rec["forward_seconds"])
    return done


def _print_window(timings: list[str]) -> None:
    if timings:
        window = timings[0].partition(":")[0]
        print(f"[eval] window {window}: " + ", ".join(t.partition(": ")[2] for t in timings), flush=True)
        timings.clear()


def evaluate_runs(
    models: dict[str, Any],
    ids: Any,
    *,
    seqlen: int,
    windows: int,
    out: Path,
    stamps: dict[str, str],
    resume: bool,
) -> dict[str, dict]:
    """Perplexity and KL to ``models["float16"]`` of every model; run id -> the numbers of results.json.

    ``stamps``: run id -> identity of its checkpoint, plus ``"__eval__"``: the text's sha256.
    """
    from llmquant.evaluate import evaluate_models

    path = out / "eval_windows.jsonl"
    done = read_done(path, seqlen, stamps["__eval__"], stamps) if resume and path.is_file() else {}
    if not resume:
        path.unlink(missing_ok=True)
    timings: list[str] = []  # "run seconds" of the window being scored, printed when it is done
    with open(path, "a") as fh:

        def record(score: Any) -> None:
            rec = {
                "run": score.model, "window": score.window, "stamp": stamps[score.model], "seqlen": seqlen,
                "eval_sha": stamps["__eval__"], "nll": score.nll, "kl": score.kl,
                "forward_seconds": score.seconds,
            }  # fmt: skip
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            if timings and not timings[0].startswith(f"{score.window + 1}:"):
                _print_window(timings)
            timings.append(f"{score.window + 1}: {score.model} {score.seconds:.1f}s")

        results = evaluate_models(
            models, ids, seqlen=seqlen, windows=windows, base_model=models["float16"], done=done,
            on_window=record, progress=False,
        )  # fmt: skip
    _print_window(timings)
    return {
        rid: {
            "perplexity": r.perplexity,
            "kl_divergence": r.kl_divergence,
            "n_windows": r.n_windows,
            "n_tokens": r.n_tokens,
            "seqlen": r.seqlen,
            "per_window_nll": [s.nll for s in r.per_window],
            "per_window_kl": [s.kl for s in r.per_window],
            "forward_seconds": sum(s.seconds for s in r.per_window),
        }
        for rid, r in results.items()
    }
