"""``ctmae embed``: rows and ids, byte-identical reruns, resume by id, token maps, skipped inputs, privacy, errors."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ctmae.infer.embed
import ctmae.infer.embed_outputs
from conftest import write_dicom_series, write_volume
from ctmae.cli import app
from ctmae.infer.embed import token_name
from ctmae.infer.embed_outputs import read_output
from ctmae.io.discovery import find_volumes
from ctmae.io.volume import read_volume
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.shift import WARN_SCORE, has_reference, no_reference_note
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.checkpoint import save_checkpoint

runner = CliRunner()


def _run(*args: object) -> object:
    return runner.invoke(app, ["embed", *map(str, args)])


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """A folder of two small scans with different sizes and geometry."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "scans"
    write_volume(folder / "a.nii.gz", rng.integers(-1000, 1000, size=(30, 24, 20)), spacing=(2.0, 2.0, 3.0))
    write_volume(folder / "sub" / "b.nrrd", rng.integers(-1000, 1000, size=(26, 28, 16)), spacing=(1.5, 2.5, 4.0))
    return folder


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Counts token-map computations: one per scan actually embedded."""
    calls: list[int] = []
    real = ctmae.infer.embed.token_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ctmae.infer.embed, "token_features", counting)
    return calls


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_one_row_per_scan_with_source_geometry(tiny_checkpoint, scans, tmp_path):
    out = tmp_path / "emb.npz"
    result = _run(tiny_checkpoint, scans, "--out", out)
    assert result.exit_code == 0, result.output
    z = _npz(out)
    assert list(z["ids"]) == ["a.nii.gz", "sub/b.nrrd"]
    dim = load_checkpoint(tiny_checkpoint)["config"].model.dim
    assert z["embeddings"].shape == (2, dim) and z["embeddings"].dtype == np.float32
    assert np.isfinite(z["embeddings"]).all() and not np.allclose(z["embeddings"][0], z["embeddings"][1])
    for i, source in enumerate(find_volumes([scans])[0]):
        array, affine = read_volume(source)
        assert tuple(z["shapes"][i]) == array.shape
        np.testing.assert_allclose(z["spacings"][i], np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-6)


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_reruns_are_byte_identical(tiny_checkpoint, scans, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    first, second = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    for out in (first, second):
        assert _run(tiny_checkpoint, scans, "--out", out, "--pool", "max").exit_code == 0
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.glob("*.partial.jsonl"))


def test_csv_holds_the_same_numbers_as_npz(tiny_checkpoint, scans, tmp_path):
    assert _run(tiny_checkpoint, scans, "--out", tmp_path / "e.npz").exit_code == 0
    assert _run(tiny_checkpoint, scans, "--out", tmp_path / "e.csv").exit_code == 0
    z = _npz(tmp_path / "e.npz")
    with open(tmp_path / "e.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:5] == ["id", "shape", "spacing", "shift_score", "e0"] and len(rows) == 3
    assert [r[0] for r in rows[1:]] == list(z["ids"])
    assert rows[1][1] == "x".join(map(str, z["shapes"][0]))
    np.testing.assert_array_equal(np.array([r[4:] for r in rows[1:]], dtype=np.float32), z["embeddings"])


def test_resume_skips_finished_ids(tiny_checkpoint, scans, tmp_path, counted):
    out = tmp_path / "emb.npz"
    assert _run(tiny_checkpoint, scans / "a.nii.gz", "--out", out).exit_code == 0
    assert len(counted) == 1 and list(_npz(out)["ids"]) == ["a.nii.gz"]
    result = _run(tiny_checkpoint, scans, "--out", out)
    assert result.exit_code == 0 and "1 already done" in result.output, result.output
    assert len(counted) == 2  # only b was computed
    assert _run(tiny_checkpoint, scans, "--out", tmp_path / "fresh.npz").exit_code == 0
    assert out.read_bytes() == (tmp_path / "fresh.npz").read_bytes()


def test_a_crash_mid_run_loses_only_the_scan_in_progress(tiny_checkpoint, scans, tmp_path, monkeypatch):
    out = tmp_path / "emb.csv"
    real = ctmae.infer.embed.token_features
    calls: list[str] = []

    def dies_on_second(*args, **kwargs):
        calls.append("call")
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill while the second scan is being embedded
        return real(*args, **kwargs)

    monkeypatch.setattr(ctmae.infer.embed, "token_features", dies_on_second)
    assert _run(tiny_checkpoint, scans, "--out", out).exit_code == 130
    journal = out.with_name(out.name + ".partial.jsonl")
    assert not out.exists() and journal.is_file()
    with open(journal, "a") as f:
        f.write('{"id": "half a line')  # as a crash while appending would leave it
    assert _run(tiny_checkpoint, scans, "--out", out).exit_code == 0
    assert len(calls) == 3  # a once, b interrupted, b again
    assert not journal.exists()
    assert _run(tiny_checkpoint, scans, "--out", tmp_path / "fresh.csv").exit_code == 0
    assert out.read_bytes() == (tmp_path / "fresh.csv").read_bytes()


def test_token_maps_have_the_stated_shape_and_affine(tiny_checkpoint, scans, tmp_path):
    tokens = tmp_path / "tokens"
    assert _run(tiny_checkpoint, scans, "--out", tmp_path / "e.npz", "--tokens", tokens).exit_code == 0
    cfg = load_checkpoint(tiny_checkpoint)["config"]
    p = cfg.model.patch
    for source in find_volumes([scans])[0]:
        image = preprocess_transforms(cfg.preprocess)({"image": list(source.files)})["image"]
        grid = [math.ceil(n / p) for n in image.shape[1:]]
        token_map = np.load(tokens / f"{token_name(source.id)}.npy")
        assert token_map.shape == (cfg.model.dim, *grid) and token_map.dtype == np.float32
        meta = json.loads((tokens / f"{token_name(source.id)}.json").read_text(encoding="utf-8"))
        assert meta["id"] == source.id and meta["shape"] == list(token_map.shape)
        # token (0, 0, 0) is the centre of the first 16³ patch: voxel (7.5, 7.5, 7.5)
        np.testing.assert_allclose(
            np.array(meta["affine"]) @ [0, 0, 0, 1], image.affine.numpy() @ ([(p - 1) / 2] * 3 + [1]), atol=1e-6
        )
        np.testing.assert_allclose(np.array(meta["affine"])[:3, :3], image.affine.numpy()[:3, :3] * p, atol=1e-6)
    assert sorted(f.name for f in tokens.iterdir()) == sorted(
        f"{token_name(s.id)}{x}" for s in find_volumes([scans])[0] for x in (".json", ".npy")
    )


@pytest.mark.parametrize("volume_id", ["a/b.nii.gz", "../../etc/passwd", "x#0123abcd", "..", "/abs/path", "a b\\c"])
def test_token_names_stay_in_their_folder(volume_id):
    name = token_name(volume_id)
    assert "/" not in name and "\\" not in name and "#" not in name and ".." not in name and not name.startswith(".")
    assert token_name(volume_id) == name and token_name(volume_id + "x") != name


def test_bad_inputs_are_skipped_and_reported(tiny_checkpoint, scans, tmp_path):
    (scans / "broken.nii.gz").write_bytes(b"\x00not a nifti" * 30)
    good = scans / "a.nii.gz"
    truncated = scans / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out = tmp_path / "e.npz"
    result = _run(tiny_checkpoint, scans, tmp_path / "missing.nii.gz", "--out", out)
    assert result.exit_code == 0, result.output
    assert list(_npz(out)["ids"]) == ["a.nii.gz", "sub/b.nrrd"]
    for name in ("broken.nii.gz", "trunc.nii.gz", "missing.nii.gz"):
        assert f"skipped: {tmp_path}" in result.output and name in result.output
    nothing = _run(tiny_checkpoint, scans / "broken.nii.gz", "--out", tmp_path / "none.npz")
    assert nothing.exit_code == 1 and "no scan embedded" in nothing.output
    assert not (tmp_path / "none.npz").exists()


def test_dicom_patient_tags_never_reach_the_outputs(tiny_checkpoint, tmp_path, ct_array):
    write_dicom_series(tmp_path / "in" / "study" / "series", ct_array, patient_name="Doe^Jane", patient_id="PID12345")
    write_volume(tmp_path / "in" / "other.nii.gz", ct_array)
    outputs = tmp_path / "outputs"
    for suffix in (".npz", ".csv"):
        result = _run(tiny_checkpoint, tmp_path / "in", "--out", outputs / f"e{suffix}", "--tokens", outputs / "tok")
        assert result.exit_code == 0, result.output
    files = [f for f in outputs.rglob("*") if f.is_file()]
    assert len(files) == 6
    for f in files:
        for secret in (b"Doe", b"Jane", b"PID12345"):
            assert secret not in f.read_bytes(), (f, secret)
    assert any(i.startswith("study/series#") for i in _npz(outputs / "e.npz")["ids"])


def test_errors_are_one_line(tiny_checkpoint, scans, tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "step": 1}, foreign)
    cases = [
        ((tmp_path / "missing.pt", scans, "--out", tmp_path / "e.npz"), 1, "checkpoint not found"),
        ((foreign, scans, "--out", tmp_path / "e.npz"), 1, "not a ctmae checkpoint"),
        ((tiny_checkpoint, scans, "--out", tmp_path / "e.npz", "--pool", "cls"), 2, "no CLS token"),
        ((tiny_checkpoint, scans, "--out", tmp_path / "e.txt"), 2, ".npz, .csv, .parquet"),
        ((tiny_checkpoint, scans, "--out", tmp_path / "e.npz", "--device", "tpu"), 2, "--device"),
    ]
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the parquet extra were not installed
    cases.append(((tiny_checkpoint, scans, "--out", tmp_path / "e.parquet"), 2, "pip install 'ctmae[parquet]'"))
    for args, code, words in cases:
        result = _run(*args)
        assert result.exit_code == code, (args, result.output)
        assert words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "e.npz").exists()


# Distribution shift (ctmae.mae.shift): the tiny checkpoint was pretrained on the sample chest CT, so its upper slab
# (sample_data/demo/heldout) is "like the training scans" and a skull-and-brain phantom is not.
SAMPLE_CT = Path(__file__).resolve().parents[1] / "sample_data" / "ct" / "lung1.nii.gz"
AXIS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _chest_slab(path: Path) -> Path:
    """The sample chest's upper 16 slices (lung apices, shoulders): a slab of the training scan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLE_CT.parents[1] / "demo" / "heldout" / "lung1_upper.nii.gz", path)
    return path


