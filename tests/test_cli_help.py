"""The command line explains itself: --version, the command list on a bare `ablate`, help text and a
stated default for every option, examples in each command's help, one default profile everywhere."""

from __future__ import annotations

import argparse

import pytest

from ablations import __version__, cli


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ablate {cli.version()}"
    assert cli.version() == __version__ or cli.version()[0].isdigit()


def test_bare_ablate_lists_every_command(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for name in subparsers():
        assert f"\n    {name}" in err, name
    assert "examples:" in err


@pytest.mark.parametrize("command", sorted(cli.EXAMPLES))
def test_every_option_has_help_a_stated_default_and_the_command_has_examples(command):
    parser = subparsers()[command]
    text = parser.format_help()
    assert "examples:\n  ablate " + command in text
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._AppendAction))
        if not flag and action.required is False:
            help_text = parser._get_formatter()._get_help_string(action)
            assert "default" in help_text, f"{command} {action.option_strings[0]}: no default stated"


def test_every_examples_command_parses():
    parser = cli.build_parser()
    for lines in cli.EXAMPLES.values():
        for line in lines:
            argv = line.split(">")[0].split()[1:]
            parser.parse_args(argv)  # a wrong example exits 2 here


def test_one_default_profile_everywhere():
    defaults = {name: p.get_default("profile") for name, p in subparsers().items()
                if any(a.dest == "profile" for a in p._actions)}
    assert set(defaults.values()) == {"quick"}, defaults
    assert "complexity" in defaults
