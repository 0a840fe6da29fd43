"""Every command the README shows is valid: `run_suite.py` lines parse with the real CLI and
name real suites, and every `make` target exists. (The commands themselves run in other tests
and in CI: `make test`, `make demo`, the cell, evaluate, describe and run commands.)"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

import peft_dml_cli as cli
from bench.suite import SUITES_DIR

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            if line:
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_two_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS


@pytest.mark.parametrize("command", [c for c in COMMANDS if "run_suite.py" in c])
def test_run_suite_commands_parse(command):
    argv = shlex.split(command)
    args = cli.build_parser().parse_args(argv[argv.index(next(a for a in argv if a.endswith("run_suite.py"))) + 1:])
    if getattr(args, "suite", None) and args.command in ("run", "status", "report") and not args.suite.endswith(".yaml"):
        assert (SUITES_DIR / f"{args.suite}.yaml").exists(), f"README names suite {args.suite!r}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_make_targets_exist(command):
    target = shlex.split(command)[1]
    proc = subprocess.run(["make", "-n", target, "SUITE=smoke"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
