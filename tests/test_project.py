"""Project wiring: the runtime files, the Dockerfile, and the command line's error handling."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from xdctr import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_dockerfile_uses_the_same_lock_and_package_list_as_make_setup():
    dockerfile = _read("Dockerfile")
    setup = _read("scripts/setup-runtime")
    assert re.search(r"^FROM debian:trixie-slim$", dockerfile, re.M)
    assert "suite=trixie" in setup
    for name in ("requirements.lock", "runtime/os-packages.txt"):
        assert re.search(rf"^COPY {re.escape(name)} ", dockerfile, re.M), name
        assert name.split("/")[-1] in setup, name
    assert "pip install --no-cache-dir -r /tmp/requirements.lock" in dockerfile
    assert "/tmp/os-packages.txt | xargs apt-get install" in dockerfile


def test_lock_pins_every_package_exactly():
    lines = [l for l in _read("requirements.lock").splitlines() if l and not l.startswith("#")]
    assert len(lines) > 100
    bad = [l for l in lines if not re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+\-]+", l)]
    assert bad == []
    pins = dict(l.split("==") for l in lines)
    assert pins["tfx"] == "1.21.0" and pins["tensorflow"].startswith("2.21.")


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["generate-logs", "--help"], ["import-interactions", "--help"], ["ingest", "--help"], ["pipeline", "run", "--help"], ["pipeline", "compile", "--help"], ["evaluate", "--help"], ["compare", "--help"], ["route", "--help"], ["loadtest", "--help"], ["ab-report", "--help"], ["finetune", "--help"], ["benchmark", "train", "--help"], ["benchmark", "ingest", "--help"], ["benchmark", "serve", "--help"],
                 ["serve", "--help"], ["predict", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        assert "usage: xdctr" in capsys.readouterr().out


def _subparsers(parser):
    """(prog, parser) of every leaf subcommand under `parser`."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield parser.prog, parser
    for action in actions:
        for child in action.choices.values():
            yield from _subparsers(child)


def test_every_flag_has_help_and_shows_its_default():
    commands = [None, *cli.LAZY_COMMANDS, "benchmark"]
    checked = set()
    for command in commands:
        for prog, parser in _subparsers(cli.build_parser(command)):
            flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
            if prog in checked or (command and not flags):
                continue  # lazy commands have their flags only when built for themselves
            checked.add(prog)
            text = parser.format_help()
            for action in flags:
                assert action.help, f"{prog} {action.option_strings[0]} has no help text"
                if action.default not in (None, False) and not action.required:
                    # Compared without whitespace: help wraps lines at spaces and hyphens.
                    assert "".join(f"(default: {action.default})".split()) in "".join(text.split()), (
                        prog, action.option_strings[0])
    assert {"xdctr generate-logs", "xdctr benchmark train", "xdctr serve", "xdctr demo"} <= checked


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "xdctr", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["ingest", "--input", "/no/such/file*.jsonl", "--out", "/tmp/x"], "no input file matches '/no/such/file*.jsonl'"),
    (["generate-logs", "--out", "/tmp/x.jsonl", "--users", "0"], "num_users"),
])
def test_wrong_invocations_print_one_clear_line(args, message):
    result = _run_cli(*args)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xdctr: error:") and message in lines[0]
    assert "Traceback" not in result.stderr
