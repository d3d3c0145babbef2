"""Every sepify command in the README and the docs parses against the CLI as it is: no stale flag, no removed
command, no value its option refuses (the commands are parsed, not run; the tutorials run theirs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click.exceptions import UsageError  # typer vendors its own click

from sepify.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"```(?:bash|console|sh)\n(.*?)```", re.S)


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in _BLOCK.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.removeprefix("$ ").split("  #")[0].strip()
                if "-m sepify " in line:
                    line = "sepify " + line.split("-m sepify ", 1)[1]
                if line.startswith("sepify ") and "..." not in line and "[OPTIONS]" not in line:
                    found.append((page.relative_to(ROOT).as_posix(), line))
    return found


COMMANDS = _commands()


def test_the_docs_have_commands_to_check() -> None:
    assert len(COMMANDS) >= 15 and any(page == "README.md" for page, _ in COMMANDS)


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{c[7:40]}" for p, c in COMMANDS])
def test_a_documented_command_parses(page: str, line: str) -> None:
    group = typer.main.get_command(app)
    name, *args = shlex.split(line)[1:]
    with group.make_context("sepify", ["--version"], resilient_parsing=True) as ctx:
        command = group.get_command(ctx, name)  # type: ignore[attr-defined]
    assert command is not None, f"{page}: unknown command {name!r} in {line!r}"
    try:
        command.make_context(name, args)
    except UsageError as e:
        pytest.fail(f"{page}: {line!r} does not parse: {e.format_message()}")
