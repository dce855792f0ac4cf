"""The CLI: quantize -> inspect -> eval on a tiny checkpoint; user errors are one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmquant.cli import main


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures logging for a CLI process; undo it so other tests see the defaults."""
    import logging

    names = ["", "transformers", "accelerate", "datasets", "urllib3", "httpx", "filelock"]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.getLogger().handlers[:] = handlers


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_inspect_eval(tiny_checkpoint, calib_text_file, tmp_path, capsys) -> None:
    out_dir = tmp_path / "q"
    code, out, _ = _run(
        capsys,
        "quantize",
        str(tiny_checkpoint),
        "-o",
        str(out_dir),
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--calib",
        str(calib_text_file),
        "--n-samples",
        "4",
        "--seqlen",
        "32",
        "--no-static-groups",  # act-order (default) with a stored g_idx permutation
    )
    assert code == 0 and "verified" in out
    assert not (tmp_path / "q.partial").exists()  # resume state removed after a successful save
    log = json.loads((out_dir / "quant_log.json").read_text())["modules"]
    assert len(log) == 14 and all(row["tokens"] == 4 * 32 for row in log)

    code, out, _ = _run(capsys, "inspect", str(out_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "gptq" and info["quantized_modules"] == 14
    assert info["verified_at_save"] is True

    code, out, _ = _run(
        capsys,
        "eval",
        str(out_dir),
        "--text",
        str(calib_text_file),
        "--seqlen",
        "64",
        "--windows",
        "2",
        "--base",
        str(tiny_checkpoint),
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["n_windows"] == 2
    assert result["kl_divergence"] > 0 and result["perplexity"] > 1


def test_rtn_without_calibration(tiny_checkpoint, tmp_path, capsys, caplog) -> None:
    code, out, _ = _run(
        capsys,
        "quantize",
        str(tiny_checkpoint),
        "-o",
        str(tmp_path / "q"),
        "--method",
        "rtn",
        "--asym",
        "--format",
        "gptq_v2",
        "--group-size",
        "none",
    )
    assert code == 0
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qcfg["checkpoint_format"], qcfg["group_size"], qcfg["sym"]) == ("gptq_v2", -1, False)
    # asym GPTQ does not run in vLLM: one warning line that names the formats that do
    notes = [r.getMessage() for r in caplog.records if "vLLM" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "bits=4, sym=False" in notes[0] and "--format awq or compressed-tensors" in notes[0]


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_end_to_end(tiny_checkpoint, calib_text_file, tmp_path, capsys, method) -> None:
    out_dir = tmp_path / "q"
    argv = ["quantize", str(tiny_checkpoint), "-o", str(out_dir), "--method", method, "--group-size", "32"]
    code, out, err = _run(
        capsys, *argv, "--calib", str(calib_text_file), "--n-samples", "8", "--seqlen", "64"
    )
    assert code == 0, err
    qcfg = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["zero_point"], qcfg["group_size"]) == ("awq", True, 32)  # asym default
    assert qcfg["meta"]["method_config"]["method"] == method
    log = json.loads((out_dir / "quant_log.json").read_text())["modules"]
    assert any(m["transform"] and m["transform"].get("awq_alpha") is not None for m in log)
    code, out, _ = _run(
        capsys, "eval", str(out_dir), "--text", str(calib_text_file), "--seqlen", "64", "--json"
    )
    assert code == 0 and json.loads(out)["perplexity"] > 1


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["quantize", "/nonexistent/model", "-o", "OUT", "--method", "rtn"], "does not exist"),
        (["quantize", "MODEL", "-o", "OUT", "--method", "rtn", "--asym", "--format", "gptq"], "gptq_v2"),
        (["quantize", "MODEL", "-o", "OUT", "--method", "awq", "--format", "awq"], "ragged"),
        (["quantize", "MODEL", "-o", "OUT", "--calib", "/no/such/file.txt"], "no file exists"),
        (["quantize", "MODEL", "-o", "OUT", "--format", "exl2"], "exl2"),
        (["eval", "/nonexistent", "--text", "TEXT"], "does not exist"),
        (["inspect", "MODEL"], "not quantized"),
    ],
)
def test_user_errors_are_one_line(tiny_checkpoint, calib_text_file, tmp_path, capsys, argv, needle) -> None:
    subs = {"MODEL": str(tiny_checkpoint), "OUT": str(tmp_path / "out"), "TEXT": str(calib_text_file)}
    code, _, err = _run(capsys, *[subs.get(a, a) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("llmquant: error:") and needle in lines[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tiny_checkpoint, tmp_path, capsys) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    code, _, err = _run(
        capsys, "quantize", str(tiny_checkpoint), "-o", str(tmp_path / "o"), "--method", "rtn"
    )
    assert code == 2 and "not supported" in err and "Traceback" not in err


def test_bad_group_size_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "M", "-o", "O", "--group-size", "0"])
    assert exc.value.code == 2
    assert "--group-size" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmquant.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "quantize" in out.stdout and "inspect" in out.stdout
