"""ctmae.io: finding inputs, reading every format with the same voxels and RAS affine, and refusing bad inputs."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from benchmarks.common import peak_read_bytes
from conftest import expected_affine, write_dicom_series, write_volume
from ctmae.io.checks import InputError
from ctmae.io.dicom import has_dicom_magic
from ctmae.io.dicom_writer import deterministic_uid, write_series
from ctmae.io.discovery import Note, VolumeSource, find_volumes, skipped_only
from ctmae.io.volume import CTReader, read_volume, write_nifti
from ctmae.preprocess.build_cache import build_cache
from ctmae.preprocess.cache import VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.inventory import inventory

# GDCM stores positions and orientations as decimal strings of at most 16 characters.
DICOM_ATOL = 1e-4


def _only(inputs: list) -> VolumeSource:
    sources, problems = find_volumes(inputs)
    assert problems == [] and len(sources) == 1, (sources, problems)
    return sources[0]


def _assert_one_line_naming(message: str, path: Path | str) -> None:
    assert "\n" not in message and str(path) in message, message


def _write_sr_dicom(path: Path) -> None:
    """A DICOM Part 10 file with no pixel data (a structured report), written byte by byte."""

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        value += (b"\0" if vr == b"UI" else b" ") * (len(value) % 2)
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    sop_class = b"1.2.840.10008.5.1.4.1.1.88.11"
    explicit_little_endian = b"1.2.840.10008.1.2.1"
    meta = element(2, 2, b"UI", sop_class) + element(2, 3, b"UI", b"2.25.1")
    meta += element(2, 0x10, b"UI", explicit_little_endian)
    meta = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(meta)) + meta
    data = element(8, 0x16, b"UI", sop_class) + element(8, 0x60, b"CS", b"SR") + element(0x20, 0x0E, b"UI", b"2.25.2")
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_image_formats_round_trip_voxels_and_affine(tmp_path, ct_array, suffix):
    path = write_volume(tmp_path / f"ct{suffix}", ct_array)
    source = _only([path])
    assert source.id == f"ct{suffix}" and source.files == (str(path),) and not source.is_dicom
    array, affine = read_volume(source)
    assert array.dtype == np.float32 and array.shape == (20, 18, 12)
    np.testing.assert_array_equal(array, ct_array)
    np.testing.assert_allclose(affine, expected_affine(), atol=1e-5)


def test_dicom_series_round_trips_voxels_and_affine(tmp_path, ct_array):
    files = write_dicom_series(tmp_path / "lung", ct_array)
    source = _only([tmp_path / "lung"])
    assert source.is_dicom and source.files == tuple(str(f) for f in files)
    array, affine = read_volume(source)
    np.testing.assert_array_equal(array, ct_array)
    np.testing.assert_allclose(affine, expected_affine(), atol=DICOM_ATOL)


def test_a_multi_frame_dicom_file_named_on_its_own_is_read_as_the_volume_it_holds(tmp_path, ct_array):
    # an enhanced CT export: one file holds every slice; a slice of a classic series still gets the folder hint
    image = sitk.GetImageFromArray(ct_array.transpose(2, 1, 0))  # (X, Y, Z) -> SimpleITK's (Z, Y, X)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetMetaData("0008|0060", "CT")
    path = tmp_path / "export" / "volume.dcm"
    path.parent.mkdir()
    sitk.WriteImage(image, str(path))
    assert has_dicom_magic(str(path))
    source = _only([path])
    assert source.is_dicom and source.files == (str(path),) and source.label == str(path)
    assert source.id == "volume.dcm" and source.modality == "CT"
    array, affine = read_volume(source)
    np.testing.assert_array_equal(array, ct_array)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), (0.7, 0.9, 2.5), atol=DICOM_ATOL)
    assert _only([path.parent]).files == (str(path),)  # its folder scanned: the same volume
    cfg = PreprocessConfig(cache_dir=str(tmp_path / "cache"))
    assert build_cache([source], cfg) == ([source], [])
    assert inventory([source], VolumeCache(cfg))[0][0]["kind"] == "DICOM multi-frame file"


def test_the_slices_of_a_series_named_one_by_one_are_read_as_that_series(tmp_path, ct_array):
    # `ctmae pretrain scans/*.dcm`: one volume, not a skip line per slice; one slice alone still gets the hint
    files = write_dicom_series(tmp_path / "lung", ct_array)
    whole = _only([tmp_path / "lung"])
    assert _only([*files, files[3]]) == whole  # every slice, one of them twice
    part = _only(files[2:9])
    assert part.files == tuple(str(f) for f in files[2:9]) and part.id == whole.id
    np.testing.assert_array_equal(read_volume(part)[0], ct_array[:, :, 2:9])
    sources, problems = find_volumes([files[5]])
    assert sources == [] and problems == [f"{files[5]}: a single DICOM file; pass its folder to read the whole series"]


def _tilted_series(folder: Path, degrees: float, dz: float = 2.0, slices: int = 24) -> list[Path]:
    """A box of tissue in air scanned with the gantry tilted by ``degrees`` about the row axis: image planes along
    (1, 0, 0) and (0, cos t, sin t), the table (each slice's ImagePositionPatient) stepping ``dz`` mm along z."""
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    array = np.full((slices, 40, 40), -1000, np.int16)  # (Z, Y, X)
    array[:, 12:28, 12:28] = 40
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, dz * c))
    image.SetDirection((1, 0, 0, 0, c, -s, 0, s, c))  # columns: row, column, normal
    files = write_series(image, folder, deterministic_uid(f"tilt:{degrees}"), "Anon^Test", "ANON")
    for k, path in enumerate(files):  # each slice where the table put it: k·dz along z, not along the normal
        one = sitk.ReadImage(str(path))
        one.EraseMetaData("0020|0032")  # or the writer keeps the position it read
        one.SetOrigin((0.0, 0.0, k * dz))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(path))
        writer.Execute(one)
    return files


