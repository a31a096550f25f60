"""Over-masking: settings that leave the encoder too little context are refused or warned about, with numbers."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ctmae.cli import app
from ctmae.mae.config import RunConfig
from ctmae.mae.context import context_problem, context_warnings, visible_tokens


def cfg(ratio: float, crop: int = 32, patch: int = 8, block: int = 2, kind: str = "block") -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": patch},
            "data": {"crop": crop},
            "mask": {"kind": kind, "ratio": ratio, "block": block},
        }
    )


@pytest.mark.parametrize(
    "ratio, visible, refused, warned",
    [(0.5, 32, False, False), (0.75, 16, False, False), (0.9, 6, False, True), (0.99, 1, True, True)],
)
def test_visible_tokens_decide_refusal_and_warning(ratio, visible, refused, warned):
    c = cfg(ratio)  # 32³ crop of 8³ patches: 64 tokens
    assert visible_tokens(c) == (visible, 64)
    assert (context_problem(c) is not None) == refused
    assert any("tokens" in w for w in context_warnings(c)) == warned


def test_the_numbers_are_in_the_message():
    assert context_problem(cfg(0.99)) == (
        "mask ratio 0.99 leaves 1 of 64 tokens visible per 32³ crop (8³ patches); at least 2 are needed: lower "
        "--mask-ratio, or use a larger --crop or a smaller --patch"
    )
    assert context_warnings(cfg(0.9))[0].startswith("mask ratio 0.9 leaves 6 of 64 tokens (9%) visible per 32³ crop")


def test_a_block_as_large_as_the_crop_is_warned_about():
    (line,) = context_warnings(cfg(0.5, crop=64, patch=16, block=4))
    assert "spans the whole 4-token crop" in line and "--block 2" in line


@pytest.mark.parametrize("kind", ["none", "noise"])
def test_corruptions_that_hide_nothing_are_never_over_masked(kind):
    assert context_problem(cfg(0.99, kind=kind)) is None and context_warnings(cfg(0.99, kind=kind)) == []


def test_pretrain_refuses_over_masking_in_one_line_before_reading_scans(tmp_path):
    args = ["pretrain", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--model", "tiny"]
    result = CliRunner().invoke(app, [*args, "--crop", "32", "--patch", "8", "--mask-ratio", "0.99"])
    assert result.exit_code == 2
    assert "leaves 1 of 64 tokens visible" in " ".join(result.output.split())
    assert "Traceback" not in result.output
