"""The README's commands are real: every ``python -m MODULE [SUBCOMMAND]`` it shows answers
``--help``, and every ``--flag`` written after it on the same command line is one that command
lists (the launcher's ``--producer-args "..."`` / ``--trainer-args "..."`` strings are not its
own flags and are left out)."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache

import pytest

from helpers import ROOT

SUBCOMMANDS = {"producer": ("run", "record", "inspect", "replay", "prepare", "tokenizer train"), "shared.curve": ("keygen",)}
COMMAND = re.compile(r"python -m ([a-z_.]+)((?: [a-z]+)*)")


def readme_commands() -> list[tuple[str, set[str]]]:
    """(``module [subcommand]``, the flags written after it) for each command the README shows."""
    found = []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        for match in COMMAND.finditer(line):
            module, words = match.group(1), match.group(2).split()
            subcommand = next((sub for sub in SUBCOMMANDS.get(module, ()) if words[: len(sub.split())] == sub.split()), None)
            command = f"{module} {subcommand}" if subcommand else module
            rest = line[match.end():].split("|")[0].split("`")[0]  # to the end of its table cell or code span
            rest = re.sub(r'--(producer|trainer)-args[= ]"[^"]*"', "", rest)
            found.append((command, set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest))))
    return found


@cache
def help_text(command: str) -> str:
    done = subprocess.run([sys.executable, "-m", *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"python -m {command} --help failed: {done.stderr[-500:]}"
    return done.stdout


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_a_user_needs():
    shown = {command for command, _ in COMMANDS}
    assert {"producer prepare", "producer tokenizer train", "trainer.sample", "trainer.stack", "trainer"} <= shown, shown


@pytest.mark.parametrize("command", sorted({command for command, _ in COMMANDS}))
def test_every_readme_command_and_flag_exists(command):
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(command)))
    written = set().union(*(flags for name, flags in COMMANDS if name == command))
    assert written <= listed, f"README flags that python -m {command} does not take: {sorted(written - listed)}"
