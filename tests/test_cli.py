"""The command line: clean help, clear errors, the demo's options, an unknown command refused."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from georeparam import cli


def help_text(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_is_plain_text_without_phantom_arguments(argv, capsys):
    text = help_text(argv, capsys)
    for markup in ("``", ":class:", ":func:", ":mod:", ":data:", "REMAINDER"):
        assert markup not in text, markup
    assert not re.search(r"^\s*\.\. \w+::", text, re.M)  # no reST directives
    assert not re.search(r"\brest\b", text)  # no phantom positional
    assert "reproduce" not in text
    usage = text.split("\n\n")[0]
    assert re.search(r"\[-h\]", usage)
    if argv == ["demo", "--help"]:
        # every option says what it does: an option line is followed by its help on the same line
        demo_parser = cli.build_parser().parse_args(["demo"]).command_parser
        flags = [a.option_strings[-1] for a in demo_parser._actions]
        assert {
            "--steps",
            "--seed",
            "--width",
            "--target",
            "--runs",
            "--out",
            "--no-plot",
            "--no-save",
            "--no-progress",
        } <= set(flags)
        for action in demo_parser._actions:
            assert isinstance(action.help, str) and len(action.help) > 10, action.option_strings
        options = text.split("options:")[1]
        assert re.search(r"--seed SEED\s+seeds the data", options)
        assert "GmP-weight" in options  # not broken at its hyphen
    else:
        assert "demo" in text and "COMMAND" in text


def test_no_command_and_unknown_command_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "required: COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    assert e.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "LN:0.1"], "METHOD:LR"),
        (["--runs", "SP:fast"], "learning rate must be a number"),
        (["--steps", "0"], "--steps and --width must be ≥ 1"),
        (["--target", "2"], "--target must be an accuracy"),
        (["--steps", "ten"], "invalid int value: 'ten'"),
    ],
)
def test_demo_option_errors_name_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.startswith("usage: ")


def test_cli_runs_the_demo(tmp_path, capsys):
    out = tmp_path / "d"
    argv = [
        "demo",
        "--steps",
        "2",
        "--width",
        "3",
        "--runs",
        "SP:0.01,WN:0.1",
        "--no-progress",
        "--no-plot",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [
        line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and "method" not in line
    ]
    assert rows == ["SP", "WN"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert cli.main(argv[:-2] + ["--no-save"]) == 0
    assert "Saved" not in capsys.readouterr().out


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "georeparam", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m georeparam ")
    proc = subprocess.run(
        [sys.executable, "-m", "georeparam", "reproduce", "uci"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "invalid choice: 'reproduce'" in proc.stderr