@pytest.mark.parametrize("degrees", [0.0, 20.0])
def test_a_gantry_tilted_series_is_read_where_its_slices_lie(tmp_path, degrees):
    # ITK alone stacks the slices along their normal: over 24 slices the box's last slice lands 16 mm off in y
    # and 3 mm in z at 20 degrees; read as they lie, each slice's box centre is where its DICOM header puts it
    _tilted_series(tmp_path / "head", degrees)
    array, affine = read_volume(_only([tmp_path / "head"]))
    t = np.radians(degrees)
    for k in (0, 23):
        lps = [19.5, 19.5 * np.cos(t), 2.0 * k + 19.5 * np.sin(t)]  # the slice's position plus the box's centre
        truth = np.multiply(lps, [-1, -1, 1])  # LPS -> RAS
        inside = np.argwhere(array > -500)  # (M, 3) voxel indices of the box
        centres = inside @ affine[:3, :3].T + affine[:3, 3]  # their RAS positions
        near = centres[np.abs((centres - truth) @ np.array([0.0, np.sin(t), np.cos(t)])) < 0.5]  # that slice's plane
        np.testing.assert_allclose(near.mean(0), truth, atol=0.5)
    assert array.shape == ((40, 40, 24) if degrees == 0 else (40, 40 + 16, 24))  # 23 shifts of 0.68 voxels


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.int64])
def test_write_nifti_round_trip_keeps_dtype_and_geometry(tmp_path, ct_array, dtype):
    affine = expected_affine()
    path = tmp_path / "out" / "vol.nii.gz"
    write_nifti(ct_array.astype(dtype) % 200, affine, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vol.nii.gz"]  # no temporary file left behind
    image = nib.load(path)
    assert image.get_data_dtype() == dtype
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    array, read_affine = read_volume(_only([path]))
    np.testing.assert_array_equal(array, ct_array.astype(dtype) % 200)
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, slope, shape_4d",
    [
        ("<i2", None, False),
        (">i2", None, False),
        ("<u2", (1.0, -1024.0), False),
        ("<f4", None, False),
        ("<i2", (0.5, 3.0), False),
        ("<i2", None, True),
    ],
    ids=["int16", "big-endian", "scaled-uint16", "float32", "scaled-int16", "4th-axis-of-1"],
)
def test_nifti_voxels_and_geometry_match_simpleitks_reading(tmp_path, ct_array, dtype, slope, shape_4d):
    array = ct_array.astype(dtype)
    if shape_4d:  # a 3D volume stored with a 4th axis of length 1, which ITK reads as 3D
        array = array[..., None]
    affine = np.array([[0.0, 0.0, -2.5, 40.0], [0.8, 0.0, 0.0, -20.0], [0.0, -0.7, 0.0, 60.0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(array, affine)
    if slope is not None:
        image.header.set_slope_inter(*slope)
    path = tmp_path / "v.nii.gz"
    nib.save(image, path)
    ours, our_affine = read_volume(VolumeSource("v", (str(path),), False))
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(ours, sitk.GetArrayViewFromImage(itk).transpose(2, 1, 0).reshape(ours.shape), rtol=1e-6)
    np.testing.assert_allclose(our_affine, CTReader().get_data(itk)[1]["affine"], atol=1e-6)


def test_write_nifti_refuses_a_2d_array(tmp_path):
    with pytest.raises(ValueError, match="3D array"):
        write_nifti(np.zeros((4, 4)), np.eye(4), tmp_path / "x.nii.gz")


@pytest.mark.parametrize("form", ["nifti", "dicom files", "dicom folder"])
def test_ctreader_in_loadimaged_gives_ras_metatensor(tmp_path, ct_array, form):
    if form == "nifti":
        image = write_volume(tmp_path / "ct.nii.gz", ct_array)
    else:
        files = write_dicom_series(tmp_path / "series", ct_array)
        image = [str(f) for f in files] if form == "dicom files" else tmp_path / "series"
    out = LoadImaged(keys="image", reader=CTReader(), image_only=True)({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), ct_array)
    np.testing.assert_allclose(out.affine.numpy(), expected_affine(), atol=DICOM_ATOL)
    assert out.meta["space"] == "RAS" and np.isnan(out.meta["original_channel_dim"])
    assert list(out.meta["spatial_shape"]) == [20, 18, 12]
    assert not any(key.startswith("00") for key in out.meta)  # geometry only, no DICOM tags


def test_two_series_in_one_folder_are_two_private_volumes(tmp_path, ct_array):
    uids = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    merged = tmp_path / "both"
    merged.mkdir()
    for n, uid in enumerate(uids):
        for f in write_dicom_series(tmp_path / f"s{n}", ct_array + n, series_uid=uid, patient_name="Doe^Jane"):
            f.rename(merged / f"s{n}_{f.name}")  # the writer names files by slice only
    sources, problems = find_volumes([merged])
    assert problems == [] and len(sources) == 2 and sources[0].id != sources[1].id
    for source in sources:
        assert source.id.startswith("both#") and len(source.id) == len("both#") + 12
        assert not any(secret in source.id for secret in ("Doe", "Jane", *uids))
        assert len(source.files) == 12
    means = sorted(float(read_volume(s)[0].mean()) for s in sources)
    assert means[1] - means[0] == pytest.approx(1.0)


def test_folders_are_scanned_recursively_with_ids_relative_to_the_common_root(tmp_path, ct_array):
    write_volume(tmp_path / "data" / "ct" / "b.nrrd", ct_array)
    write_volume(tmp_path / "data" / "ct" / "deep" / "a.nii.gz", ct_array)
    write_dicom_series(tmp_path / "data" / "dicom" / "lung1", ct_array)
    for junk in ("notes.md", "meta.json", "ct/preview.png", "dicom/lung1/info.txt", "ct/.hidden.nii.gz"):
        (tmp_path / "data" / junk).write_text("not an image", encoding="utf-8")
    data = tmp_path / "data"
    sources, problems = find_volumes([data / "ct", data / "dicom", data / "ct" / "b.nrrd"])  # b.nrrd twice
    ignored = f"ignored 2 files: {data / 'ct' / 'preview.png'}, {data / 'dicom' / 'lung1' / 'info.txt'}"
    assert problems == [ignored] and isinstance(problems[0], Note) and skipped_only(problems) == []
    ids = [s.id for s in sources]
    assert ids[:2] == ["ct/b.nrrd", "ct/deep/a.nii.gz"] and ids[2].startswith("dicom/lung1#")
    assert [s.is_dicom for s in sources] == [False, False, True]


def test_txt_and_csv_lists_resolve_relative_paths(tmp_path, ct_array):
    write_volume(tmp_path / "ct" / "a.nii.gz", ct_array)
    write_volume(tmp_path / "ct" / "b.mha", ct_array)
    write_dicom_series(tmp_path / "dicom" / "s", ct_array)
    (tmp_path / "lists").mkdir()
    lines = ["# training set", "", "../ct/a.nii.gz", "../dicom/s", "../ct/missing.nii.gz"]
    (tmp_path / "lists" / "inputs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "lists" / "plain.csv").write_text("../ct/a.nii.gz,1\n../ct/b.mha,0\n", encoding="utf-8")
    (tmp_path / "lists" / "header.csv").write_text(f"label,image\n1,{tmp_path / 'ct' / 'b.mha'}\n", encoding="utf-8")
    sources, problems = find_volumes([tmp_path / "lists" / "inputs.txt"])
    assert [s.id.split("#")[0] for s in sources] == ["ct/a.nii.gz", "dicom/s"]
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'lists' / 'inputs.txt'}:5: ")
    _assert_one_line_naming(problems[0], "missing.nii.gz")
    sources, problems = find_volumes([tmp_path / "lists" / "plain.csv", tmp_path / "lists" / "header.csv"])
    assert problems == [] and [s.id for s in sources] == ["a.nii.gz", "b.mha"]


def test_identity_changes_when_a_file_changes(tmp_path, ct_array):
    path = write_volume(tmp_path / "a.nii.gz", ct_array)
    source = _only([path])
    before = source.identity()
    assert len(before) == 64 and before == _only([path]).identity()
    os.utime(path, ns=(1, 1))
    assert source.identity() != before


def _bad_find_inputs(tmp_path: Path, ct_array: np.ndarray) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected words in the problem) for inputs that find_volumes must skip."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("hello", encoding="utf-8")
    (tmp_path / "zero.nii.gz").write_bytes(b"")
    (tmp_path / "text.nii.gz").write_text("this is not an image\n", encoding="utf-8")
    (tmp_path / "image.xyz").write_text("?", encoding="utf-8")
    (tmp_path / "sr").mkdir()
    _write_sr_dicom(tmp_path / "sr" / "report.dcm")
    slice_file = write_dicom_series(tmp_path / "series", ct_array)[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.int16)), str(tmp_path / "flat.nii.gz"))
    four_d = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.int16), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "time.nii.gz"))
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    write_volume(tmp_path / "thin.mha", ct_array[:, :, :1])
    sheared = np.diag([0.7, 0.9, 2.5, 1.0])
    sheared[0, 2] = 0.8  # x moves with z: the slices of a gantry-tilted scan, left uncorrected
    nib.save(nib.Nifti1Image(ct_array, sheared), tmp_path / "tilted.nii.gz")
    return {
        "missing": (tmp_path / "nope.nii.gz", "does not exist"),
        "empty folder": (tmp_path / "empty", "empty folder"),
        "no volumes": (tmp_path / "docs", "no readable volumes"),
        "zero bytes": (tmp_path / "zero.nii.gz", "0 bytes"),
        "text as nifti": (tmp_path / "text.nii.gz", "not a readable image"),
        "unknown extension": (tmp_path / "image.xyz", "not an image"),
        "dicom without images": (tmp_path / "sr", "no image series"),
        "single dicom file": (slice_file, "pass its folder"),
        "2D": (tmp_path / "flat.nii.gz", "2D image (shape 64x64); ctmae needs a 3D volume"),
        "4D": (tmp_path / "time.nii.gz", "4D image"),
        "RGB": (tmp_path / "rgb.mha", "3 components per voxel"),
        "one slice": (tmp_path / "thin.mha", "dimension smaller than 2 (shape 20x18x1)"),
        "sheared affine": (tmp_path / "tilted.nii.gz", "its affine is sheared (axes not at right angles"),
    }


