"""Label maps are never taken for CT: skipped by path (a dataset's labelsTr/) and by content (a handful of class
indices, no air) in pretrain, embed and reconstruct; finetune-seg still reads them as labels. Files that are not
scans are named once, as a note that skips nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import SAMPLE_DATA, organ_ct, organ_map, write_volume
from ctmae.cli import app
from ctmae.io.discovery import Note, find_volumes, skipped_only
from ctmae.io.labels import label_map_problem
from ctmae.preprocess.config import PreprocessConfig
from ctmae.seg.data import cache_cases, check_case, find_cases

TINY = ["--model", "tiny", "--crop", "32", "--patch", "8", "--workers", "0", "--steps", "1"]
GEOMETRY = dict(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
runner = CliRunner()


def ct_and_label(seed: int = 0, shape=(48, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """(CT int16: a block of tissue HU in air at -1000, label uint8: 0 background, 1 tissue, 2 a bright core)."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000, np.int16)
    ct[8:40, 8:40, 6:42] = rng.integers(-200, 300, (32, 32, 36))
    ct[18:30, 18:30, 18:30] += 500
    label = np.zeros(shape, np.uint8)
    label[8:40, 8:40, 6:42] = 1
    label[18:30, 18:30, 18:30] = 2
    return ct, label


def nnunet_root(root: Path, cases: int = 2, readme: bool = False) -> Path:
    """imagesTr/case_00N_0000.nii.gz, labelsTr/case_00N.nii.gz and a dataset.json, as nnU-Net lays them out."""
    for i in range(cases):
        ct, label = ct_and_label(seed=i)
        write_volume(root / "imagesTr" / f"case_00{i}_0000.nii.gz", ct, **GEOMETRY)
        write_volume(root / "labelsTr" / f"case_00{i}.nii.gz", label, dtype=np.uint8, **GEOMETRY)
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}), encoding="utf-8"
    )
    if readme:
        (root / "imagesTr" / "README.md").write_text("scans from site A\n", encoding="utf-8")
    return root


def mixed_folder(root: Path) -> Path:
    """A folder holding a CT scan and, next to it, a label map saved as .nrrd (no labels folder to tell it apart)."""
    ct, label = ct_and_label()
    write_volume(root / "data" / "ct.nii.gz", ct, **GEOMETRY)
    write_volume(root / "data" / "ct_seg.nrrd", label, dtype=np.uint8, **GEOMETRY)
    return root / "data"


