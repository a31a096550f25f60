"""The Python API under the commands, called directly: ``ctmae.api.reconstruct`` and ``ctmae.api.embed`` write what
their commands write, return it, report progress and warnings to a reporter, print nothing, and refuse arguments
that cannot work before any work (``ctmae.api.segment`` is in test_segment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DATA, Heard, write_volume
from ctmae.api.common import OptionError
from ctmae.api.embed import embed
from ctmae.api.reconstruct import reconstruct
from ctmae.infer.reconstruct import OUTPUTS
from ctmae.io.checks import InputError

LUNG = SAMPLE_DATA / "ct" / "lung1.nii.gz"


def test_reconstruct_writes_and_returns_its_metrics(tiny_checkpoint, tmp_path, capfd):
    heard = Heard()
    result = reconstruct(tiny_checkpoint, LUNG, tmp_path / "o", seed=3, device="cpu", reporter=heard)
    assert capfd.readouterr() == ("", "")
    assert result.out == tmp_path / "o"
    assert sorted(p.name for p in result.out.iterdir()) == sorted([*OUTPUTS, "preview.png", "metrics.json"])
    assert result.metrics == json.loads((result.out / "metrics.json").read_text(encoding="utf-8"))
    assert result.metrics["mask"]["seed"] == 3 and result.metrics["masked"]["psnr"] > 0
    assert [e[1] for e in heard.events if e[0] == "warn"] == list(result.warnings)
    windows = [e for e in heard.events if e[0] == "windows"]
    assert len(windows) > 1 and windows[-1][1] == windows[-1][2]  # every window of the scan, reported as it ran


@pytest.mark.parametrize(
    "given, message",
    [
        ({"mask_unit": 24}, "--mask-unit 24 must be a multiple of the patch size 16"),
        ({"window_step": 24}, "--window-step 24 must be a multiple of the patch size 16, at most 64"),
        ({"mask": "nope"}, "nope"),
    ],
)
def test_reconstruct_refuses_what_the_checkpoint_cannot_take(tiny_checkpoint, tmp_path, given, message):
    with pytest.raises(OptionError, match=message):
        reconstruct(tiny_checkpoint, LUNG, tmp_path / "o", device="cpu", **given)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "scans" / "a.nii.gz", rng.integers(-1000, 1000, size=(30, 24, 20)), spacing=(2.0, 2.0, 3.0))
    write_volume(tmp_path / "scans" / "b.nrrd", rng.integers(-1000, 1000, size=(26, 28, 16)), spacing=(1.5, 2.5, 4.0))
    (tmp_path / "scans" / "notes.txt").write_text("not a scan\n", encoding="utf-8")
    return tmp_path / "scans"


def test_embed_writes_a_table_and_resumes_it(tiny_checkpoint, scans, tmp_path, capfd):
    heard = Heard()
    first = embed(tiny_checkpoint, [scans], tmp_path / "e.npz", device="cpu", reporter=heard)
    assert capfd.readouterr() == ("", "")
    assert (first.embedded, first.resumed, first.rows, first.stopped) == (2, 0, 2, None)
    with np.load(tmp_path / "e.npz") as z:
        assert list(z["ids"]) == ["a.nii.gz", "b.nrrd"] and np.isfinite(z["embeddings"]).all()
    progress = [e for e in heard.events if e[0] in ("start", "advance")]
    assert progress == [("start", "embedding", 2), ("advance", ""), ("advance", "")]
    assert ("skipped", first.skipped) in heard.events and any("notes.txt" in line for line in first.skipped)
    again = embed(tiny_checkpoint, [scans], tmp_path / "e.npz", device="cpu")
    assert (again.embedded, again.resumed, again.rows) == (0, 2, 2)


@pytest.mark.parametrize(
    "given, error, message",
    [
        ({"pool": "cls"}, OptionError, "no CLS token"),
        ({"out": "e.txt"}, OptionError, "--out must end in .npz, .csv, .parquet"),
        ({"inputs": "notes.txt"}, InputError, r"no scan embedded \(1 skipped\)"),
    ],
)
def test_embed_refuses_in_one_line(tiny_checkpoint, scans, tmp_path, given, error, message):
    inputs = [scans / given.pop("inputs")] if "inputs" in given else [scans]
    out = tmp_path / given.pop("out", "e.npz")
    with pytest.raises(error, match=message):
        embed(tiny_checkpoint, inputs, out, device="cpu", **given)
    assert not out.exists()