def test_find_volumes_reports_each_bad_input_in_one_line(tmp_path, ct_array):
    cases = _bad_find_inputs(tmp_path, ct_array)
    for name, (path, words) in cases.items():
        sources, problems = find_volumes([path])
        assert sources == [] and len(problems) == 1, (name, problems)
        _assert_one_line_naming(problems[0], path)
        assert words in problems[0], (name, problems[0])


def _bad_read_inputs(tmp_path: Path, ct_array: np.ndarray) -> dict[str, tuple[VolumeSource, str]]:
    """name -> (source, expected words in the InputError) for volumes that read_volume must refuse."""
    cases = {}
    for name, (path, words) in _bad_find_inputs(tmp_path, ct_array).items():
        if path.suffix in (".gz", ".mha"):
            cases[name] = (VolumeSource(path.name, (str(path),), False), words)
    good = write_volume(tmp_path / "good.nii.gz", ct_array).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    raw = gzip.decompress(good)
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 100])
    write_volume(tmp_path / "cut_source.nrrd", ct_array)
    (tmp_path / "cut.nrrd").write_bytes((tmp_path / "cut_source.nrrd").read_bytes()[:-100])
    with_nan = ct_array.astype(np.float32)
    with_nan[3, 4, 5] = np.nan
    write_volume(tmp_path / "nan.nii.gz", with_nan, dtype=np.float32)
    with_inf = ct_array.astype(np.float32)
    with_inf[0, 0, 0] = np.inf
    write_volume(tmp_path / "inf.mha", with_inf, dtype=np.float32)
    gap = write_dicom_series(tmp_path / "gap", ct_array, skip_slices=(5,))
    for name, words in [
        ("cut.nii.gz", "truncated"),
        ("cut.nii", "truncated"),
        ("cut.nrrd", "truncated"),
        ("nan.nii.gz", "1 non-finite voxel values"),
        ("inf.mha", "non-finite"),
    ]:
        cases[name] = (VolumeSource(name, (str(tmp_path / name),), False), words)
    cases["missing slice"] = (VolumeSource("gap", tuple(str(f) for f in gap), True), "uneven slice spacing")
    return cases


