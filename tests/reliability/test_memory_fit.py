"""Memory preflight: the estimate's terms, and a plan that does not fit adapted (smaller batches, then the
activation cache on disk) and said in one line -- with the same output bytes as the run asked for that
way -- or refused with the numbers when nothing fits. Available memory is faked through the preflight's
``available_memory`` (CLI) and ``quantize_checkpoint(available_memory=...)`` (API)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llmquant import GPTQConfig, QuantScheme, errors, pipeline, preflight
from llmquant.api import plan_quantization, quantize_checkpoint
from llmquant.cli import main
from llmquant.config import CalibrationConfig


def _cmd(model: Path, out: Path, calib: Path, batch: int) -> list[str]:
    return [
        "quantize", str(model), "-o", str(out), "--method", "gptq", "--group-size", "32",
        "--calib", str(calib), "--n-samples", "4", "--seqlen", "32", "--batch-size", str(batch),
    ]  # fmt: skip


def _peak(model: Path, calib: Path, batch: int, offload: bool = False) -> int:
    """The host estimate of ``_cmd``'s run with this batch size (and the cache on disk)."""
    config, calibration = GPTQConfig(QuantScheme(4, 32, True)), CalibrationConfig(str(calib), 4, 32)
    fit = plan_quantization(
        model, model.parent / "unused", config, calibration, batch_size=batch, adapt=False
    )
    if not offload:
        return fit["plan"].host_peak
    return fit["plan"].host_peak - fit["plan"].host["activation cache"]


def _fitting(peak: int) -> int:
    """Available memory in which an estimate of ``peak`` just fits (the refusal allows 10 % over)."""
    return int(peak / preflight.HOST_SLACK) + 1


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "quant_log.json"}