def _head_phantom(path: Path) -> Path:
    """A small head: air, a skull shell at 1000 HU, brain at 35 HU, in 2 mm voxels."""
    x, y, z = np.mgrid[0:80, 0:95, 0:75].astype(np.float32)
    r = np.sqrt(((x - 40) / 35) ** 2 + ((y - 47) / 42) ** 2 + ((z - 37) / 32) ** 2)
    ct = np.where(r < 1.0, 1000.0, -1000.0)
    ct[r < 0.85] = 35.0
    return write_volume(path, ct, spacing=(2.0, 2.0, 2.0), direction=AXIS)


def _shift_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "shift score" in line]


def test_shift_score_is_a_column_of_every_format_and_agrees(tiny_checkpoint, scans, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for suffix in (".npz", ".csv", ".parquet"):
        assert _run(tiny_checkpoint, scans, "--out", tmp_path / f"e{suffix}").exit_code == 0
    scores = _npz(tmp_path / "e.npz")["shift_scores"]
    assert scores.shape == (2,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    with open(tmp_path / "e.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][3] == "shift_score"
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], scores, rtol=1e-8)  # 9 significant digits
    table = pq.read_table(tmp_path / "e.parquet")
    assert str(table.schema.field("shift_score").type) == "double"
    np.testing.assert_array_equal(table.column("shift_score").to_numpy(), scores)


def test_a_scan_unlike_the_training_scans_scores_higher_and_is_warned_about(tiny_checkpoint, tmp_path):
    assert has_reference(load_checkpoint(tiny_checkpoint)["shift_reference"])  # pretrain stored the training features
    _chest_slab(tmp_path / "in" / "chest.nii.gz")
    _head_phantom(tmp_path / "in" / "head.nii.gz")
    result = _run(tiny_checkpoint, tmp_path / "in", "--out", tmp_path / "e.npz")
    assert result.exit_code == 0, result.output
    z = _npz(tmp_path / "e.npz")
    chest, head = (float(z["shift_scores"][list(z["ids"]).index(n)]) for n in ("chest.nii.gz", "head.nii.gz"))
    assert chest < WARN_SCORE < head and head > chest + 1.0, (chest, head)
    lines = _shift_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("warning: head.nii.gz: shift score"), result.output


def _strip_shift_column(path: Path) -> None:
    """Rewrite an output as ctmae wrote it before the shift_score column existed."""
    if path.suffix == ".npz":
        arrays = {k: v for k, v in _npz(path).items() if k != "shift_scores"}
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [r[:3] + r[4:] for r in csv.reader(f)]
        with open(path, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
    else:
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(path).drop_columns(["shift_score"]), path)


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet", ".partial.jsonl"])
def test_an_output_from_before_the_shift_column_resumes_with_nan(
    tiny_checkpoint, scans, tmp_path, counted, monkeypatch, suffix
):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / ("e.csv" if suffix == ".partial.jsonl" else f"e{suffix}")
    if suffix == ".partial.jsonl":  # a run killed before its output was written leaves the journal
        with monkeypatch.context() as m:
            m.setattr(ctmae.infer.embed, "write_output", _killed)
            assert _run(tiny_checkpoint, scans / "a.nii.gz", "--out", out).exit_code == 130
        journal = out.with_name(out.name + ".partial.jsonl")
        lines = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]
        assert not out.exists() and lines[1].pop("shift_score") is not None  # as journals were written before
        journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    else:
        assert _run(tiny_checkpoint, scans / "a.nii.gz", "--out", out).exit_code == 0
        _strip_shift_column(out)
    result = _run(tiny_checkpoint, scans, "--out", out)
    assert result.exit_code == 0 and "1 already done" in result.output, result.output
    assert len(counted) == 2  # a was not embedded again
    fresh = tmp_path / f"fresh{out.suffix}"
    assert _run(tiny_checkpoint, scans, "--out", fresh).exit_code == 0
    old, new = _scores(out), _scores(fresh)
    assert math.isnan(old["a.nii.gz"]) and math.isfinite(new["a.nii.gz"])
    assert old["sub/b.nrrd"] == new["sub/b.nrrd"]