def test_read_volume_refuses_each_bad_volume_in_one_line(tmp_path, ct_array):
    for name, (source, words) in _bad_read_inputs(tmp_path, ct_array).items():
        with pytest.raises(InputError) as caught:
            read_volume(source)
        message = str(caught.value)
        _assert_one_line_naming(message, source.files[0] if not source.is_dicom else tmp_path / "gap")
        assert words in message, (name, message)
        assert "sitk" not in message and ".cxx" not in message, message


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _move_slice(path: Path, z_mm: float) -> None:
    """Rewrite one slice file of an axis-aligned series at another position along the slice normal."""
    one = sitk.ReadImage(str(path))
    x, y, _ = one.GetOrigin()
    one.SetOrigin((x, y, z_mm))
    one.SetMetaData("0020|0032", f"{x:g}\\{y:g}\\{z_mm:g}")  # the writer keeps the tag it read, so set it too
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(one)


@pytest.mark.parametrize(
    "case, stray, position, gap",
    [("stray", "slice_0005.dcm", 220.0, 200.0), ("missing", "slice_0003.dcm", 15.0, 10.0)],
)
def test_uneven_spacing_names_the_slice_and_its_distance(tmp_path, ct_array, case, stray, position, gap):
    geometry = dict(spacing=(1.0, 1.0, 5.0), origin=(0.0, 0.0, 0.0), direction=IDENTITY)
    skip = (2,) if case == "missing" else ()
    files = write_dicom_series(tmp_path / "series", ct_array[:, :, :6], **geometry, skip_slices=skip)
    if case == "stray":
        _move_slice(files[-1], 220.0)  # 200 mm beyond slice 4, where slice 5 belongs 5 mm away
    with pytest.raises(InputError) as caught:
        read_volume(_only([tmp_path / "series"]))
    assert str(caught.value) == (
        f"{tmp_path / 'series'}: uneven slice spacing: {stray} (at {position:.1f} mm along the slice normal) lies "
        f"{gap:.1f} mm from its neighbour, expected 5.0 mm (a missing slice or a stray one?)"
    )


