"""One command line across every command: list flags either way, DeepSpeedExamples' flags, --help that shows
every default in plain text, and an unknown data_prep command named."""
from __future__ import annotations

import argparse
import re

import pytest

from tests.conftest import load_script

SCRIPTS = ["demo", "distill", "finetune", "grid", "pretrain", "report", "retrieval", "speed",  # launch/
           "bench_corpus", "bench_grid", "bench_packing", "bench_shards", "bench_train"]  # benchmarks/
DATA_PREP = {"corpus": "data_prep.corpus", "libreoffice": "data_prep.libreoffice", "tasks": "data_prep.tasks.cli",
             "demo_tasks": "data_prep.demo_tasks",
             "e5_teacher": "data_prep.e5_teacher", "trim_vocab": "data_prep.trim_vocab", "verify": "data_prep.verify"}
MARKUP = re.compile(r"``|`|:[a-z]+:`|\bNone\b|\bTrue\b|\bFalse\b|\[['\"]|%\(|(?<![\w*])\*\w[^*\n]*\w\*(?![\w*])")


def parser_of(command: str) -> argparse.ArgumentParser:
    if command in DATA_PREP:
        import importlib

        return importlib.import_module(DATA_PREP[command]).build_parser()
    return load_script(command).build_parser()


def test_every_data_prep_command_is_covered():
    from data_prep.__main__ import COMMANDS

    assert set(COMMANDS) <= set(DATA_PREP)


def _needs_no_default(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    """Help, hidden, positional and required options, and members of a required either-or group."""
    in_required_group = any(g.required and action in g._group_actions for g in parser._mutually_exclusive_groups)
    return (isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS or not action.option_strings
            or action.required or in_required_group)


@pytest.mark.parametrize("command", SCRIPTS + list(DATA_PREP))
def test_help_shows_every_default_without_markup(command):
    parser = parser_of(command)
    text = parser.format_help()
    assert not MARKUP.search(text), f"{command} --help: markup {MARKUP.search(text).group()!r} in\n{text}"
    assert not re.search(r"\S {4,}-", text), f"{command} --help: a docstring line continuation was lost:\n{text}"
    formatter = parser._get_formatter()
    lacking = [a.option_strings[0] for a in parser._actions
               if not _needs_no_default(parser, a) and "default" not in formatter._expand_help(a).lower()]
    assert not lacking, f"{command} --help: no default shown for {lacking}"
    twice = [a.option_strings[0] for a in parser._actions
             if a.option_strings and formatter._expand_help(a).lower().count("default") > 1]
    assert not twice, f"{command} --help: a default shown twice for {twice}"


LANG_COMMANDS = {  # command -> the other arguments it needs to parse
    "corpus": ["--raw", "r", "--out", "o"],
    "libreoffice": ["--raw", "r"],
    "demo_tasks": ["--heldout", "h"],
    "tasks": ["--task", "xnli", "--src", "s", "--out", "o"],
    "retrieval": ["--models", "a=b", "--heldout", "h", "--out", "o"],
    "trim_vocab": ["--model", "m", "--corpus", "c", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(LANG_COMMANDS))
def test_langs_space_or_comma_separated(command):
    parser = parser_of(command)
    base = LANG_COMMANDS[command]
    spaced = parser.parse_args([*base, "--langs", "en", "fr", "de"]).langs
    assert spaced == ["en", "fr", "de"]
    assert parser.parse_args([*base, "--langs", "en,fr,de"]).langs == spaced
    assert parser.parse_args([*base, "--langs", "en,fr", "de"]).langs == spaced
    assert parser.parse_args([*base, "--langs", "en fr de"]).langs == spaced  # the former quoted form
    if command == "tasks":
        assert parser.parse_args([*base, "--train-langs", "en,es"]).train_langs == ["en", "es"]


def test_every_command_with_langs_is_covered():
    having = {c for c in SCRIPTS + list(DATA_PREP)
              if any("--langs" in a.option_strings for a in parser_of(c)._actions)}
    assert having == set(LANG_COMMANDS)


def test_other_list_flags_take_commas_too():
    grid = parser_of("grid")
    args = grid.parse_args(["--models", "a=b", "--data", "d", "--out", "o", "--seeds", "1,2", "3",
                            "--tasks", "xnli,pawsx"])
    assert args.seeds == [1, 2, 3] and args.tasks == ["xnli", "pawsx"]
    assert parser_of("demo").parse_args(["--seeds", "1,2"]).seeds == [1, 2]
    with pytest.raises(SystemExit):
        grid.parse_args(["--models", "a=b", "--data", "d", "--out", "o", "--seeds", "1,x"])


@pytest.mark.parametrize("command", ["pretrain", "distill"])
def test_deepspeed_examples_flags_are_accepted(command):
    extra = ["--model", "tiny-base"] if command == "pretrain" else ["--teacher", "t"]
    args = parser_of(command).parse_args(["--deepspeed", "--deepspeed_config", "ds_configs/zero2.json", *extra,
                                          "--data", "d", "--out", "o", "--max-steps", "1"])
    assert args.deepspeed and args.deepspeed_config == "ds_configs/zero2.json"
    hyphen = parser_of(command).parse_args(["--deepspeed-config", "x.json", *extra, "--data", "d", "--out", "o",
                                            "--epochs", "1"])
    assert hyphen.deepspeed_config == "x.json" and not hyphen.deepspeed


def test_unknown_data_prep_command_is_named(capsys):
    from data_prep.__main__ import main

    assert main(["corpse", "--raw", "r"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'corpse'" in err and "did you mean 'corpus'" in err
    assert main(["--help"]) == 0
    assert "usage: python -m data_prep" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--max-len", "--rows", "--repeats", "--sentences", "--window"])
def test_benchmark_counts_below_one_are_refused_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit) as e:
        load_script("bench_packing").build_parser().parse_args([flag, "0"])
    assert e.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