def _run(capsys, caplog, argv: list[str]) -> tuple[int, str]:
    """Exit code, and stderr with the log lines (pytest takes those from the handlers the CLI sets up)."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    code = main(argv)
    logs = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records]
    return code, "\n".join([capsys.readouterr().err, *logs])


def test_estimate_terms(tiny_checkpoint, calib_text_file) -> None:
    """n*seqlen*hidden*4 bytes of activations held once; the Hessians and the batch count where the
    computation runs (host on the CPU, device on CUDA); on disk, the cache leaves the host estimate."""
    from llmquant.checkpoint import checkpoint_tensors
    from llmquant.preflight import make_plan, read_model_config

    raw, tensors = read_model_config(tiny_checkpoint), checkpoint_tensors(tiny_checkpoint)
    config, calib = GPTQConfig(QuantScheme(4, 32, True)), CalibrationConfig(str(calib_text_file), 4, 32)
    cpu = make_plan(raw, tensors, config, calib, batch_size=2)
    assert cpu.host["activation cache"] == 4 * 32 * 64 * 4
    assert cpu.host["Hessians"] == (3 * 64 * 64 + 128 * 128) * 4
    assert cpu.host["one batch of 2 forward"] == 2 * 32 * 128 * 4 * 4 and cpu.device == {}
    cuda = make_plan(raw, tensors, config, calib, batch_size=2, device="cuda")
    assert "Hessians" not in cuda.host and cuda.device["Hessians"] == cpu.host["Hessians"]
    assert cuda.host["activation cache"] == 4 * 32 * 64 * 4  # float32 checkpoint: its own dtype
    disk = make_plan(raw, tensors, config, calib, batch_size=2, offload_activations=True)
    assert disk.host["activation cache"] == 0 and disk.resume_bytes == cpu.resume_bytes + 4 * 32 * 64 * 4


def test_smaller_batch_when_the_plan_does_not_fit(
    capsys, caplog, monkeypatch, tiny_checkpoint, calib_text_file, tmp_path
) -> None:
    """Batch size 4 does not fit, 2 does: the run says so in one line and writes the same bytes as a
    run asked for batch size 2; interrupted and rerun with plenty of memory, it keeps batch size 2."""
    ref = tmp_path / "ref" / "out"
    assert _run(capsys, caplog, _cmd(tiny_checkpoint, ref, calib_text_file, 2))[0] == 0
    available = _fitting(_peak(tiny_checkpoint, calib_text_file, 2))
    assert _peak(tiny_checkpoint, calib_text_file, 4) > preflight.HOST_SLACK * available
    monkeypatch.setattr(preflight, "available_memory", lambda: available)
    out, cmd = tmp_path / "out", _cmd(tiny_checkpoint, tmp_path / "out", calib_text_file, 4)
    calls = {"n": 0}
    original = pipeline._quantize_layer

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_quantize_layer", interrupted)
        code, err = _run(capsys, caplog, cmd)
    assert code == 130
    adapting = [line for line in err.splitlines() if "adapting" in line]
    assert len(adapting) == 1 and "(batch size 4 -> 2)" in adapting[0], err
    assert adapting[0].startswith("WARNING llmquant.api: estimated peak host memory ")
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["run"] == {"batch_size": 2}
    monkeypatch.setattr(preflight, "available_memory", lambda: 2**40)
    code, err = _run(capsys, caplog, cmd)
    assert code == 0, err
    assert "resuming with batch size 2, as the interrupted run chose" in err and "adapting" not in err
    assert _files(out) == _files(ref)


def test_activation_cache_on_disk_when_no_batch_size_fits(
    capsys, caplog, monkeypatch, tiny_checkpoint, calib_text_file, tmp_path
) -> None:
    """Batch size 1 does not fit in memory with the cache; with the cache in a file of OUT.partial it
    does: same bytes as the in-memory run."""
    ref = tmp_path / "ref" / "out"
    assert _run(capsys, caplog, _cmd(tiny_checkpoint, ref, calib_text_file, 1))[0] == 0
    available = _fitting(_peak(tiny_checkpoint, calib_text_file, 1, offload=True))
    assert _peak(tiny_checkpoint, calib_text_file, 1) > preflight.HOST_SLACK * available
    monkeypatch.setattr(preflight, "available_memory", lambda: available)
    seen = []
    original = pipeline.activation_buffers
    monkeypatch.setattr(pipeline, "activation_buffers", lambda *a: seen.append(a[-1]) or original(*a))
    code, err = _run(capsys, caplog, _cmd(tiny_checkpoint, tmp_path / "out", calib_text_file, 1))
    assert code == 0, err
    assert "adapting (activation cache on disk in OUT.partial)" in err
    partial = tmp_path / "out.partial"  # both streams' caches (the default GPTQ carries the float one)
    assert seen == [partial / pipeline.ACTIVATION_CACHE, partial / pipeline.FLOAT_ACTIVATION_CACHE]
    assert _files(tmp_path / "out") == _files(ref) and not (tmp_path / "out.partial").exists()


def test_refused_with_the_numbers_when_nothing_fits(tiny_checkpoint, calib_text_file, tmp_path) -> None:
    config, calibration = GPTQConfig(QuantScheme(4, 32, True)), CalibrationConfig(str(calib_text_file), 4, 32)
    with pytest.raises(errors.InsufficientMemoryError) as exc:
        quantize_checkpoint(tiny_checkpoint, tmp_path / "out", config, calibration, available_memory=2**20)
    message = str(exc.value)
    assert (
        message.startswith("estimated peak host memory ")
        and "is over the 0.00 GiB available even with " in message
    )
    assert "batch size 8 -> 1, activation cache on disk in OUT.partial; lower --n-samples" in message
    assert not list(tmp_path.glob("out*"))  # refused before any work


def test_offloaded_cache_resumes_to_the_same_result(monkeypatch, tiny_checkpoint, tmp_path) -> None:
    """Interrupted with the cache on disk, resumed (cache on disk, then in memory): same codes as one
    in-memory run -- where the cache lives is not part of the result."""
    import torch

    from llmquant.calibration import CalibrationBlocks, fingerprint

    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    blocks = CalibrationBlocks(ids, mask, "test", fingerprint(ids, mask))
    config = GPTQConfig(QuantScheme(4, 32, True))

    def run(resume: Path, offload: bool) -> dict:
        result = pipeline.quantize(
            tiny_checkpoint, config, blocks, batch_size=4, resume_dir=resume, progress=False,
            offload_activations=offload,
        )  # fmt: skip
        return {n: (qw.codes, qw.scales) for n, qw in result.quantized.items()}

    reference = run(tmp_path / "ref", offload=False)
    original = pipeline._quantize_layer
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_quantize_layer", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                  if a[1] == 1 else original(*a, **k))  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "r", offload=True)
    assert (tmp_path / "r" / "activations.cache").stat().st_size == 6 * 32 * 64 * 4
    for offload in (True, False):  # resumed from layer 1, then with every layer done
        resumed = run(tmp_path / "r", offload=offload)
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(a, b) for n in reference for a, b in zip(resumed[n], reference[n]))
