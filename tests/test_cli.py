"""The `clipkit` command lists what exists and every subcommand documents itself."""

from __future__ import annotations

import pytest

from clipkit.cli.main import COMMANDS
from conftest import run_clipkit


def test_help_lists_every_command():
    result = run_clipkit("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert f"    {name} " in result.stdout, name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_help(name):
    result = run_clipkit(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: clipkit " + name)


def test_unknown_command_fails_with_choices():
    result = run_clipkit("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
