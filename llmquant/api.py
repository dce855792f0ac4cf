"""Task-level entry points shared by the Python API and the CLI (the CLI only parses and prints)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .config import CalibrationConfig, GPTQConfig, MethodConfig
from .errors import FormatError, ModelConfigError
from .formats import get_format
from .inspection import inspect_checkpoint  # noqa: F401  (public here: the API of `llmquant inspect`)
from .methods import METHODS, checkpoint_meta, rounder_config
from .pipeline import QuantizationResult, quantize

logger = logging.getLogger(__name__)


def save_quantized(
    result: QuantizationResult,
    out_dir: str | Path,
    *,
    format: str | None = None,
    tokenizer=None,
    max_shard_size: int = 4 * 2**30,
    base_model: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``result`` as a checkpoint of ``format`` (atomic, verified by reading it back), with the
    per-module log in ``quant_log.json`` and the model card in ``README.md``; then drop the run's
    resume directory. ``format`` None: the method's natural format (``natural_format``). ``base_model``:
    the hub id the card names as the base model (default: the source's id when it was loaded from the
    hub). ``push_to_hub="owner/name"``: then upload the checkpoint there in one commit
    (``llmquant.hub.push_checkpoint``; ``private`` for a new repo). An existing ``out_dir`` is refused
    (``OutputExistsError``) unless ``overwrite``, and then replaced atomically; so is one that this run
    wrote before it was killed (``quant_log.json`` records the run's fingerprint, and the resume
    directory still holds it: the kill came between the rename and dropping the resume directory)."""
    from .hub import card_writer, check_repo_id, describe_base, push_checkpoint
    from .preflight import check_output
    from .save import write_quantized as _save

    if push_to_hub is not None:
        check_repo_id(push_to_hub)  # before writing anything
    resume_dir = result.resume_dir
    if resume_dir is not None and _finished_before(Path(out_dir), resume_dir, result.fingerprint):
        logger.info("%s was written by this run before it was interrupted; writing it again", out_dir)
        overwrite = True
    check_output(out_dir, overwrite=overwrite)  # ``out_dir`` must not exist unless ``overwrite``

    config = result.config
    if format is None:
        format = natural_format(config, {qw.shape[1] for qw in result.quantized.values()})
    rcfg = rounder_config(config)
    act_order = isinstance(rcfg, GPTQConfig) and rcfg.act_order
    static_groups = isinstance(rcfg, GPTQConfig) and rcfg.static_groups
    meta: dict[str, Any] = checkpoint_meta(config, result.logs) | {"calibration": result.calibration}
    meta["base"] = describe_base(getattr(result.model.config, "_name_or_path", None) or None, base_model)
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
        extra_files={"quant_log.json": _quant_log(result)},
        finalize=card_writer(Path(out_dir).name, repo_id=push_to_hub),
    )
    _drop_resume(result)
    if push_to_hub is not None:
        push_checkpoint(path, push_to_hub, private=private)
    return path


QUANT_LOG = "quant_log.json"


def _quant_log(result: QuantizationResult) -> dict[str, Any]:
    log: dict[str, Any] = {"modules": [log.__dict__ for log in result.logs]}
    if result.fingerprint is not None:
        log["run_fingerprint"] = result.fingerprint
    return log