def _killed(*args: object) -> None:
    raise KeyboardInterrupt  # as a kill just before the output file is written


def _scores(path: Path) -> dict[str, float]:
    """id -> shift_score of an output, read as ``ctmae embed`` reads it to resume."""
    return {r.id: r.shift_score for r in read_output(path)}


@pytest.mark.parametrize("stored", ["none", "older kind"])
def test_a_checkpoint_without_a_reference_gives_nan_and_says_so_once(tiny_checkpoint, tmp_path, stored):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    if stored == "none":  # as in checkpoints written before pretraining stored a reference
        del state["shift_reference"]
    else:  # as ctmae stored it before: the training scans' masked-reconstruction errors
        state["shift_reference"] = {"errors": [0.01], "mean": 0.01, "std": 0.0, "seed": 1, "crops_per_scan": 4}
    older = tmp_path / "older.pt"
    save_checkpoint(state, older)
    _head_phantom(tmp_path / "in" / "head.nii.gz")
    _chest_slab(tmp_path / "in" / "chest.nii.gz")
    for suffix in (".npz", ".csv"):
        result = _run(older, tmp_path / "in", "--out", tmp_path / f"e{suffix}")
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
        assert lines == [f"warning: {no_reference_note('the checkpoint')}"]
        assert "carries no shift reference (written by an older ctmae)" in lines[0]
    assert np.isnan(_npz(tmp_path / "e.npz")["shift_scores"]).all()
    with open(tmp_path / "e.csv", newline="") as f:
        assert [r[3] for r in csv.reader(f)] == ["shift_score", "", ""]  # empty cells: no score


