"""The model card: pure rendering from card facts (YAML header, body, no placeholders), and the card
every checkpoint gets, with the run's true calibration hash, module log and (after ``eval
--update-card``) its measured perplexity."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from transformers import AutoTokenizer

from llmquant import card, pipeline
from llmquant.api import inspect_checkpoint, save_quantized
from llmquant.cli import main
from llmquant.config import QuantScheme, RTNConfig

PLACEHOLDERS = re.compile(r"\bNone\b|\bnan\b|\bn/a\b|TODO|TBD|\?\?|<[A-Z_]+>")


def _facts(**overrides) -> dict:
    facts = {
        "name": "tiny-w4",
        "model_ref": "tiny-w4",
        "on_hub": False,
        "base_model": "org/base",
        "source": "base-dir",
        "license": None,
        "format": "gptq",
        "bits": 4,
        "group_size": 64,
        "sym": True,
        "permuted": False,
        "ragged": False,
        "quantized_modules": 3,
        "method": "gptq",
        "method_config": {"damp": 0.01, "block_size": 128, "act_order": True, "scheme": {"bits": 4}},
        "calibration": {"source": "c4", "fingerprint": "ab" * 32, "n_samples": 128, "seqlen": 512},
        "tool_version": "0.1.0",
        "bytes_before": 3 * 2**20,
        "bytes_after": 2**20,
        "converted_from": None,
        "modules": [
            {"name": "a.q_proj", "loss": 0.5, "damp": 0.01, "seconds": 0.1, "tokens": 10, "fallback": None},
            {
                "name": "a.down_proj",
                "loss": 7.25,
                "damp": 0.1,
                "seconds": 0.1,
                "tokens": 10,
                "fallback": None,
            },
            {
                "name": "a.up_proj",
                "loss": 2.0,
                "damp": 1.0,
                "seconds": 0.1,
                "tokens": 10,
                "fallback": "cholesky",
            },
        ],
        "evaluations": [],
    }
    facts.update(overrides)
    return facts


def _header(text: str) -> dict:
    header, body = card.split_front_matter(text)
    assert body.startswith(card.CARD_MARKER)
    return header


def test_header_has_the_hub_metadata() -> None:
    text = card.render_card(_facts(license="apache-2.0"))
    header = yaml.safe_load(text.split("---\n")[1])  # parses as plain YAML too
    assert header == _header(text)
    assert header["base_model"] == "org/base" and header["base_model_relation"] == "quantized"
    assert header["library_name"] == "llmquant" and header["pipeline_tag"] == "text-generation"
    assert header["license"] == "apache-2.0"
    assert header["tags"] == ["llmquant", "gptq", "4-bit"]
    assert "model-index" not in header  # nothing measured yet


def test_unknown_facts_are_left_out_not_invented() -> None:
    facts = _facts(base_model=None, license=None, bytes_before=None, calibration=None, method="rtn")
    facts.update(method_config={"grid": "minmax"}, modules=[{"name": "m", "loss": None, "damp": None}])
    text = card.render_card(facts)
    header = _header(text)
    assert "base_model" not in header and "base_model_relation" not in header and "license" not in header
    assert "`base-dir`" in text  # the source is still named, in the body
    assert "| size (safetensors) | 1.0 MiB |" in text and "smaller" not in text
    assert "calibration | none" in text and "Evaluation" not in text and "perplexity" not in text
    assert "no per-module loss" in text
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.search(text)


def test_body_states_the_run() -> None:
    text = card.render_card(_facts())
    assert "4-bit GPTQ quantization of [org/base](https://huggingface.co/org/base)" in text
    assert f"`{'ab' * 32}`" in text and "128 x 512 tokens" in text and "`c4`" in text
    assert "`damp=0.01`, `block_size=128`, `act_order=True`" in text
    assert "3.0 MiB -> 1.0 MiB (3.00x smaller)" in text
    worst = text.index("`a.down_proj` | 7.25"), text.index("`a.up_proj` | 2"), text.index("`a.q_proj` | 0.5")
    assert list(worst) == sorted(worst)  # worst first
    assert "Dampening raised above 0.01 for 2 modules" in text and "| `a.up_proj` | 1 |" in text
    assert "1 module fell back to round-to-nearest" in text and "| `a.up_proj` | cholesky |" in text
    assert 'llmquant.from_pretrained("tiny-w4", device="cuda")' in text
    assert 'AutoModelForCausalLM.from_pretrained("tiny-w4", device_map="auto")' in text
    assert 'LLM(model="tiny-w4")' in text
    assert not PLACEHOLDERS.search(text)


@pytest.mark.parametrize(
    ("overrides", "runtime", "loads", "note"),
    [
        ({"ragged": True}, "vLLM", False, "ragged last group"),
        ({"ragged": True}, "transformers", False, "ragged last group"),
        ({"format": "compressed-tensors", "bits": 3}, "vLLM", False, "not 3-bit"),
        ({"format": "compressed-tensors"}, "transformers", True, "pip install compressed-tensors"),
        ({"format": "gptq_v2", "sym": False}, "vLLM", False, "bits=4, sym=False"),  # measured, clients.md
        ({"format": "gptq_v2", "sym": True}, "vLLM", True, "Marlin kernels"),
        ({"format": "gptq", "permuted": True}, "vLLM", False, "desc_act"),
        ({"format": "compressed-tensors", "sym": False}, "transformers", True, "dequantize=True"),
        ({"format": "compressed-tensors", "sym": False}, "vLLM", True, "Marlin kernels"),
        ({"format": "gptq", "group_size": 256}, "vLLM", True, "Marlin needs"),
        ({"format": "awq"}, "vLLM", True, "Marlin kernels"),
    ],
)
def test_runtime_support(overrides, runtime, loads, note) -> None:
    support = {name: (ok, why) for name, ok, why in card.runtime_support(_facts(**overrides))}
    assert support["llmquant"][0] is True
    assert support[runtime][0] is loads and note in support[runtime][1]
    text = card.render_card(_facts(**overrides))
    assert ("LLM(model=" in text) == support["vLLM"][0]
    dequantize = overrides.get("format") == "compressed-tensors" and overrides.get("sym") is False
    assert ("quantization_config=CompressedTensorsConfig(dequantize=True))" in text) == dequantize


def test_evaluations_go_to_the_body_and_model_index() -> None:
    first = {
        "text": "wiki.test.raw",
        "text_sha256": "cd" * 32,
        "perplexity": 23.456789,
        "n_windows": 2,
        "n_tokens": 4096,
        "seqlen": 2048,
        "command": "llmquant eval q --text wiki.test.raw --windows 2 --update-card",
        "base": None,
    }
    second = {
        **first,
        "perplexity": 22.5,
        "base": "base-dir",
        "base_perplexity": 20.0,
        "kl_divergence": 0.0123,
    }
    evaluations = card.merge_evaluation(card.merge_evaluation([], first), second)
    assert len(evaluations) == 2  # a different base: a different measurement
    assert card.merge_evaluation(evaluations, {**second, "perplexity": 21.0})[-1]["perplexity"] == 21.0
    assert len(card.merge_evaluation(evaluations, {**second, "perplexity": 21.0})) == 2  # replaced
    text = card.render_card(_facts(evaluations=evaluations))
    results = _header(text)["model-index"][0]["results"]
    assert [m["value"] for r in results for m in r["metrics"]] == [23.4568, 22.5, 0.0123]
    assert results[0]["task"]["type"] == "text-generation"
    assert "| `wiki.test.raw` | 2 x 2048 | 23.4568 |  |  |" in text
    assert "| 22.5000 | 20.0000 | 0.01230 nats/token |" in text
    assert "| KL(base \\|\\| quantized) |" in text  # escaped: a bare | would split the column
    assert first["command"] in text


# ---------------------------------------------------------------------------------------------------
# cards of real (tiny) checkpoints
# ---------------------------------------------------------------------------------------------------


def test_quantize_writes_the_runs_card(tiny_checkpoint, calib_text_file, tmp_path, capsys) -> None:
    (tiny_checkpoint / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# the base model\n")
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_checkpoint), "-o", str(out), "--group-size", "32", "--calib"]
    argv += [str(calib_text_file), "--n-samples", "4", "--seqlen", "32", "--base-model", "org/tiny"]
    assert main(argv) == 0
    text = (out / "README.md").read_text()
    header = _header(text)
    assert header["base_model"] == "org/tiny" and header["license"] == "mit"  # carried from the base
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
    assert f"`{meta['calibration']['fingerprint']}`" in text and "4 x 32 tokens" in text
    log = json.loads((out / "quant_log.json").read_text())["modules"]
    worst = max(log, key=lambda m: m["hessian_error"])  # logs before 0.1.1 said "loss" (the fixture above)
    assert f"| `{worst['name']}` | {worst['hessian_error']:.4g} |" in text
    size = sum(f.stat().st_size for f in tiny_checkpoint.glob("*.safetensors"))
    assert f"{size / 2**20:.1f} MiB -> " in text
    assert not PLACEHOLDERS.search(text)
    assert inspect_checkpoint(out)["verified_now"] is True
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--base-model", "no-owner"]) == 2
    assert "--base-model must be a hub model id" in capsys.readouterr().err


def test_eval_update_card_records_the_measurement(tiny_checkpoint, calib_text_file, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    result = pipeline.quantize(tiny_checkpoint, RTNConfig(QuantScheme(4, 32, True)), progress=False)
    out = save_quantized(
        result, tmp_path / "q", format="compressed-tensors", tokenizer=tok, base_model="org/tiny"
    )
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"}
    argv = ["eval", str(out), "--text", str(calib_text_file), "--windows", "2", "--seqlen", "64"]
    assert main([*argv, "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert "perplexity" not in (out / "README.md").read_text()  # nothing measured is shown before
    assert main([*argv, "--base", str(tiny_checkpoint), "--update-card"]) == 0
    capsys.readouterr()
    text = (out / "README.md").read_text()
    metrics = _header(text)["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == round(measured["perplexity"], 4)  # the run's true number
    assert metrics[1]["type"] == "kl_divergence" and metrics[1]["value"] >= 0
    assert f"| {measured['perplexity']:.4f} |" in text
    assert f"llmquant eval {out} --text {calib_text_file} --windows 2 --seqlen 64 --base" in text
    assert main([*argv, "--base", str(tiny_checkpoint), "--update-card"]) == 0  # same measurement again
    assert len(json.loads((out / "eval_results.json").read_text())["evaluations"]) == 1
    after = {
        p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("README.md", "eval_results.json")
    }
    assert after == before and inspect_checkpoint(out)["verified_now"] is True
    modes = {(out / n).stat().st_mode & 0o777 for n in ("README.md", "eval_results.json", "config.json")}
    assert len(modes) == 1  # the rewritten files get the same permissions as the others


def test_update_card_leaves_a_users_card_alone(tiny_checkpoint, calib_text_file, tmp_path, capsys) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    result = pipeline.quantize(tiny_checkpoint, RTNConfig(QuantScheme(4, 32, True)), progress=False)
    out = save_quantized(result, tmp_path / "q", format="gptq", tokenizer=tok)
    (out / "README.md").write_text("# my own card\n")
    argv = ["eval", str(out), "--text", str(calib_text_file), "--windows", "1", "--seqlen", "64"]
    assert main([*argv, "--update-card"]) == 0
    assert (out / "README.md").read_text() == "# my own card\n"
    assert json.loads((out / "eval_results.json").read_text())["evaluations"][0]["n_windows"] == 1
    assert main(["eval", str(tiny_checkpoint), "--text", str(calib_text_file), "--update-card"]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err


def test_split_front_matter_without_header() -> None:
    assert card.split_front_matter("# title\n") == ({}, "# title\n")
    assert card.split_front_matter("---\nlicense: mit\n---\nbody") == ({"license": "mit"}, "body")
    assert (
        card.is_repo_id("org/name-1.5B") and not card.is_repo_id("name") and not card.is_repo_id("/abs/dir")
    )


def test_card_is_written_inside_the_atomic_save(make_tiny_llama, tmp_path, monkeypatch) -> None:
    """A failing card render leaves nothing at the output path (it runs before the rename)."""
    from llmquant import hub

    def boom(*args, **kwargs):
        raise RuntimeError("card failed")

    monkeypatch.setattr(hub, "write_card", boom)
    result = pipeline.quantize(make_tiny_llama(), RTNConfig(QuantScheme(4, 32, True)), progress=False)
    with pytest.raises(RuntimeError, match="card failed"):
        save_quantized(result, tmp_path / "q", format="gptq")
    assert list(tmp_path.iterdir()) == []


def test_awq_summary_counts_what_the_transform_did() -> None:
    from llmquant.card import awq_summary

    modules = [
        {"name": "q", "transform": {"awq_alpha": 0.5, "awq_loss": 1.0, "awq_loss_identity": 2.0}},
        {"name": "k", "transform": {"awq_alpha": None, "awq_loss": 2.0, "awq_loss_identity": 2.0}},
        {"name": "o", "transform": {"awq_skipped": "GQA", "clip_loss": 1.0, "clip_loss_unclipped": 4.0}},
        {"name": "down", "transform": None},
    ]
    s = awq_summary(modules)
    assert s == {
        "searched": 2,
        "scaled": 1,
        "median_alpha": 0.5,
        "skipped": {"GQA": 1},
        "clipped": 1,
        "mean_clip_gain": 0.75,
    }
    assert awq_summary([{"name": "q", "transform": None}]) is None