def written_by(out_dir: str | Path) -> str | None:
    """The run fingerprint an llmquant output directory's ``quant_log.json`` records, if any."""
    try:
        log = json.loads((Path(out_dir) / QUANT_LOG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    fp = log.get("run_fingerprint") if isinstance(log, dict) else None
    return fp if isinstance(fp, str) else None


def _drop_resume(result: QuantizationResult) -> None:
    from .resume import drop_resume_dir

    if result.resume_dir is not None and result.resume_dir.exists():
        drop_resume_dir(result.resume_dir)


def natural_format(config: MethodConfig, in_features: set[int]) -> str:
    """The method's own format (``awq`` for AWQ, ``gptq``/``gptq_v2`` for RTN and GPTQ by symmetry), or
    ``gptq_v2`` when that format cannot store this scheme on these input sizes (e.g. AutoAWQ GEMM and a
    ragged last group)."""
    scheme = config.scheme
    name = METHODS[config.method].natural_format(scheme)
    try:
        check_format(name, config, in_features)
    except ValueError as exc:  # FormatError
        fallback = "gptq" if scheme.sym else "gptq_v2"
        logger.info("format %s cannot store this checkpoint (%s); writing %s", name, exc, fallback)
        return fallback
    return name


def check_format(name: str, config: MethodConfig, in_features: set[int]) -> None:
    """ValueError (one line, with the fix) if format ``name`` cannot store ``config``'s output for linears
    with these input sizes; run before any work."""
    from .formats import stores_permutation

    rcfg = rounder_config(config)
    act_order = isinstance(rcfg, GPTQConfig) and stores_permutation(rcfg.act_order, rcfg.static_groups)
    try:
        fmt = get_format(name)
        fmt.check_scheme(config.scheme, act_order=act_order)
    except FormatError:
        raise
    except ValueError as exc:
        raise FormatError(str(exc)) from exc
    gs = config.scheme.group_size
    ragged = sorted(k for k in in_features if gs is not None and k % gs)
    if ragged and not fmt.allows_ragged_groups:
        raise FormatError(
            f"format {fmt.name!r} cannot store a ragged last group (input size {ragged[0]} is not a multiple "
            f"of group size {gs}); use --group-size {_divisor_hint(in_features, gs)} or --format gptq_v2 "
            "or compressed-tensors"
        )


def _divisor_hint(in_features: set[int], group_size: int) -> int:
    for g in (128, 64, 32, 16):
        if g < group_size and all(k % g == 0 for k in in_features):
            return g
    return 32


def _model_in_features(config: dict[str, Any]) -> set[int]:
    """Input sizes of a LLaMA-like checkpoint's decoder linears, from its config.json."""
    sizes = {config.get("hidden_size"), config.get("intermediate_size")}
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if heads and head_dim:
        sizes.add(heads * head_dim)  # o_proj
    return {int(k) for k in sizes if k}


def plan_quantization(
    model_dir: str | Path,
    out_dir: str | Path,
    config: MethodConfig,
    calibration: CalibrationConfig | None = None,
    *,
    format: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    resume: bool = True,
    device: str | None = None,
    adapt: bool = True,
    available_memory: int | None = None,
) -> dict[str, Any]:
    """Every check that can be made before the work (model directory, config, architecture, shard headers,
    format, --seqlen, output path, free disk, memory), without loading any weight; returns the plan:
    ``format``, ``plan`` (sizes and the estimated peak host / device memory, ``preflight.Plan``), ``fit``
    (``preflight.MemoryFit``: with ``adapt``, a smaller batch size and/or the activation cache on disk
    when the plan as asked does not fit ``available_memory``, default: what the machine has), ``asked``
    (the plan as asked) and the resolved ``device``. Raises the typed errors of ``llmquant.errors`` with
    a one-line message; not fitting in memory is left to the caller (``fit.refuse()``)."""
    from . import preflight
    from .checkpoint import checkpoint_tensors

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    raw = preflight.read_model_config(model_dir)
    preflight.check_architecture(raw, model_dir)
    if raw.get("quantization_config"):
        raise ModelConfigError(f"{model_dir} is already quantized; quantize the float checkpoint instead")
    tensors = checkpoint_tensors(model_dir)
    in_features = _model_in_features(raw)
    if format is None:
        format = natural_format(config, in_features)
    check_format(format, config, in_features)  # fail before hours of work
    calibrated = config.method != "rtn"
    if calibrated and calibration is not None:
        from .calibration import check_source

        check_source(calibration)
        preflight.check_seqlen(calibration.seqlen, raw, model_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    finished = resume and _finished_before(out_dir, partial)
    preflight.check_output(out_dir, overwrite=overwrite or finished)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    calib = calibration if calibrated else None

    def build(batch: int, offload: bool) -> preflight.Plan:
        return preflight.make_plan(
            raw, tensors, config, calib, batch_size=batch, device=dev, offload_activations=offload
        )

    batches = _batch_sizes(batch_size, partial if resume else None, adapt)
    host = preflight.available_memory() if available_memory is None else available_memory
    device_free = preflight.available_device_memory(dev)
    fit = preflight.fit_memory(build, batches, host, device_free, can_offload=adapt and calib is not None)
    has_partial = resume and partial.is_dir()
    preflight.check_disk(out_dir, fit.plan.output_bytes + (0 if has_partial else fit.plan.resume_bytes))
    return {
        "format": format, "plan": fit.plan, "fit": fit, "asked": build(batches[0], False),
        "available_memory": host, "device": dev,
    }  # fmt: skip


def _batch_sizes(batch_size: int, partial: Path | None, adapt: bool) -> list[int]:
    """The batch sizes the memory fit may choose from: the one an interrupted run of this command
    recorded in ``partial`` (a resumed run must keep it), else ``batch_size`` and, with ``adapt``, its
    halvings."""
    from .preflight import halvings
    from .resume import recorded_batch_size

    recorded = recorded_batch_size(partial) if partial is not None and partial.is_dir() else None
    if recorded is not None and recorded <= batch_size:
        if recorded != batch_size:
            logger.info("resuming with batch size %d, as the interrupted run chose", recorded)
        return [recorded]
    return halvings(batch_size) if adapt else [batch_size]


def _finished_before(out_dir: Path, partial: Path, fingerprint: str | None = None) -> bool:
    """Whether ``out_dir`` was written by the run whose resume state ``partial`` holds (and whose
    fingerprint is ``fingerprint``, if given): that run was killed after the write, before dropping its
    resume state, so a rerun of the same command may replace ``out_dir``."""
    from .resume import read_fingerprint

    fp = read_fingerprint(partial) if partial.is_dir() else None
    return fp is not None and fingerprint in (None, fp) and written_by(out_dir) == fp


def _drop_stateless_partial(out_dir: Path) -> None:
    """Delete ``OUT.partial`` when ``OUT`` exists and the partial directory holds no progress (no readable
    state.json): what a run killed while dropping its resume directory, after writing ``OUT``, leaves."""
    from .resume import drop_resume_dir, read_fingerprint

    partial = out_dir.with_name(out_dir.name + ".partial")
    if out_dir.is_dir() and partial.is_dir() and read_fingerprint(partial) is None:
        logger.info("removing %s: it holds no progress (left by an interrupted cleanup)", partial)
        drop_resume_dir(partial)


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    config: MethodConfig,
    calibration: CalibrationConfig | None = None,
    *,
    format: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    resume: bool = True,
    base_model: str | None = None,
    overwrite: bool = False,
    check_memory: bool = True,
    available_memory: int | None = None,
) -> dict[str, Any]:
    """Stream-quantize the checkpoint at ``model_dir`` and save it to ``out_dir``; returns a summary.

    ``plan_quantization``'s checks run first (``out_dir`` must not exist unless ``overwrite``). With
    ``check_memory``, a plan whose estimated peak is over the available memory (``available_memory``
    bytes of host memory, default: what the machine has) is adapted -- smaller batches, the activation
    cache on disk -- and said in one warning; when nothing fits it is refused with the numbers
    (``InsufficientMemoryError``)."""
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if base_model is not None:
        from .hub import describe_base

        describe_base(None, base_model)  # option errors first: ValueError if it is not a hub id
    _drop_stateless_partial(out_dir)
    planned = plan_quantization(
        model_dir, out_dir, config, calibration, format=format, batch_size=batch_size,
        overwrite=overwrite, resume=resume, device=device, adapt=check_memory,
        available_memory=available_memory,
    )  # fmt: skip
    format, fit = planned["format"], planned["fit"]
    if check_memory:
        fit.refuse()
        if fit.changes:
            logger.warning(fit.note(planned["asked"]))
    from .formats import stores_permutation

    rcfg = rounder_config(config)
    act_order = isinstance(rcfg, GPTQConfig) and stores_permutation(rcfg.act_order, rcfg.static_groups)
    for note in get_format(format).engine_notes(config.scheme, act_order=act_order):
        logger.warning(note)  # where this checkpoint will not run as is, and what runs there
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        if config.method != "rtn":
            raise ValueError(f"{model_dir} has no usable tokenizer, which calibration needs ({exc})") from exc
        tokenizer = None
    resume_dir = out_dir.with_name(out_dir.name + ".partial")
    if not resume and resume_dir.exists():
        from .resume import drop_resume_dir

        drop_resume_dir(resume_dir)
    result = quantize(
        model_dir,
        config,
        calibration,
        tokenizer=tokenizer,
        device=planned["device"],
        batch_size=fit.plan.batch_size,
        resume_dir=resume_dir,
        offload_activations=fit.plan.offload_activations,
    )
    logger.info("quantized %d linears in %.1f s; writing %s", len(result.quantized), result.seconds, out_dir)
    path = save_quantized(
        result, out_dir, format=format, tokenizer=tokenizer, base_model=base_model, overwrite=overwrite
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {
        "path": path,
        "format": format,
        "modules": len(result.quantized),
        "seconds": result.seconds,
        "bytes": size,
    }


def load_any(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    dequantize_cache: bool = False,
):
    """A quantized checkpoint through ``from_pretrained`` (``dequantize_cache`` passed on), a float one
    through transformers."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import read_config
    from .loading import from_pretrained

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    if read_config(path).get("quantization_config"):
        return from_pretrained(path, device=device, dtype=dtype, dequantize_cache=dequantize_cache)
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
    """Perplexity of ``path`` on ``text`` (and of ``base`` + KL(base || quantized) if given).

    Off CUDA, a quantized checkpoint is loaded with ``dequantize_cache=True`` (same numbers, about the
    float model's speed, a float32 copy of the quantized weights in memory). With ``base``, the base
    model runs once per window: its perplexity and the KL come from the same logits.
    """
    from transformers import AutoTokenizer

    from .evaluate import evaluate_models, tokenize_corpus

    for checkpoint in (path, base):
        if checkpoint is not None and not (Path(checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (no config.json there)")
    if not Path(text).is_file():
        raise FileNotFoundError(f"text file {text} does not exist")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = torch.device(dev).type != "cuda"
    dtype = torch.float32 if dev == "cpu" else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenize_corpus(tokenizer, text)
    models = {"model": load_any(path, dev, dtype, dequantize_cache=on_cpu)}
    if base:
        models["base"] = load_any(base, dev, dtype, dequantize_cache=on_cpu)
    results = evaluate_models(
        models, ids, seqlen=seqlen, windows=windows, base_model=models.get("base"), device=dev
    )
    result = results["model"]
    out: dict[str, Any] = {
        "perplexity": result.perplexity,
        "n_windows": result.n_windows,
        "n_tokens": result.n_tokens,
        "seqlen": result.seqlen,
    }
    if base:
        out["base_perplexity"] = results["base"].perplexity
        out["kl_divergence"] = result.kl_divergence
    return out
