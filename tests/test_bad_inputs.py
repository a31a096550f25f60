"""Bad inputs to `ctmae pretrain`: one line naming the file and the problem, skip-and-report, never a traceback.

Also patient privacy (no DICOM identifiers in anything ctmae writes or prints) and safe checkpoint loading.
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import write_dicom_series, write_volume
from ctmae.cli import app
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.runtime.checkpoint import FORMAT_VERSION, SEG_FORMAT, CheckpointError, save_checkpoint

TINY = ["--model", "tiny", "--crop", "32", "--patch", "8", "--workers", "0", "--steps", "1"]
GEOMETRY = dict(spacing=(1.5, 1.5, 1.5), origin=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def body(shape=(36, 36, 30), seed=0) -> np.ndarray:
    a = np.full(shape, -1000, np.int16)
    a[3:-3, 3:-3, 2:-2] = np.random.default_rng(seed).integers(-300, 400, (shape[0] - 6, shape[1] - 6, shape[2] - 4))
    return a


def pretrain(tmp_path: Path, *args: str):
    return CliRunner().invoke(
        app,
        ["pretrain", *map(str, args), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *TINY],
    )


def lines_naming(output: str, name: str) -> list[str]:
    return [line for line in output.splitlines() if name in line]


def _bad_files(root: Path) -> dict[str, str]:
    """Write one bad input of each kind; returns {file or folder name: a word its message must hold}."""
    (root / "zero.nii.gz").write_bytes(b"")
    (root / "text.nii.gz").write_text("this is not an image\n", encoding="utf-8")
    full = write_volume(root.parent / "full.nii.gz", body(seed=1), **GEOMETRY).read_bytes()  # not an input
    (root / "truncated.nii.gz").write_bytes(gzip.compress(gzip.decompress(full)[: len(gzip.decompress(full)) // 2]))
    nan = body(seed=2).astype(np.float32)
    nan[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([1.5, 1.5, 1.5, 1.0])), root / "nan.nii.gz")
    flat = sitk.GetImageFromArray(np.zeros((40, 40), np.int16))
    sitk.WriteImage(flat, str(root / "flat2d.nrrd"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 3), np.int16), np.eye(4)), root / "fourd.nii.gz")
    rgb = sitk.GetImageFromArray(np.zeros((20, 20, 20, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(root / "rgb.mha"))
    write_volume(root / "tiny.nii.gz", np.zeros((4, 4, 4), np.int16), **GEOMETRY)
    write_dicom_series(root / "gap", body(seed=3), **GEOMETRY, skip_slices=(12,))
    tilted = write_dicom_series(root / "tilted", body(seed=4), **GEOMETRY)
    one = sitk.ReadImage(str(tilted[5]))
    one.SetDirection((1.0, 0.0, 0.0, 0.0, 0.8, -0.6, 0.0, 0.6, 0.8))
    one.SetMetaData("0020|0037", "1\\0\\0\\0\\0.8\\0.6")  # the writer keeps the tag it read, so set it too
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tilted[5]))
    writer.Execute(one)
    return {
        "zero.nii.gz": "empty",
        "text.nii.gz": "",
        "truncated.nii.gz": "",
        "nan.nii.gz": "NaN",
        "flat2d.nrrd": "2D",
        "fourd.nii.gz": "4D",
        "rgb.mha": "",
        "tiny.nii.gz": "patch",
        "gap": "missing slice",
        "tilted": "orientation",
    }


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    scans = root / "scans"
    write_volume(scans / "good.nii.gz", body(), **GEOMETRY)
    write_dicom_series(scans / "two" / "a", body(seed=5), **GEOMETRY)
    write_dicom_series(scans / "two" / "b", body(seed=6), **GEOMETRY)  # moved next to a: one folder, two series
    for f in (scans / "two" / "b").iterdir():
        f.rename(scans / "two" / "a" / f"b_{f.name}")
    bad = _bad_files(scans)
    return pretrain(root, scans), bad


@pytest.mark.parametrize(
    "name",
    [
        "zero.nii.gz",
        "text.nii.gz",
        "truncated.nii.gz",
        "nan.nii.gz",
        "flat2d.nrrd",
        "fourd.nii.gz",
        "rgb.mha",
        "tiny.nii.gz",
        "gap",
        "tilted",
    ],
)
def test_each_bad_input_gets_one_line_and_is_skipped(mixed_run, name):
    result, bad = mixed_run
    assert result.exit_code == 0, result.output
    lines = lines_naming(result.output, name)
    assert len(lines) == 1 and lines[0].startswith("skipped:"), result.output
    assert bad[name].lower() in lines[0].lower()


def test_the_run_goes_on_with_the_good_ones_and_counts_the_skipped(mixed_run):
    result, bad = mixed_run
    assert "Traceback" not in result.output
    assert f"3 volume(s) ready, {len(bad)} skipped" in result.output  # good.nii.gz + the folder's two series


def test_mr_series_warns_by_default_and_is_skipped_with_modality_ct(tmp_path):
    write_dicom_series(tmp_path / "scans" / "mr", body(), **GEOMETRY, modality="MR")
    write_volume(tmp_path / "scans" / "ct.nii.gz", body(seed=1), **GEOMETRY)
    warned = pretrain(tmp_path / "a", tmp_path / "scans")
    assert warned.exit_code == 0 and "warning:" in warned.output and "modality MR" in warned.output
    assert "2 volume(s) ready" in warned.output
    strict = pretrain(tmp_path / "b", tmp_path / "scans", "--modality", "CT")
    assert strict.exit_code == 0 and "1 volume(s) ready, 1 skipped" in strict.output
    assert len(lines_naming(strict.output, "modality MR, not CT")) == 1


def test_no_usable_input_exits_1(tmp_path):
    (tmp_path / "only.nii.gz").write_text("nope", encoding="utf-8")
    result = pretrain(tmp_path, tmp_path / "only.nii.gz")
    assert result.exit_code == 1 and "no usable volume" in result.output and "Traceback" not in result.output
    assert "preprocessing" not in result.output  # no empty progress bar (0/0) between the skip line and the error


@pytest.mark.parametrize(
    "text, key", [("train:\n  stepz: 3\n", "train.stepz"), ("mask:\n  ratio: lots\n", "mask.ratio")]
)
def test_bad_config_file_exits_2_naming_the_key(tmp_path, text, key):
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    write_volume(tmp_path / "s.nii.gz", body(), **GEOMETRY)
    result = pretrain(tmp_path, tmp_path / "s.nii.gz", "--config", tmp_path / "c.yaml")
    assert result.exit_code == 2 and key in result.output and "c.yaml" in result.output


def test_run_dir_that_cannot_be_written_exits_2(tmp_path):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "afile" / "run"), *TINY])
    assert result.exit_code == 2 and "cannot write there" in result.output and "afile" in result.output


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / ".pwned-by-ctmae-test",))


def _ckpt(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    cfg = RunConfig.from_dict({"model": {"size": "tiny"}}).to_dict()
    if kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04" + bytes(200))
    elif kind == "version":
        save_checkpoint({"config": cfg, "model": {}, "step": 1}, path)
        state = torch.load(path, weights_only=True)
        torch.save({**state, "format_version": FORMAT_VERSION + 1}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"format": "ctmae-mae3d", "payload": _Exploit()}, f)
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("foreign", "another program"),
        ("corrupt", "not a readable checkpoint"),
        ("version", "format version"),
        ("exploit", "refused"),
    ],
)
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, kind, words):
    path = _ckpt(tmp_path, kind)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path)
    assert not (Path(__file__).parent / ".pwned-by-ctmae-test").exists()  # weights_only: no code ran
    write_volume(tmp_path / "s.nii.gz", body(), **GEOMETRY)
    result = pretrain(tmp_path, tmp_path / "s.nii.gz", "--resume")
    assert result.exit_code == 1 and words in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_no_patient_identifiers_in_anything_written_or_printed(tmp_path):
    planted = {
        "0010|0010": "Doe^Jane",
        "0010|0020": "PID12345",
        "0010|0030": "19230405",
        "0008|0050": "ACC98765",
        "0008|0080": "St Elsewhere Hospital",
        "0008|0090": "Dr^Referrer",
        "0010|1000": "OTHERID77",
        "0008|1030": "Secret Study Description",
    }
    files = write_dicom_series(
        tmp_path / "scans" / "series", body(), **GEOMETRY, patient_name="Doe^Jane", patient_id="PID12345"
    )
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for f in files:
        image = sitk.ReadImage(str(f))
        for tag, value in planted.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(f))
        writer.Execute(image)
    assert b"St Elsewhere Hospital" in files[0].read_bytes()
    result = pretrain(tmp_path, tmp_path / "scans")
    assert result.exit_code == 0, result.output
    written = [p for d in ("run", "cache") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert written
    for value in planted.values():
        needle = value.encode()
        assert value not in result.output
        assert not [p for p in written if needle in p.read_bytes()], value


def test_reconstruct_never_overwrites_an_input(tmp_path, tiny_checkpoint):
    scan = write_volume(tmp_path / "work" / "input.nii.gz", body(), **GEOMETRY)
    before = scan.read_bytes()
    result = CliRunner().invoke(app, ["reconstruct", str(tiny_checkpoint), str(scan), "--out", str(scan.parent)])
    assert result.exit_code == 1 and "never overwrites inputs" in result.output
    assert scan.read_bytes() == before and sorted(p.name for p in scan.parent.iterdir()) == ["input.nii.gz"]


MAE_WHERE = "RUN_DIR/checkpoints/last.pt written by ctmae pretrain"
SEG_WHERE = "RUN_DIR/checkpoints/best.pt written by ctmae finetune-seg"
TO_SEGMENT = "to segment scans with it, use ctmae segment"
PASS_MAE = f"pass an MAE pretraining checkpoint ({MAE_WHERE})"


def _wrong_file(folder: Path, kind: str) -> Path:
    """A file passed where a checkpoint belongs: another kind of ctmae checkpoint, a scan, text, an archive."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_dict({"model": {"size": "tiny"}}).to_dict()
    if kind == "mae":
        save_checkpoint({"config": cfg, "model": {}, "step": 1}, folder / "last.pt")
        return folder / "last.pt"
    if kind in ("seg", "seg-scratch"):
        pretrained = "runs/mae/checkpoints/last.pt" if kind == "seg" else ""
        save_checkpoint({"config": {"pretrained": pretrained}, "model": {}, "step": 1}, folder / "best.pt", SEG_FORMAT)
        return folder / "best.pt"
    if kind == "nifti":
        return write_volume(folder / "scan.nii.gz", body(), **GEOMETRY)
    if kind == "nifti-plain":
        return write_volume(folder / "scan.nii", body(), **GEOMETRY)
    if kind == "text":
        (folder / "notes.pt").write_text("checkpoint: runs/mae/checkpoints/last.pt\n", encoding="utf-8")
        return folder / "notes.pt"
    if kind == "zip":
        with zipfile.ZipFile(folder / "archive.pt", "w") as archive:
            archive.writestr("readme.txt", "not weights")
        return folder / "archive.pt"
    (folder / "empty.pt").write_bytes(b"")
    return folder / "empty.pt"