def test_a_full_disk_is_one_line_and_keeps_the_earlier_output(tiny_checkpoint, scans, tmp_path, monkeypatch):
    out = tmp_path / "e.npz"
    assert _run(tiny_checkpoint, scans / "a.nii.gz", "--out", out).exit_code == 0
    before = out.read_bytes()

    def full(path: Path, rows: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ctmae.infer.embed_outputs, "_write_npz", full)
    result = _run(tiny_checkpoint, scans, "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1].startswith(f"error: {out}: could not write (No space left on device)")
    assert out.read_bytes() == before  # no temporary file is left, and the journal keeps b for the next run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "e.npz.partial.jsonl", "scans"]
    monkeypatch.undo()
    result = _run(tiny_checkpoint, scans, "--out", out)
    assert result.exit_code == 0 and "embedded 0 scan(s), 2 already done" in result.output, result.output


# --- export folders, the output location checked first, stop signals --------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "monai-bundle"])
def test_an_export_folder_embeds_as_its_checkpoint_does(tiny_checkpoint, scans, tmp_path, fmt):
    export = tmp_path / "encoder"
    made = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(export), "--format", fmt])
    assert made.exit_code == 0, made.output
    assert _run(tiny_checkpoint, scans, "--out", tmp_path / "ckpt.npz").exit_code == 0
    result = _run(export, scans, "--out", tmp_path / "export.npz")
    assert result.exit_code == 0, result.output
    from_ckpt, from_export = _npz(tmp_path / "ckpt.npz"), _npz(tmp_path / "export.npz")
    assert list(from_export["ids"]) == list(from_ckpt["ids"])
    np.testing.assert_allclose(from_export["embeddings"], from_ckpt["embeddings"], atol=1e-5)  # MONAI's ViT
    assert np.isnan(from_export["shift_scores"]).all()  # an export carries no training-scan reference


