"""The README's snippets run as written: its Python snippet executes (paths substituted, the hub upload
replaced by a recorder that verifies the folder) and every `llmquant ...` command line parses, with each
bracketed alternative spelled out."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llmquant.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    lines, out = [], []
    for block in _blocks("bash"):
        lines += block.replace("\\\n", " ").splitlines()
    for line in lines:
        line = line.split("  #")[0].strip()
        if line.startswith("llmquant "):
            out.append(line)
    return out


def _variants(line: str) -> list[list[str]]:
    """Without the optional [..] groups, and with each alternative of each group."""
    groups = re.findall(r"\[([^\]]+)\]", line)
    base = re.sub(r"\s*\[[^\]]+\]", "", line).replace(" ...", "")
    variants = [base]
    for group in groups:
        for alt in group.split(" | "):
            # an option's value alternatives (--format a|b, --grid a|b|c): each one on its own
            variants.extend(f"{base} {choice}" for choice in _value_choices(alt) or [alt])
    return [shlex.split(v)[1:] for v in variants]


def _value_choices(alt: str) -> list[str]:
    m = re.fullmatch(r"(--[\w-]+) (\S*\|\S*)", alt.strip())
    return [f"{m[1]} {value}" for value in m[2].split("|")] if m else []


def test_readme_has_commands_for_every_subcommand() -> None:
    used = {shlex.split(c)[1] for c in _commands()}
    assert used >= {"quantize", "eval", "inspect", "convert", "push"}, used


@pytest.mark.parametrize("line", _commands())
def test_readme_command_parses(line) -> None:
    parser = build_parser()
    for argv in _variants(line):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # 2 with a one-line error on any unknown or bad option; 0 for --version
            assert exc.code == 0, argv


def test_readme_python_snippet_runs(tiny_checkpoint, calib_text_file, tmp_path, monkeypatch) -> None:
    import llmquant.hub
    from llmquant.api import inspect_checkpoint

    (snippet,) = _blocks("python")
    words = calib_text_file.read_text().split()
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(words * (128 * 512 // len(words) + 1)))  # >= 128 x 512 tokens
    pushed = []
    monkeypatch.setattr(
        llmquant.hub,
        "push_checkpoint",
        lambda path, repo, **kw: pushed.append((inspect_checkpoint(path), repo)),
    )
    monkeypatch.chdir(tmp_path)
    _long_context(tiny_checkpoint)
    code = (
        snippet.replace("path/to/float-model", str(tiny_checkpoint))
        .replace("path/to/calib.txt", str(calib))
        .replace("path/to/wiki.test.raw", str(calib))
        .replace("windows=40", "windows=2")
    )
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["model"].llmquant_quantization_config["bits"] == 4
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out-awq" / "config.json").is_file()
    assert [repo for _, repo in pushed] == ["owner/name"] and pushed[0][0]["verified_now"]
    assert namespace["results"]["w4"].perplexity > namespace["results"]["float"].perplexity > 1


def _long_context(path: Path) -> None:
    """The snippet calibrates on 512-token sequences: give the tiny model a context that long."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 1024}))
