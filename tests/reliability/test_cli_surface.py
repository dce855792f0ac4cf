"""The command line a user reads: one-line usage errors, help that opens with what the tool does and states
every option's default, `--version`."""

from __future__ import annotations

import argparse

import pytest

from llmquant import __version__
from llmquant.cli import build_parser, main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["quantize"], "the following arguments are required"),
        (["quantize", "M", "-o", "O", "--bits", "5"], "argument --bits: invalid choice: 5"),
        (["quantize", "M", "-o", "O", "--group-size", "0"], "--group-size must be positive"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["eval", "C", "--text", "T", "--windows", "0"], "argument --windows: must be at least 1, got 0"),
        (["eval", "C", "--text", "T", "--seqlen", "x"], "argument --seqlen: expected a positive integer"),
        (["quantize", "M", "-o", "O", "--batch-size", "-1"], "argument --batch-size: must be at least 1"),
        (["quantize", "M", "-o", "O", "--grid", "best"], "argument --grid: invalid choice: 'best'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, needle) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("llmquant: error:") and needle in err, err


def test_help_opens_with_a_description(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    first_paragraph = out.split("\n\n")[1]
    assert first_paragraph.startswith("llmquant: one-shot low-bit weight quantization")
    assert "Module:" not in out and "argument parsing" not in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"llmquant {__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "convert", "push"])
def test_every_option_has_help_with_its_default(command) -> None:
    sub = _subparsers(build_parser())[command]
    formatter = sub._get_formatter()
    assert sub.description, f"{command} has no description"
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.option_strings and not flag and not action.required:
            text = formatter._expand_help(action)
            assert "default" in text, f"{command} {action.option_strings}: help states no default: {text!r}"
