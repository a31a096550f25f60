"""Help texts read as users of other command lines expect: NAME arguments in usage lines, no type column on flags."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ctmae.cli import app

COMMANDS = [
    "pretrain",
    "reconstruct",
    "embed",
    "finetune-seg",
    "segment",
    "evaluate",
    "export",
    "info",
    "prepare",
    "study",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_braces_and_no_bool_type(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "{" not in result.output.split("\n\n")[0] + result.output.splitlines()[1]
    assert "<bool>" not in result.output


def test_usage_line_names_arguments_in_capitals():
    result = CliRunner().invoke(app, ["reconstruct", "--help"], env={"COLUMNS": "200"})
    assert "reconstruct [OPTIONS] CHECKPOINT INPUT" in result.output
    missing = CliRunner().invoke(app, ["reconstruct"], env={"COLUMNS": "200"})
    assert missing.exit_code == 2 and "{checkpoint}" not in missing.output


@pytest.mark.parametrize("command", [*COMMANDS, "mask-check"])
def test_flags_have_no_no_twins(command):
    """``--resume``, ``--yes`` and the like are one flag each: no ``--no-resume`` twin cluttering every help page."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--no-" not in result.output
