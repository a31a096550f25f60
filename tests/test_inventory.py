"""RUN_DIR/inputs.csv says what pretraining read, and the same voxels under two names are trained on once."""

from __future__ import annotations

import csv
import shutil

import numpy as np
from typer.testing import CliRunner

from conftest import write_body_scans, write_dicom_series
from ctmae.cli import app

TRAIN = ["--model", "tiny", "--crop", "32", "--patch", "8", "--batch-size", "1", "--steps", "1", "--device", "cpu"]


def test_inputs_csv_lists_every_scan_and_a_voxel_identical_copy_is_used_once(tmp_path):
    data = write_body_scans(tmp_path / "data", 2)
    shutil.copy(data / "scan0.nii.gz", data / "scan0_bone_kernel.nii.gz")  # the same voxels under a second name
    volume = np.full((40, 40, 12), -1000, np.int16)
    volume[6:34, 6:34, :] = np.arange(28 * 28 * 12, dtype=np.int16).reshape(28, 28, 12) % 700 - 200
    write_dicom_series(
        data / "pacs" / "series1", volume, spacing=(1.5, 1.5, 3.0), patient_name="Doe^Jane", patient_id="MRN-12345"
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["pretrain", str(data), "--out", str(run), *TRAIN, "--cache-dir", str(tmp_path / "cache")]
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "3 volume(s) ready, 1 duplicate(s) used once" in out
    assert "scan0_bone_kernel.nii.gz: voxel-identical to" in out and "used once" in out
    text = (run / "inputs.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 4
    by_id = {r["id"]: r for r in rows}
    assert by_id["scan0_bone_kernel.nii.gz"]["used"] == "no: same voxels as scan0.nii.gz"
    assert by_id["scan0.nii.gz"]["used"] == by_id["scan1.nii.gz"]["used"] == "yes"
    assert by_id["scan1.nii.gz"]["kind"] == "NIfTI" and by_id["scan1.nii.gz"]["spacing_mm"] == "1.5x1.5x1.5"
    dicom = next(r for r in rows if r["kind"] == "DICOM series")
    assert dicom["id"].startswith("pacs/series1") and dicom["kind"] == "DICOM series" and dicom["modality"] == "CT"
    assert len(dicom["cache_key"]) == 32 and "x" in dicom["shape"]
    assert "Doe" not in text and "12345" not in text  # no identifier