def test_messages_about_a_dicom_series_name_its_folder(tmp_path):
    from ctmae.preprocess.build_cache import build_cache
    from ctmae.preprocess.config import PreprocessConfig

    series = tmp_path / "SERIES"
    write_dicom_series(series, np.zeros((16, 16, 5), np.int16), spacing=(1.0, 1.0, 2.5), direction=IDENTITY)
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 1.5), crop=32, cache_dir=str(tmp_path / "cache"))
    good, problems = build_cache(find_volumes([series])[0], cfg, min_edge=16)
    assert good == [] and len(problems) == 1
    assert problems[0].startswith(f"{series}: body region is ") and "slice_" not in problems[0], problems[0]


def test_a_series_sharing_its_folder_is_named_by_folder_and_hash(tmp_path, ct_array):
    merged = tmp_path / "both"
    for n in range(2):
        for f in write_dicom_series(tmp_path / f"s{n}", ct_array + n, series_uid=f"1.2.826.0.1.3680043.8.498.{n}"):
            merged.mkdir(exist_ok=True)
            f.rename(merged / f"s{n}_{f.name}")
    sources, _ = find_volumes([merged])
    assert len(sources) == 2 and [s.label for s in sources] == [f"{merged}#{s.id.split('#')[1]}" for s in sources]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size in /proc")
def test_reading_a_nii_gz_peaks_near_one_decompressed_volume(tmp_path):
    """Peak resident memory above the resident size before the read, in a fresh process: at most 1.5x the
    decompressed voxels (reading the file whole, decompressing and copying it took ~3x)."""
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, (256, 256, 256), dtype=np.int16)  # 32 MiB decompressed
    big = write_nifti_gz(tmp_path / "big.nii.gz", volume)
    small = write_nifti_gz(tmp_path / "small.nii.gz", volume[:8, :8, :8])
    peak = peak_read_bytes(small, big)
    assert peak <= 1.5 * volume.nbytes, f"peak {peak / volume.nbytes:.2f}x the decompressed volume"


def write_nifti_gz(path: Path, volume: np.ndarray) -> Path:
    image = nib.Nifti1Image(volume, np.diag([-0.7, -0.7, 1.5, 1.0]))
    nib.save(image, path)
    return path
