"""`ctmae segment` and `ctmae.api.segment`: label volumes on each scan's own grid from a fine-tuned checkpoint, the
`finetune-seg --predict` alias, refusals, and the API's result and reporter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import Heard, write_volume
from ctmae.api.common import OptionError
from ctmae.api.segment import Segmentation, segment
from ctmae.cli import app
from ctmae.cli.segment import ALIAS_NOTE
from ctmae.io.checks import InputError
from ctmae.io.discovery import find_volumes
from ctmae.io.volume import read_volume
from ctmae.seg.predict import output_name, sidecar_path

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
FINETUNE = ["--from-scratch", "--model", "tiny", "--crop", "32", "--feature-size", "8", "--batch-size", "1"]
FINETUNE += ["--crops-per-volume", "1", "--device", "cpu", "--steps", "2", "--val-fraction", "0.5"]


def sphere(seed: int, shape=(36, 32, 28)) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue (0 HU ± 60) with one bright sphere (+400 HU); its label."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    label = (np.linalg.norm(grid - np.asarray(shape) / 2, axis=-1) < 7).astype(np.uint8)
    return rng.normal(0.0, 60.0, shape) + 400.0 * label, label


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A fine-tuned checkpoint (two real steps on two sphere cases) and two scans to segment: one axis-aligned
    NIfTI, one oblique NRRD of another spacing."""
    root = tmp_path_factory.mktemp("segment")
    for i in range(2):
        image, label = sphere(i)
        write_volume(root / "images" / f"case{i}.nii.gz", image, spacing=(1.5,) * 3, direction=IDENTITY)
        write_volume(root / "labels" / f"case{i}.nii.gz", label, spacing=(1.5,) * 3, direction=IDENTITY, dtype=np.uint8)
    args = ["--images", root / "images", "--labels", root / "labels", "--out", root / "run", "--cache-dir", root / "c"]
    result = CliRunner().invoke(app, ["finetune-seg", *map(str, [*FINETUNE, *args])])
    assert result.exit_code == 0, result.output
    oblique = write_volume(root / "in" / "oblique.nrrd", sphere(5, (30, 34, 20))[0], spacing=(1.2, 1.4, 2.0))
    return root / "run" / "checkpoints" / "last.pt", [root / "images" / "case0.nii.gz", oblique]


def run(*args) -> object:
    return CliRunner().invoke(app, [*map(str, args)])


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_volume(find_volumes([p])[0][0])[0] for p in sorted(folder.glob("*.nii.gz"))}


def test_segment_writes_a_label_volume_on_each_scans_grid(seg_run, tmp_path):
    checkpoint, scans = seg_run
    result = run("segment", checkpoint, *scans, "--out", tmp_path / "pred", "--device", "cpu")
    assert result.exit_code == 0, result.output
    sources, taken = find_volumes(scans)[0], set()
    written = [tmp_path / "pred" / output_name(s.id, taken) for s in sources]
    expected = sorted(p.name for p in [*written, *map(sidecar_path, written)])
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == expected
    for source, path in zip(sources, written):
        image, affine = read_volume(source)
        label, label_affine = read_volume(find_volumes([path])[0][0])
        assert label.shape == image.shape and set(np.unique(label)) <= {0.0, 1.0}
        np.testing.assert_allclose(label_affine, affine, atol=1e-5)
        assert f"{source.id} -> {path} voxels per class: background " in " ".join(result.output.split())
        sidecar = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        assert sidecar["labels"] == {"0": "background", "1": "class 1"} and sidecar["checkpoint"] == "last.pt"
    assert f"2 label volume(s) written to {tmp_path / 'pred'}" in " ".join(result.output.split())
    assert "finetune-seg --predict" not in result.output


def test_finetune_seg_predict_is_an_alias_that_says_so_once(seg_run, tmp_path):
    checkpoint, scans = seg_run
    new = run("segment", checkpoint, *scans, "--out", tmp_path / "new", "--device", "cpu")
    old = run("finetune-seg", "--predict", checkpoint, *scans, "--out", tmp_path / "old", "--device", "cpu")
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert " ".join(old.output.split()).count(ALIAS_NOTE) == 1
    assert old.output.index("is ctmae segment now") < old.output.index("label volume(s) written")
    a, b = labels_of(tmp_path / "new"), labels_of(tmp_path / "old")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    missing = run("finetune-seg", "--predict", checkpoint, "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "--predict needs INPUTS" in missing.output
    assert " ".join(missing.output.split()).count(ALIAS_NOTE) == 1


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("mae checkpoint", 1, "MAE pretraining checkpoint"),
        ("out is a file", 2, "--out must be a folder, but a file is there"),
        ("no scan", 1, "no usable volume among the inputs"),
        ("bad device", 2, "--device must be auto, cpu or cuda, got 'tpu'"),
    ],
)
def test_segment_refuses_in_one_line(seg_run, tiny_checkpoint, tmp_path, case, code, message):
    checkpoint, scans = seg_run
    (tmp_path / "notes.txt").write_text("not a scan\n", encoding="utf-8")
    (tmp_path / "file").write_text("", encoding="utf-8")
    args = {
        "mae checkpoint": [tiny_checkpoint, scans[0], "--out", tmp_path / "p"],
        "out is a file": [checkpoint, scans[0], "--out", tmp_path / "file"],
        "no scan": [checkpoint, tmp_path / "notes.txt", "--out", tmp_path / "p"],
        "bad device": [checkpoint, scans[0], "--out", tmp_path / "p", "--device", "tpu"],
    }[case]
    result = run("segment", *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


def test_the_api_returns_what_it_wrote_and_prints_nothing(seg_run, tmp_path, capfd):
    checkpoint, scans = seg_run
    heard = Heard()
    result = segment(checkpoint, [scans[1]], tmp_path / "pred", device="cpu", reporter=heard)
    assert capfd.readouterr() == ("", "")
    label = tmp_path / "pred" / "oblique.nii.gz"
    assert result == Segmentation(tmp_path / "pred", (label,), 1, (), result.warnings, None)
    assert label.is_file() and sidecar_path(label).is_file()
    counts = np.bincount(read_volume(find_volumes([label])[0][0])[0].astype(int).ravel(), minlength=2)
    scan_id = find_volumes([scans[1]])[0][0].id
    line = f"{scan_id} -> {label}  voxels per class: background {counts[0]}, class 1 {counts[1]}"
    progress = [e for e in heard.events if e[0] in ("start", "advance")]
    assert progress == [("start", "segmenting", 1), ("advance", line)]  # one line per volume, as the command prints
    assert [e[1] for e in heard.events if e[0] == "warn"] == list(result.warnings)
    windows = [e for e in heard.events if e[0] == "windows"]
    assert windows and windows[-1][1] == windows[-1][2]  # every window of the scan was run and reported


def test_the_api_refuses_before_any_work(seg_run, tmp_path):
    checkpoint, scans = seg_run
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(OptionError, match="--out must be a folder"):
        segment(checkpoint, scans, tmp_path / "file")
    with pytest.raises(OptionError, match="no INPUTS"):
        segment(checkpoint, [], tmp_path / "p")
    with pytest.raises(InputError, match="no usable volume"):
        segment(checkpoint, [tmp_path / "file"], tmp_path / "p")
    assert not (tmp_path / "p").exists()
