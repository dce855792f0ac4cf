"""Every bad input a user can hand `llmquant` is answered in one line (`llmquant: error: ...`, exit 2, no
traceback) that names what is wrong, before any work; the Python API raises the typed errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmquant import errors
from llmquant.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, *argv: str) -> str:
    code, _, err = _run(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.startswith("llmquant: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _rtn(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "-o", str(out), "--method", "rtn", "--group-size", "32", *extra]


def _gptq(model: Path, out: Path, calib: Path | str, *extra: str) -> list[str]:
    return [
        "quantize", str(model), "-o", str(out), "--method", "gptq", "--group-size", "32",
        "--calib", str(calib), "--n-samples", "4", "--seqlen", "32", *extra,
    ]  # fmt: skip


# ---- model path and config ------------------------------------------------------------------------
def test_missing_model_path(capsys, tmp_path) -> None:
    line = _one_line_error(capsys, *_rtn(tmp_path / "nope", tmp_path / "out"))
    assert "nope does not exist" in line


def test_model_path_is_a_file(capsys, tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    assert "is not a directory" in _one_line_error(capsys, *_rtn(tmp_path / "f", tmp_path / "out"))


def test_config_json_missing(capsys, tiny_checkpoint, tmp_path) -> None:
    (tiny_checkpoint / "config.json").unlink()
    assert "no config.json" in _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))


def test_config_json_invalid(capsys, tiny_checkpoint, tmp_path) -> None:
    (tiny_checkpoint / "config.json").write_text('{"model_type": "llama",')
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))
    assert f"{tiny_checkpoint}/config.json is not valid JSON" in line


def test_unsupported_architecture(capsys, tiny_checkpoint, tmp_path) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    (tiny_checkpoint / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))
    assert "model_type 'gpt2' is not supported" in line and "arch.py" in line


def test_nan_weight_is_named(capsys, tiny_checkpoint, tmp_path) -> None:
    shard = tiny_checkpoint / "model.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))
    assert f"weight {name} in {shard} holds 1 NaN/inf values" in line
    assert not (tmp_path / "out").exists()


# ---- format / scheme --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--format", "awq", "--group-size", "48"], "cannot store a ragged last group"),
        (["--format", "awq", "--bits", "3"], "format 'awq' supports bits [4]"),
        (["--format", "gptq", "--asym"], "gptq_v2"),
        (["--format", "exl2"], "exl2"),
        (["--refine-scales"], "add --refine STEPS"),
    ],
)
def test_format_refused_before_work(capsys, tiny_checkpoint, tmp_path, extra, needle) -> None:
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"), *extra)
    assert needle in line
    assert not list(tmp_path.glob("out*")), "nothing may be left behind (no OUT.partial)"


# ---- calibration ------------------------------------------------------------------------------------
def test_calibration_file_empty(capsys, tiny_checkpoint, tmp_path) -> None:
    calib = tmp_path / "empty.txt"
    calib.write_text("")
    line = _one_line_error(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", calib))
    assert f"calibration file {calib} is empty" in line


def test_calibration_file_not_utf8(capsys, tiny_checkpoint, tmp_path) -> None:
    calib = tmp_path / "latin1.txt"
    calib.write_bytes(b"caf\xe9 " * 100)
    line = _one_line_error(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", calib))
    assert f"calibration file {calib} is not UTF-8 text" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_calibration_file_unreadable(capsys, tiny_checkpoint, tmp_path) -> None:
    calib = tmp_path / "secret.txt"
    calib.write_text("some text " * 100)
    calib.chmod(0)
    line = _one_line_error(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", calib))
    assert f"calibration file {calib} is not readable" in line


def test_calibration_file_too_short(capsys, tiny_checkpoint, tmp_path) -> None:
    calib = tmp_path / "short.txt"
    calib.write_text("the model weights are quantized")
    line = _one_line_error(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", calib))
    assert f"calibration file {calib} has" in line and "lower --n-samples or --seqlen" in line


def test_calibration_path_missing(capsys, tiny_checkpoint, tmp_path) -> None:
    line = _one_line_error(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", tmp_path / "no.txt"))
    assert f"no file exists at {tmp_path / 'no.txt'}" in line


def test_calibration_path_is_a_directory(capsys, tiny_checkpoint, tmp_path) -> None:
    line = _one_line_error(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", tmp_path))
    assert f"calibration source {tmp_path} is a directory; pass a text file" in line


def test_seqlen_beyond_context(capsys, tiny_checkpoint, calib_text_file, tmp_path) -> None:
    argv = _gptq(tiny_checkpoint, tmp_path / "out", calib_text_file)
    argv[argv.index("--seqlen") + 1] = "4096"
    line = _one_line_error(capsys, *argv)
    assert "--seqlen 4096 is beyond the model's context (256 tokens" in line and "--seqlen 256" in line


# ---- output -----------------------------------------------------------------------------------------
def test_existing_output_is_refused_and_kept(capsys, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, out))
    assert f"output {out} already exists; pass --overwrite" in line
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, err = _run(capsys, *_rtn(tiny_checkpoint, out), "--overwrite")
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()


def test_output_not_writable(capsys, tiny_checkpoint, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, blocker / "out"))
    assert f"cannot write the output {blocker / 'out'}: {blocker} is a file, not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_parent_without_write_permission(capsys, tiny_checkpoint, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, locked / "out"))
    assert f"cannot write the output {locked / 'out'}: {locked} is not writable" in line


def test_not_enough_disk(capsys, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    import shutil

    from llmquant import preflight

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))
    assert "not enough free disk for the output" in line and "0.00 GiB free" in line
    assert not list(tmp_path.glob("out*"))


def test_not_enough_memory_is_refused_with_numbers(capsys, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    from llmquant import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 2**20)
    line = _one_line_error(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))
    assert "estimated peak host memory" in line and "is over the 0.00 GiB available" in line
    code, _, err = _run(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"), "--no-memory-check")
    assert code == 0, err


def test_output_follows_umask(capsys, tiny_checkpoint, tmp_path) -> None:
    old = os.umask(0o027)
    try:
        code, _, err = _run(capsys, *_rtn(tiny_checkpoint, tmp_path / "out"))
    finally:
        os.umask(old)
    assert code == 0, err
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes


# ---- the Python API raises the typed errors ---------------------------------------------------------
def test_api_raises_typed_errors(tiny_checkpoint, tmp_path) -> None:
    from llmquant import QuantScheme, RTNConfig
    from llmquant.api import quantize_checkpoint

    config = RTNConfig(QuantScheme(4, 32, True))
    with pytest.raises(errors.ModelNotFoundError):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "out", config)
    (tmp_path / "out").mkdir()
    with pytest.raises(errors.OutputExistsError) as exc:
        quantize_checkpoint(tiny_checkpoint, tmp_path / "out", config)
    assert isinstance(exc.value, FileExistsError)
    with pytest.raises(errors.FormatError) as fmt:
        quantize_checkpoint(
            tiny_checkpoint, tmp_path / "o2", RTNConfig(QuantScheme(3, 32, True)), format="awq"
        )
    assert isinstance(fmt.value, ValueError) and not list(tmp_path.glob("o2*"))


def test_resume_state_of_another_run_is_refused_with_the_reason(tiny_checkpoint, tmp_path) -> None:
    from llmquant import QuantScheme, RTNConfig, quantize

    partial = tmp_path / "out.partial"
    quantize(tiny_checkpoint, RTNConfig(QuantScheme(4, 32, True)), resume_dir=partial, progress=False)
    assert json.loads((partial / "state.json").read_text())["layers_done"] == 2
    with pytest.raises(errors.ResumeMismatchError) as exc:
        quantize(tiny_checkpoint, RTNConfig(QuantScheme(4, 64, True)), resume_dir=partial, progress=False)
    assert "(method config differs)" in str(exc.value) and "--no-resume" in str(exc.value)
    # the same config on changed weights: the model's content fingerprint differs
    shard = tiny_checkpoint / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(errors.ResumeMismatchError, match=r"\(model differs\)"):
        quantize(tiny_checkpoint, RTNConfig(QuantScheme(4, 32, True)), resume_dir=partial, progress=False)


def test_damaged_resume_state_is_named(
    capsys, monkeypatch, tiny_checkpoint, calib_text_file, tmp_path
) -> None:
    """A resume directory whose state.json names files that are gone or garbled (deleted by hand, a
    full disk): one line naming the file and the remedy, not a traceback or a silently wrong output."""
    from llmquant import api

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = _gptq(tiny_checkpoint, out, calib_text_file)
    with monkeypatch.context() as m:  # interrupted once every layer is done, before the save
        m.setattr(api, "save_quantized", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert _run(capsys, *cmd)[0] == 130
    assert json.loads((partial / "state.json").read_text())["layers_done"] == 2
    acts = partial / "activations-00002.safetensors"
    acts.rename(tmp_path / acts.name)
    assert _one_line_error(capsys, *cmd) == (
        f"llmquant: error: resume file {partial}/activations-00002.safetensors is missing; {partial} is "
        "damaged: pass --no-resume (resume=False) to start over"
    )
    (tmp_path / acts.name).rename(acts)
    (partial / "layer-00001.safetensors").write_bytes(b"garbage")
    line = _one_line_error(capsys, *cmd)
    assert f"resume file {partial}/layer-00001.safetensors cannot be read (" in line and "--no-resume" in line
    code, _, err = _run(capsys, *cmd, "--no-resume")
    assert code == 0, err
    assert not partial.exists()


def test_synthetic_calibration_on_a_streamed_checkpoint(capsys, tiny_checkpoint, tmp_path) -> None:
    code, _, err = _run(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", "synthetic"))
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["calibration"]["source"] == "synthetic"


def test_dry_run_prints_the_plan_and_writes_nothing(
    capsys, tiny_checkpoint, calib_text_file, tmp_path
) -> None:
    code, out, err = _run(capsys, *_gptq(tiny_checkpoint, tmp_path / "out", calib_text_file), "--dry-run")
    assert code == 0, err
    for needle in ("peak host memory (estimate)", "host: Hessians", "activation cache", "gptq -> gptq"):
        assert needle in out, out
    assert not list(tmp_path.glob("out*"))