def pretrain(tmp_path: Path, *inputs: Path):
    args = ["pretrain", *map(str, inputs), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    return runner.invoke(app, [*args, *TINY])


def lines_with(output: str, words: str) -> list[str]:
    return [line for line in output.splitlines() if words in line]


# --- the content rule ------------------------------------------------------------------------------------------------


def _image(array_xyz: np.ndarray, dtype) -> sitk.Image:
    return sitk.GetImageFromArray(np.asarray(array_xyz, dtype=dtype).transpose(2, 1, 0))  # (X, Y, Z) -> (Z, Y, X)


@pytest.mark.parametrize(
    "kind, dtype, is_label",
    [
        ("label", np.uint8, True),
        ("label", np.int16, True),
        ("label", np.float32, True),  # segmentations saved as float (MONAI's default) are labels too
        ("ct", np.int16, False),
        ("ct", np.float32, False),
        ("blank", np.int16, False),  # one value: the body-region check says more than "label map"
        ("many classes", np.uint8, False),  # 40 values: not a handful
        ("unsigned scan", np.uint16, False),  # stored values 0..4095 without the HU offset: many values
        ("halves", np.float32, False),  # non-integer values
    ],
)
def test_label_map_problem_tells_labels_from_ct(kind, dtype, is_label):
    ct, label = ct_and_label()
    rng = np.random.default_rng(1)
    array = {
        "label": label,
        "ct": ct,
        "blank": np.zeros_like(label),
        "many classes": rng.integers(0, 40, label.shape),
        "unsigned scan": ct.astype(np.int32) + 1024,
        "halves": label * 0.5,
    }[kind]
    problem = label_map_problem(_image(array, dtype))
    assert (problem is not None) == is_label, problem
    if is_label:
        assert "0, 1, 2" in problem and "no air" in problem


def test_a_label_hiding_from_the_subsample_is_confirmed_on_every_voxel():
    ct, label = ct_and_label(shape=(96, 96, 96))
    label[1, 1, 1] = 200  # one voxel the strided subsample skips: still a label map (3 values become 4)
    assert "200" in label_map_problem(_image(label, np.uint8))
    large = label.astype(np.int16)
    large[3, 5, 7] = 900  # and one voxel above any class index the subsample skips makes it no label map
    assert label_map_problem(_image(large, np.int16)) is None


def _eight_bit(smooth_mm: float) -> np.ndarray:
    """The sample chest CT windowed (-1000..1000 HU) to 0..254 and rounded: an 8-bit image, smoothed first."""
    image = sitk.ReadImage(str(SAMPLE_DATA / "ct" / "lung1.nii.gz"), sitk.sitkFloat32)
    image = sitk.SmoothingRecursiveGaussian(image, smooth_mm) if smooth_mm else image
    hu = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    return np.rint(np.clip((hu + 1000) / 2000, 0, 1) * 254)


@pytest.mark.parametrize(
    "kind, dtype, is_label",
    [
        ("organ map", np.uint8, True),  # 117 classes, as TotalSegmentator writes them
        ("organ map", np.float32, True),
        ("organ scan", np.int16, False),  # its CT in HU
        ("organ scan without intercept", np.uint16, False),  # stored values HU + 1024: air at 24, thousands of values
        ("8-bit scan", np.uint8, False),  # a CT windowed to 8 bits: ramps, no uniform regions
        ("8-bit smoothed scan", np.uint8, False),  # smoothed first: flatter, but its borders are ramps
    ],
)
def test_label_maps_of_many_classes_are_told_from_scans_by_content(kind, dtype, is_label):
    label = organ_map()
    array = {
        "organ map": label,
        "organ scan": organ_ct(label),
        "organ scan without intercept": organ_ct(label).astype(np.int32) + 1024,
        "8-bit scan": _eight_bit(0.0),
        "8-bit smoothed scan": _eight_bit(3.0),
    }[kind]
    problem = label_map_problem(_image(array, dtype))
    assert (problem is not None) == is_label, problem
    if is_label:
        assert problem.endswith("… 117 (118 values); no air")


# --- the path rule and ignored files ------------------------------------------------------------------------------


def test_labels_folder_of_a_dataset_root_is_skipped_by_path(tmp_path):
    root = nnunet_root(tmp_path / "Dataset001")
    sources, problems = find_volumes([root])
    assert [s.id for s in sources] == ["case_000_0000.nii.gz", "case_001_0000.nii.gz"]  # relative to imagesTr/
    skipped = skipped_only(problems)
    assert skipped == [
        f"{root / 'labelsTr' / f'case_00{i}.nii.gz'}: a label map (under labelsTr/ next to imagesTr/), not a scan"
        for i in range(2)
    ]
    assert problems[-1] == f"ignored 1 file: {root / 'dataset.json'}" and isinstance(problems[-1], Note)
    assert len(skipped_only(find_volumes([root / "labelsTr"])[1])) == 2  # the label folder itself, named
    labels, problems = find_volumes([root / "labelsTr"], skip_labels=False)  # finetune-seg reads them on purpose
    assert len(labels) == 2 and problems == []


def test_a_labels_folder_without_images_next_to_it_is_not_a_dataset(tmp_path):
    ct, _ = ct_and_label()
    write_volume(tmp_path / "study" / "labels" / "ct.nii.gz", ct, **GEOMETRY)  # a folder that happens to be named so
    sources, problems = find_volumes([tmp_path / "study"])
    assert len(sources) == 1 and problems == []


def test_ignored_files_are_named_once_and_a_long_list_is_cut(tmp_path):
    ct, _ = ct_and_label()
    write_volume(tmp_path / "scans" / "a.nii.gz", ct, **GEOMETRY)
    for name in ("notes.txt", "b.png", "c.csv", "d.md", "e.json", "f.pdf", "g.jpg", ".DS_Store", "h.mhd.raw"):
        (tmp_path / "scans" / "sub" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "scans" / "sub" / name).write_text("x", encoding="utf-8")
    sources, problems = find_volumes([tmp_path / "scans"])
    assert len(sources) == 1 and len(problems) == 1 and isinstance(problems[0], Note)
    assert problems[0].startswith("ignored 7 files: ") and problems[0].endswith(" and 2 more")
    assert ".DS_Store" not in problems[0] and ".raw" not in problems[0]


# --- the commands -------------------------------------------------------------------------------------------------


def test_pretrain_on_an_nnunet_root_trains_on_the_images_only(tmp_path):
    root = nnunet_root(tmp_path / "Dataset001")
    result = pretrain(tmp_path, root)
    assert result.exit_code == 0, result.output
    assert "2 volume(s) ready, 2 skipped" in result.output
    for i in range(2):
        (line,) = lines_with(result.output, f"case_00{i}.nii.gz")
        assert line.startswith("skipped:") and "label map (under labelsTr/" in line
    assert len(lines_with(result.output, "ignored 1 file:")) == 1  # dataset.json, a note that skips nothing


def test_pretrain_and_embed_skip_a_label_map_among_scans_by_content(tmp_path, tiny_checkpoint):
    data = mixed_folder(tmp_path)
    result = pretrain(tmp_path, data)
    assert result.exit_code == 0, result.output
    (line,) = lines_with(result.output, "ct_seg.nrrd")
    assert line.startswith("skipped:") and "looks like a label map (uint8 voxels holding only 0, 1, 2" in line
    assert "1 volume(s) ready, 1 skipped" in result.output
    embedded = runner.invoke(app, ["embed", str(tiny_checkpoint), str(data), "--out", str(tmp_path / "e.csv")])
    assert embedded.exit_code == 0, embedded.output
    (line,) = lines_with(embedded.output, "ct_seg.nrrd")
    assert line.startswith("skipped:") and "looks like a label map" in line
    assert "embedded 1 scan(s), 0 already done, 1 skipped" in embedded.output


def test_every_skip_line_names_its_file_the_same_way_for_a_folder_given_relative(tmp_path, monkeypatch):
    # the label map is refused by its voxels, after discovery; the scout and the note by discovery: all absolute
    data = mixed_folder(tmp_path)
    write_volume(data / "scout.nii.gz", np.zeros((64, 64, 1), np.int16), **GEOMETRY)
    (data / "notes.txt").write_text("x", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = pretrain(tmp_path, Path("data"))
    assert result.exit_code == 0, result.output
    assert lines_with(result.output, "ct_seg.nrrd")[0].startswith(f"skipped: {data / 'ct_seg.nrrd'}: looks like")
    assert lines_with(result.output, "scout.nii.gz")[0].startswith(f"skipped: {data / 'scout.nii.gz'}: a dimension")
    assert lines_with(result.output, "ignored 1 file")[0].endswith(f"ignored 1 file: {data / 'notes.txt'}")


def test_reconstruct_refuses_a_label_map_in_one_line(tmp_path, tiny_checkpoint):
    label = mixed_folder(tmp_path) / "ct_seg.nrrd"
    result = runner.invoke(app, ["reconstruct", str(tiny_checkpoint), str(label), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [  # one line: no contract warning about its values first (it is no scan at all)
        f"error: {label}: looks like a label map (uint8 voxels holding only 0, 1, 2; no air), not a CT scan"
    ]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_117_class_map_outside_any_labels_folder_is_refused_as_a_scan(tmp_path, tiny_checkpoint):
    label = organ_map()
    data = tmp_path / "data"  # no labels/ folder: only the voxels tell
    write_volume(data / "ct.nii.gz", organ_ct(label), **GEOMETRY)
    seg = write_volume(data / "total_seg.nii.gz", label, dtype=np.uint8, **GEOMETRY)
    why = (
        "looks like a label map (uint8 voxels holding only 0, 1, 2, 3, 4, 5, … 117 (118 values); no air), not a CT scan"
    )
    result = pretrain(tmp_path, data)
    assert result.exit_code == 0, result.output
    assert lines_with(result.output, "total_seg") == [f"skipped: {seg}: {why}"]
    embedded = runner.invoke(app, ["embed", str(tiny_checkpoint), str(data), "--out", str(tmp_path / "e.csv")])
    assert embedded.exit_code == 0, embedded.output
    assert lines_with(embedded.output, "total_seg") == [f"skipped: {seg}: {why}"]
    result = runner.invoke(app, ["reconstruct", str(tiny_checkpoint), str(seg), "--out", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning:")]
    assert result.exit_code == 1 and lines == [f"error: {seg}: {why}"]


def test_pretrain_counts_a_folder_with_one_scan_and_two_notes_as_usable(tmp_path):
    ct, _ = ct_and_label()
    write_volume(tmp_path / "data" / "ct.nii.gz", ct, **GEOMETRY)
    (tmp_path / "data" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "data" / "b.txt").write_text("notes", encoding="utf-8")
    result = pretrain(tmp_path, tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert "1 volume(s) ready; cache" in result.output  # nothing skipped
    (line,) = lines_with(result.output, "ignored")
    assert line == f"note: ignored 2 files: {tmp_path / 'data' / 'a.png'}, {tmp_path / 'data' / 'b.txt'}"


def test_finetune_seg_still_reads_the_labels_of_an_nnunet_root(tmp_path):
    root = nnunet_root(tmp_path / "Dataset001", readme=True)  # a README.md next to the images is no problem
    cases = find_cases([root])
    assert [c.id for c in cases] == ["case_000", "case_001"]
    assert all(check_case(c) == 2 for c in cases)
    cached = cache_cases(cases[:1], PreprocessConfig(spacing=(2.0, 2.0, 2.0), crop=32))  # labels through LoadCTd
    assert np.unique(cached[0]["label"].numpy()).tolist() == [1.0, 2.0]  # cropped to the body: no background
