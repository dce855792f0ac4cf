"""Task-level entry points shared by the Python API and the CLI (the CLI only parses and prints)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .config import CalibrationConfig, GPTQConfig, MethodConfig
from .formats import get_format
from .pipeline import QuantizationResult, quantize

logger = logging.getLogger(__name__)


def save_quantized(
    result: QuantizationResult,
    out_dir: str | Path,
    *,
    format: str = "gptq",
    tokenizer=None,
    max_shard_size: int = 4 * 2**30,
) -> Path:
    """Write ``result`` as a checkpoint of ``format`` (atomic, verified by reading it back), with the
    per-module log in ``quant_log.json``; then drop the run's resume directory."""
    from .io import save_quantized as _save

    config = result.config
    act_order = isinstance(config, GPTQConfig) and config.act_order
    static_groups = isinstance(config, GPTQConfig) and config.static_groups
    meta: dict[str, Any] = {"method_config": config.to_dict(), "calibration": result.calibration}
    if isinstance(config, GPTQConfig):
        meta["damp_percent"] = config.damp
        meta["true_sequential"] = config.true_sequential
        damps = [log.damp for log in result.logs if log.damp is not None]
        meta["damp_max_used"] = max(damps) if damps else None
        meta["rtn_fallbacks"] = sum(1 for log in result.logs if log.fallback)
    path = _save(
        result.model,
        result.quantized,
        out_dir,
        format=format,
        scheme=config.scheme,
        act_order=act_order,
        static_groups=static_groups,
        method=config.method,
        extra_meta=meta,
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
        extra_files={"quant_log.json": {"modules": [log.__dict__ for log in result.logs]}},
    )
    if result.resume_dir is not None and result.resume_dir.exists():
        import shutil

        shutil.rmtree(result.resume_dir)
    return path


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    config: MethodConfig,
    calibration: CalibrationConfig | None = None,
    *,
    format: str = "gptq",
    device: str | None = None,
    batch_size: int = 8,
    resume: bool = True,
) -> dict[str, Any]:
    """Stream-quantize the checkpoint at ``model_dir`` and save it to ``out_dir``; returns a summary."""
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    act_order = isinstance(config, GPTQConfig) and config.act_order and not config.static_groups
    get_format(format).check_scheme(config.scheme, act_order=act_order)  # fail before hours of work
    for note in get_format(format).engine_notes(config.scheme, act_order=act_order):
        logger.warning(note)  # where this checkpoint will not run as is, and what runs there
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(config, GPTQConfig):
            raise ValueError(f"{model_dir} has no usable tokenizer, which calibration needs ({exc})") from exc
        tokenizer = None
    resume_dir = out_dir.with_name(out_dir.name + ".partial")
    if not resume and resume_dir.exists():
        import shutil

        shutil.rmtree(resume_dir)
    result = quantize(
        model_dir,
        config,
        calibration,
        tokenizer=tokenizer,
        device=device,
        batch_size=batch_size,
        resume_dir=resume_dir,
    )
    path = save_quantized(result, out_dir, format=format, tokenizer=tokenizer)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {
        "path": path,
        "format": format,
        "modules": len(result.quantized),
        "seconds": result.seconds,
        "bytes": size,
    }


def load_any(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A quantized checkpoint through ``from_pretrained``, a float one through transformers."""
    from transformers import AutoModelForCausalLM

    from .io import read_config
    from .loading import from_pretrained

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    if read_config(path).get("quantization_config"):
        return from_pretrained(path, device=device, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.to(device).eval()


def evaluate_checkpoint(
    path: str | Path,
    text: str | Path,
    *,
    base: str | Path | None = None,
    windows: int | None = None,
    seqlen: int = 2048,
    device: str | None = None,
) -> dict[str, Any]:
    """Perplexity of ``path`` on ``text`` (and of ``base`` + KL(base || quantized) if given)."""
    from transformers import AutoTokenizer

    from .evaluate import evaluate, tokenize_corpus

    for checkpoint in (path, base):
        if checkpoint is not None and not (Path(checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (no config.json there)")
    if not Path(text).is_file():
        raise FileNotFoundError(f"text file {text} does not exist")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if dev == "cpu" else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenize_corpus(tokenizer, text)
    model = load_any(path, dev, dtype)
    base_model = load_any(base, dev, dtype) if base else None
    result = evaluate(model, ids, seqlen=seqlen, windows=windows, base_model=base_model, device=dev)
    out: dict[str, Any] = {
        "perplexity": result.perplexity,
        "n_windows": result.n_windows,
        "n_tokens": result.n_tokens,
        "seqlen": result.seqlen,
    }
    if base_model is not None:
        base_result = evaluate(base_model, ids, seqlen=seqlen, windows=windows, device=dev)
        out["base_perplexity"] = base_result.perplexity
        out["kl_divergence"] = result.kl_divergence
    return out


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Format, scheme, per-module tensor shapes, and a fresh verification (every module unpacks and
    its tensors match the format's schema)."""
    from .formats import detect_format
    from .io import load_tensors, read_checkpoint_index, read_config

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    qcfg = read_config(path).get("quantization_config")
    if not qcfg:
        raise ValueError(f"{path} is not quantized (no quantization_config in config.json)")
    fmt, scheme, flags = detect_format(qcfg)
    index = read_checkpoint_index(path)
    modules = []
    for name in fmt.quantized_module_names(index):
        keys = [k for k in index if k.rpartition(".")[0] == name]
        tensors = {k.rpartition(".")[2]: v for k, v in load_tensors(path, keys).items()}
        tensors.pop("bias", None)
        n, k = _shape_of(fmt, tensors, scheme)
        qw = fmt.unpack(tensors, scheme, n, k)
        modules.append(
            {
                "name": name,
                "shape": [n, k],
                "groups": qw.num_groups,
                "tensors": {s: list(t.shape) for s, t in tensors.items()},
            }
        )
    meta = qcfg.get("meta", {}) if isinstance(qcfg.get("meta"), dict) else {}
    return {
        "path": str(path),
        "format": fmt.name,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "flags": json.dumps(flags),
        "quantized_modules": len(modules),
        "verified_at_save": meta.get("verified"),
        "verified_now": True,
        "modules": modules,
    }


def _shape_of(fmt, tensors: dict[str, torch.Tensor], scheme) -> tuple[int, int]:
    """(N, K) of a packed module, from the format's own tensors."""
    if "weight_shape" in tensors:
        n, k = (int(v) for v in tensors["weight_shape"].tolist())
        return n, k
    n = tensors["scales"].shape[1]
    if "g_idx" in tensors:
        return n, tensors["g_idx"].shape[0]
    qweight = tensors["qweight"]
    return n, qweight.shape[0] if qweight.shape[1] != n else qweight.shape[0] * 32 // scheme.bits