def test_the_output_location_is_checked_before_any_scan(tiny_checkpoint, scans, tmp_path, counted):
    a_file = tmp_path / "some_file.txt"
    a_file.write_text("notes\n", encoding="utf-8")
    (tmp_path / "taken.npz").mkdir()
    cases = [
        (("--out", a_file / "emb.csv"), f"{a_file} is a file, not a folder"),
        (("--out", a_file / "deeper" / "emb.npz"), f"{a_file} is a file, not a folder"),
        (("--out", tmp_path / "emb.npz", "--tokens", a_file), f"{a_file} is a file, not a folder"),
        (("--out", tmp_path / "taken.npz"), "--out is a folder"),
    ]
    for args, words in cases:
        result = _run(tiny_checkpoint, scans, *args)
        assert result.exit_code == 2, (args, result.output)
        assert words in " ".join(result.output.split()) and "Errno" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not counted  # refused before any scan was embedded


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes in any folder")
def test_a_folder_without_write_permission_is_refused_first(tiny_checkpoint, scans, tmp_path, counted):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _run(tiny_checkpoint, scans, "--out", locked / "emb.npz")
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2 and f"no permission to write in {locked}" in " ".join(result.output.split())
    assert not counted


def test_a_stop_signal_writes_the_rows_finished_so_far(tiny_checkpoint, scans, tmp_path, monkeypatch):
    """SIGTERM while the second scan is embedded: the first scan's row is written, whole; a rerun does the second."""
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # without ctmae's handler the signal would be lost
    out, calls = tmp_path / "emb.csv", []
    real = ctmae.infer.embed.token_features

    def stop_in_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's stop while the second scan is embedded
        return real(*args, **kwargs)

    monkeypatch.setattr(ctmae.infer.embed, "token_features", stop_in_second)
    try:
        result = _run(tiny_checkpoint, scans, "--out", out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "stopped early: stop signal (SIGTERM); embedded 1 scan(s), 0 already done, 0 skipped; 1 row(s) in" in text
    assert [r.id for r in read_output(out)] == ["a.nii.gz"]
    assert not out.with_name(out.name + ".partial.jsonl").exists()
    result = _run(tiny_checkpoint, scans, "--out", out)
    assert result.exit_code == 0 and "embedded 1 scan(s), 1 already done" in result.output, result.output
    assert [r.id for r in read_output(out)] == ["a.nii.gz", "sub/b.nrrd"] and len(calls) == 3


def test_progress_shows_the_windows_of_each_scan(tiny_checkpoint, scans, tmp_path):
    result = _run(tiny_checkpoint, scans, "--out", tmp_path / "emb.npz")
    assert result.exit_code == 0, result.output
    assert re.search(r"windows of the scan\s+\S+\s+(\d+)/\1\b", result.output), result.output
