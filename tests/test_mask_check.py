"""mask-check: labelled objects measured in mm against the block edge, and the share one mask hides entirely."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_volume
from ctmae.cli import app
from ctmae.experiments.mask_check import check_masking, hidden_share, object_sizes
from ctmae.io.discovery import find_volumes
from ctmae.mae.config import RunConfig

AXIS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture
def label_file(tmp_path):
    """Class 1: a 4 mm cube and a 60 x 40 x 20 mm box; class 2: an 8 mm cube. 2 mm voxels."""
    lab = np.zeros((60, 60, 40), dtype=np.int16)
    lab[2:4, 2:4, 2:4] = 1  # 2 voxels = 4 mm
    lab[20:50, 20:40, 10:20] = 1  # 30 x 20 x 10 voxels
    lab[5:9, 50:54, 30:34] = 2  # 8 mm
    return write_volume(tmp_path / "labels" / "case.nii.gz", lab, spacing=(2.0, 2.0, 2.0), direction=AXIS)


def cfg(block: int = 2, ratio: float = 0.75) -> RunConfig:
    return RunConfig.from_dict({"model": {"size": "tiny"}, "mask": {"block": block, "ratio": ratio}})


def test_objects_are_measured_in_millimetres(label_file):
    (source,), _ = find_volumes([label_file], skip_labels=False)
    objects = sorted(object_sizes(source), key=lambda o: o["voxels"])
    assert [(o["class"], o["extent_mm"]) for o in objects] == [
        (1, [4.0, 4.0, 4.0]),
        (2, [8.0, 8.0, 8.0]),
        (1, [60.0, 40.0, 20.0]),
    ]


def test_a_tiny_object_is_hidden_about_as_often_as_the_ratio_and_a_huge_one_never():
    shares = hidden_share(np.array([[1.0, 1.0, 1.0], [120.0, 120.0, 120.0]]), cfg(block=1), draws=400)
    assert abs(shares[0] - 0.75) < 0.08 and shares[1] == 0.0


def test_larger_blocks_hide_mid_sized_objects_whole_more_often():
    mid = np.array([[40.0, 40.0, 40.0]])  # about 1.7 tokens of 24 mm
    assert hidden_share(mid, cfg(block=3), draws=400)[0] > hidden_share(mid, cfg(block=1), draws=400)[0] + 0.2


def test_report_recommends_a_block_and_the_cli_writes_json_and_overlay(label_file, tmp_path):
    (source,), _ = find_volumes([label_file], skip_labels=False)
    report = check_masking([source], cfg(block=3), tolerance=0.1)
    by_block = report["hidden_share_by_block"]
    assert report["recommended_block"] == max(b for b, s in by_block.items() if s <= by_block[1] + 0.1)
    assert report["block_edge_mm"] == [72.0, 72.0, 72.0]

    out = tmp_path / "check"
    result = CliRunner().invoke(app, ["mask-check", str(label_file.parent), "--block", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "block edge 72x72x72 mm" in text and f"recommended: --block {report['recommended_block']}" in text
    assert json.loads((out / "mask_check.json").read_text(encoding="utf-8"))["objects"][0]["extent_mm"]
    assert (out / "overlay.png").stat().st_size > 0


def test_a_ct_scan_is_not_a_label_map(tmp_path):
    ct = np.full((20, 20, 20), -1000.0)
    path = write_volume(tmp_path / "ct.nii.gz", ct)
    result = CliRunner().invoke(app, ["mask-check", str(path)])
    assert result.exit_code == 1 and "label values must be class indices" in result.output
    assert "Traceback" not in result.output