@pytest.mark.parametrize(
    "kind, command, message",
    [
        (
            "mae",
            "predict",
            "an MAE pretraining checkpoint, not a fine-tuned segmentation checkpoint; --predict needs a fine-tuned "
            f"one ({SEG_WHERE})",
        ),
        (
            "seg",
            "reconstruct",
            "a fine-tuned segmentation checkpoint, not an MAE pretraining checkpoint; pass the MAE pretraining "
            f"checkpoint it was fine-tuned from (runs/mae/checkpoints/last.pt); {TO_SEGMENT}",
        ),
        (
            "seg",
            "embed",
            "a fine-tuned segmentation checkpoint, not an MAE pretraining checkpoint; pass the MAE pretraining "
            f"checkpoint it was fine-tuned from (runs/mae/checkpoints/last.pt); {TO_SEGMENT}",
        ),
        (
            "seg-scratch",
            "reconstruct",
            "a fine-tuned segmentation checkpoint, not an MAE pretraining checkpoint; it was trained from scratch: "
            f"pass an MAE pretraining checkpoint ({MAE_WHERE}); {TO_SEGMENT}",
        ),
        (
            "nifti",
            "reconstruct",
            f"not a ctmae checkpoint: it is a gzip-compressed NIfTI image; {PASS_MAE}",
        ),
        (
            "nifti-plain",
            "embed",
            f"not a ctmae checkpoint: it is a NIfTI image; {PASS_MAE}",
        ),
        (
            "text",
            "reconstruct",
            f"not a ctmae checkpoint: it is a text file; {PASS_MAE}",
        ),
        (
            "text",
            "predict",
            f"not a ctmae checkpoint: it is a text file; pass a fine-tuned segmentation checkpoint ({SEG_WHERE})",
        ),
        (
            "zip",
            "reconstruct",
            f"not a ctmae checkpoint: it is a zip archive, not a torch file; {PASS_MAE}",
        ),
        (
            "empty",
            "embed",
            f"not a ctmae checkpoint: it is an empty file; {PASS_MAE}",
        ),
    ],
)
def test_a_wrong_checkpoint_is_named_for_what_it_is(tmp_path, kind, command, message):
    checkpoint = _wrong_file(tmp_path / "given", kind)
    scan = write_volume(tmp_path / "scans" / "s.nii.gz", body(), **GEOMETRY)
    args = {
        "predict": ["finetune-seg", "--predict", str(checkpoint), str(scan), "--out", str(tmp_path / "pred")],
        "reconstruct": ["reconstruct", str(checkpoint), str(scan), "--out", str(tmp_path / "recon")],
        "embed": ["embed", str(checkpoint), str(scan), "--out", str(tmp_path / "e.npz")],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: {checkpoint}: {message}", result.output


def test_a_pickle_that_would_run_code_is_still_refused_as_such(tmp_path):
    path = _ckpt(tmp_path, "exploit")
    scan = write_volume(tmp_path / "s.nii.gz", body(), **GEOMETRY)
    result = CliRunner().invoke(app, ["reconstruct", str(path), str(scan), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: {path}: refused to load: it holds objects that could run code"
    assert not (Path(__file__).parent / ".pwned-by-ctmae-test").exists()
