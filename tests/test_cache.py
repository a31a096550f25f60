"""The volume cache: int16 HU in blosc2 chunks that hold what ``preprocess_transforms`` produces (within half a HU
step), read crop by crop; labels on their image's grid; damaged, old and concurrently written entries."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import zlib

import nibabel as nib
import numpy as np
import pytest

import ctmae.preprocess.cache as cache_module
from conftest import OBLIQUE, write_dicom_series
from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.mae.config import DataConfig
from ctmae.preprocess.build_cache import build_cache
from ctmae.preprocess.cache import OLD_CACHE_NOTE, CachedVolume, VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.files import OutputError

LPS = np.diag([-0.7, -0.8, 2.5, 1.0])  # RAS affine of an LPS-stored volume, spacing 0.7 x 0.8 x 2.5 mm
SAGITTAL = np.array([[0.0, 0.0, -2.5, 40.0], [0.8, 0.0, 0.0, -20.0], [0.0, -0.7, 0.0, 60.0], [0, 0, 0, 1]])
TILTED = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block(  # conftest's oblique LPS direction, as a RAS affine
    [[np.asarray(OBLIQUE).reshape(3, 3) @ np.diag([0.7, 0.8, 2.5]), np.array([[5.0], [-3.0], [2.0]])], [0, 0, 0, 1]]
)
# Spacings 0.7 x 0.9 x 2.5 mm: resampled to 1.5 mm, no output voxel centre lies halfway between two input voxels.
NO_TIES = np.diag([-0.7, -0.9, 2.5, 1.0])
SAGITTAL_NO_TIES = SAGITTAL @ np.diag([0.9 / 0.8, 1.0, 1.0, 1.0])  # its 0.8 mm axis is the first
TILTED_NO_TIES = TILTED @ np.diag([1.0, 0.9 / 0.8, 1.0, 1.0])
WINDOW = PreprocessConfig().hu_window
# The cache stores whole HU (int16), so a value differs from the float chain by at most half a HU step, on top of
# the float rounding in which SimpleITK's resampling and MONAI's differ (the tolerance of the float32 cache before).
HALF_STEP = 0.5 / (WINDOW[1] - WINDOW[0])
RESAMPLE_ATOL = 1e-4


def _ct(shape=(90, 80, 24), seed=0, edge=False) -> np.ndarray:
    """(X, Y, Z) int16 HU: air around a noisy box of tissue and bone, off-centre so the foreground crop matters;
    with ``edge`` the box touches the volume's borders on three sides."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000, np.int16)
    box = np.s_[0:70, 15:80, 0:20] if edge else np.s_[10:70, 15:60, 3:20]
    a[box] = rng.integers(-200, 900, a[box].shape)
    return a


def _save(path, array, affine, slope=None) -> VolumeSource:
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    if slope is not None:  # stored values v mean v * slope + inter HU
        image.header.set_slope_inter(*slope)
    nib.save(image, path)
    return VolumeSource(path.name, (str(path),), False)


def _nifti(path, affine, dtype=np.int16, slope=None, edge=False) -> VolumeSource:
    return _save(path, _ct(edge=edge).astype(dtype), affine, slope)


def _label(path, affine, dtype=np.uint8, classes=4, seed=1) -> VolumeSource:
    """A label on ``_ct``'s grid: random classes inside the tissue box, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    a = np.zeros((90, 80, 24), dtype)
    a[10:70, 15:60, 3:20] = rng.integers(0, classes, (60, 45, 17))
    return _save(path, a, affine)


def _dicom(path) -> VolumeSource:
    files = write_dicom_series(path, _ct(), spacing=(0.7, 0.8, 2.5), origin=(5.0, -3.0, 2.0))
    return VolumeSource(path.name, tuple(str(f) for f in files), True)


def _cfg(tmp_path) -> PreprocessConfig:
    return PreprocessConfig(cache_dir=str(tmp_path / "cache"), crop=16)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _nifti(p / "lps.nii.gz", LPS),
        lambda p: _nifti(p / "edge.nii.gz", LPS, edge=True),
        lambda p: _nifti(p / "sagittal.nii", SAGITTAL),
        lambda p: _nifti(p / "tilted.nii.gz", TILTED),
        lambda p: _nifti(p / "scaled.nii.gz", LPS, dtype=np.float32, slope=(0.5, -10.0)),
        lambda p: _dicom(p / "series"),
    ],
    ids=["lps", "body-at-border", "sagittal", "oblique", "scaled-float", "dicom"],
)
def test_cache_equals_the_monai_chain_within_half_a_hu_step(tmp_path, make):
    source = make(tmp_path)
    cfg = _cfg(tmp_path)
    expected = preprocess_transforms(cfg)({"image": list(source.files)})["image"]  # (1, X, Y, Z), padded to 16
    path = VolumeCache(cfg).ensure(source)
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert path.suffix == ".b2nd" and meta["bytes"] == path.stat().st_size
    assert meta["crc32"] == zlib.crc32(path.read_bytes())  # the file's bytes, computed from memory
    volume = VolumeCache(cfg).load(source)
    assert isinstance(volume, CachedVolume) and volume.array.dtype == np.int16
    assert volume.shape == tuple(expected.shape[1:]) == tuple(meta["shape"])
    np.testing.assert_allclose(meta["affine"], expected.affine.numpy(), atol=1e-6)
    whole = volume.numpy()
    assert whole.dtype == np.float32
    np.testing.assert_allclose(whole, expected[0].numpy(), rtol=0, atol=HALF_STEP + RESAMPLE_ATOL)
    lo, hi = WINDOW
    np.testing.assert_array_equal(volume.array[...], np.rint(whole * (hi - lo) + lo))  # whole HU
    box = whole[2:14, 1:9, 3:16]
    np.testing.assert_array_equal(volume[2:14, 1:9, 3:16], box)  # a crop is the same box of the whole volume


def test_a_crop_decompresses_only_the_blocks_it_touches(tmp_path):
    """Reading one crop touches far fewer bytes than the volume: blosc2 chunks (and their blocks)."""
    source = _nifti(tmp_path / "lps.nii.gz", LPS)
    volume = VolumeCache(_cfg(tmp_path)).load(source)
    assert volume.array.chunks[0] <= cache_module.CHUNKS[0] and volume.array.blocks == tuple(
        min(b, c) for b, c in zip(cache_module.BLOCKS, volume.array.chunks)
    )
    out = np.full((4, 4, 4), np.nan, np.float32)
    volume.read((1, 2, 3), (4, 4, 4), out=out)
    np.testing.assert_array_equal(out, volume.numpy()[1:5, 2:6, 3:7])


@pytest.mark.parametrize("flip", [False, True])
def test_flip_mirrors_about_half_the_training_crops_left_right(tmp_path, flip):
    """``data.flip``: on a volume that brightens along x, unmirrored crops all brighten one way; mirrored crops (about
    half of them, seeded) the other way. Without the option no crop is mirrored."""
    from conftest import write_volume
    from ctmae.mae.crops import CropVisits

    ramp = np.broadcast_to(np.linspace(-800, 800, 60)[:, None, None], (60, 40, 30)).astype(np.int16)
    path = write_volume(tmp_path / "ramp.nii.gz", ramp, spacing=(1.5, 1.5, 1.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    visits = CropVisits(
        [VolumeSource(path.name, (str(path),), False)], _cfg(tmp_path), DataConfig(flip=flip, crops_per_volume=8), 0
    )
    crops = np.concatenate([visits[v][0].numpy() for v in range(4)])  # (32, 1, 16, 16, 16)
    rising = np.sign(crops[:, 0, -1] - crops[:, 0, 0]).mean(axis=(1, 2))  # +1 or -1 per crop along x
    assert set(np.unique(rising)) <= {-1.0, 1.0}
    mirrored = (rising != rising[0]).sum() if not flip else min((rising > 0).sum(), (rising < 0).sum())
    assert (mirrored == 0) if not flip else (8 <= mirrored <= 16)


@pytest.mark.parametrize("zoom", [0.0, 0.25])
def test_zoom_scales_the_training_crops_within_its_range(tmp_path, zoom):
    """``data.zoom``: on a volume that brightens evenly along x, a crop scaled by s rises s times as steeply across
    its 16 voxels. With zoom 0.25 the rises spread over both sides of the unscaled one, within [1/1.25, 1.25] of it;
    without zoom every crop rises the same."""
    from conftest import write_volume
    from ctmae.mae.crops import CropVisits

    ramp = np.broadcast_to(np.linspace(-800, 800, 81)[:, None, None], (81, 40, 30)).astype(np.int16)  # 20 HU/voxel
    path = write_volume(tmp_path / "ramp.nii.gz", ramp, spacing=(1.5, 1.5, 1.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    visits = CropVisits(
        [VolumeSource(path.name, (str(path),), False)], _cfg(tmp_path), DataConfig(zoom=zoom, crops_per_volume=8), 0
    )
    crops = np.concatenate([visits[v][0].numpy() for v in range(4)])  # (32, 1, 16, 16, 16)
    base = 15 * 20 / 2000  # 15 voxel steps of 20 HU, in window units (HU window 2000 wide)
    scale = np.abs(crops[:, 0, -1, 8, 8] - crops[:, 0, 0, 8, 8]) / base  # per crop
    if not zoom:
        np.testing.assert_allclose(scale, 1.0, atol=1e-3)
    else:
        assert scale.min() < 0.95 and scale.max() > 1.05, scale
        assert scale.min() > 1 / 1.25 - 0.02 and scale.max() < 1.25 + 0.02, scale


@pytest.mark.parametrize("contrast", [0.0, 0.25])
def test_contrast_bends_the_training_crops_intensities_within_its_range(tmp_path, contrast):
    """``data.contrast``: on a volume of 0 HU (0.5 in window units) with air (0) and dense bone (1) beside it, a crop
    under gamma g holds 0.5^g, g within [1/1.25, 1.25] and on both sides of 1, while air and bone stay; without the
    option every crop keeps 0.5, and the same seed gives the same crops."""
    from conftest import write_volume
    from ctmae.mae.crops import CropVisits

    volume = np.zeros((40, 16, 30), np.int16)  # soft tissue at 0 HU, one crop wide along y
    volume[:, :2], volume[:, -2:] = -1000, 1000  # a layer of air and one of bone that every crop holds
    path = write_volume(tmp_path / "v.nii.gz", volume, spacing=(1.5, 1.5, 1.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    pre, cfg = _cfg(tmp_path), DataConfig(contrast=contrast, crops_per_volume=8)
    visits = CropVisits([VolumeSource(path.name, (str(path),), False)], pre, cfg, 0)
    crops = np.concatenate([visits[v][0].numpy() for v in range(4)])  # (32, 1, 16, 16, 16)
    tissue = crops[:, 0, 8, 8, 8]
    gamma = np.log(tissue) / np.log(0.5)
    if not contrast:
        np.testing.assert_allclose(tissue, 0.5, atol=1e-6)
    else:
        assert gamma.min() < 0.95 and gamma.max() > 1.05, gamma
        assert gamma.min() > 1 / 1.25 - 1e-3 and gamma.max() < 1.25 + 1e-3, gamma
    assert (crops.min(axis=(1, 2, 3, 4)) == 0).all() and (crops.max(axis=(1, 2, 3, 4)) == 1).all()
    np.testing.assert_array_equal(crops[:8], CropVisits(visits.sources, pre, cfg, 0)[0][0].numpy())


@pytest.mark.parametrize("zoom", [0.0, 0.25])
def test_context_crops_hold_the_plain_crops_with_the_scan_around_them(tmp_path, zoom):
    """``model.fill_context``: each crop comes with 8 voxels of the scan around it (for the fills only). Unscaled, its
    centre is exactly the crop the same seed gives without context; beyond the scan's edge the context is NaN (never
    inside the crop), and inside the scan it holds the scan's voxels."""
    from conftest import write_volume
    from ctmae.mae.crops import CropVisits

    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, (24, 20, 18)).astype(np.int16)  # a crop is 16: every context passes an edge
    path = write_volume(tmp_path / "v.nii.gz", volume, spacing=(1.5, 1.5, 1.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    pre, cfg = _cfg(tmp_path), DataConfig(zoom=zoom, crops_per_volume=8)
    sources = [VolumeSource(path.name, (str(path),), False)]
    plain = np.concatenate([CropVisits(sources, pre, cfg, 0)[v][0].numpy() for v in range(4)])  # (32, 1, 16³)
    around = np.concatenate([CropVisits(sources, pre, cfg, 0, context=8)[v][0].numpy() for v in range(4)])
    assert around.shape == (32, 1, 32, 32, 32)
    centre = around[:, :, 8:24, 8:24, 8:24]
    if not zoom:
        np.testing.assert_array_equal(centre, plain)
    assert not np.isnan(centre).any()
    outside = np.isnan(around)
    assert outside.any(axis=(1, 2, 3, 4)).all()  # the scan is smaller than every crop with its context
    assert around[~outside].min() >= 0 and around[~outside].max() <= 1


def test_compressed_entry_is_a_fraction_of_the_float32_volume(tmp_path):
    source = _nifti(tmp_path / "lps.nii.gz", LPS)
    path = VolumeCache(_cfg(tmp_path)).ensure(source)
    float32_bytes = np.prod(json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["shape"]) * 4
    assert path.stat().st_size < 0.5 * float32_bytes  # noisy synthetic tissue; a real scan compresses to ~0.25


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "drop_sidecar"])
def test_damaged_entries_are_detected_and_rebuilt(tmp_path, monkeypatch, damage):
    source = _nifti(tmp_path / "lps.nii.gz", LPS)
    cfg = _cfg(tmp_path)
    path = VolumeCache(cfg).ensure(source)
    good = VolumeCache(cfg).load(source).numpy()
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_a_byte":
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(raw)  # the same size
    else:
        path.with_suffix(".json").unlink()
    built = []
    monkeypatch.setattr(cache_module, "_VERIFIED", set())  # as in a new process, which checks the CRC once
    cache = VolumeCache(cfg)
    real = cache._preprocess
    cache._preprocess = lambda s: built.append(s) or real(s)
    np.testing.assert_array_equal(cache.load(source).numpy(), good)
    assert built == [source]  # detected and rebuilt
    assert zlib.crc32(path.read_bytes()) == json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["crc32"]


def test_a_valid_entry_is_used_without_reading_the_scan(tmp_path, monkeypatch):
    source = _nifti(tmp_path / "lps.nii.gz", LPS)
    cfg = _cfg(tmp_path)
    VolumeCache(cfg).ensure(source)

    def no_read(*args, **kwargs):
        raise AssertionError("the scan was read although its entry is valid")

    monkeypatch.setattr(cache_module.CTReader, "read", no_read)
    monkeypatch.setattr(cache_module, "_VERIFIED", set())  # as in a fresh process: the CRC is checked again
    assert VolumeCache(cfg).load(source).shape[0] >= 16


def test_an_entry_of_an_older_ctmae_is_rebuilt_and_said_once(tmp_path):
    sources = [_nifti(tmp_path / f"s{i}.nii.gz", LPS) for i in range(2)]
    cfg = _cfg(tmp_path)
    cache = VolumeCache(cfg)
    cache.dir.mkdir(parents=True)
    olds = []
    for s in sources:  # what CACHE_VERSION 1 wrote: <key>.npy + <key>.json with the old settings in the key
        key = cache_module.hashlib.sha256(f"{s.identity()}|{cache.old_settings}".encode()).hexdigest()[:32]
        np.save(cache.dir / f"{key}.npy", np.zeros((16, 16, 16), np.float32))
        (cache.dir / f"{key}.json").write_text('{"bytes": 16512, "crc32": 0}', encoding="utf-8")
        olds.append(cache.dir / key)
    notes = []
    good, problems = build_cache(sources, cfg, on_note=notes.append)
    assert good == sources and problems == [] and notes == [OLD_CACHE_NOTE]
    assert not any(o.with_suffix(x).exists() for o in olds for x in (".npy", ".json"))
    assert sorted(p.suffix for p in cache.dir.iterdir()) == [".b2nd", ".b2nd", ".json", ".json"]


def test_a_dicom_series_read_by_an_older_ctmae_is_read_again_and_its_entry_replaced(tmp_path):
    # series are read anew when their reading changes (a gantry-tilted one now lies where its slices do)
    source = _dicom(tmp_path / "series")
    cfg = _cfg(tmp_path)
    build_cache([source], cfg)
    cache = VolumeCache(cfg)
    new = cache.dir / cache.key(source)
    older = cache.dir / cache.key(source, cache_module.SERIES_READING - 1)
    assert new != older
    for suffix in (".b2nd", ".json"):  # as the older ctmae left it: the same entry under the older key
        new.with_suffix(suffix).rename(older.with_suffix(suffix))
    notes = []
    assert build_cache([source], cfg, on_note=notes.append) == ([source], []) and notes == [OLD_CACHE_NOTE]
    assert new.with_suffix(".json").exists() and not older.with_suffix(".b2nd").exists()
    assert not older.with_suffix(".json").exists()


def test_a_full_disk_is_one_line_and_earlier_entries_stay_intact(tmp_path, monkeypatch):
    sources = [_nifti(tmp_path / f"s{i}.nii.gz", LPS) for i in range(3)]
    cfg = _cfg(tmp_path)
    real, calls = cache_module.write_bytes, []

    def fills_up(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(cache_module, "write_bytes", fills_up)
    with pytest.raises(OutputError) as info:
        build_cache(sources, cfg)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and ".b2nd" in message
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 2 and not any(n.startswith(".") for n in names)  # one complete entry, no temporary file
    monkeypatch.setattr(cache_module, "_VERIFIED", set())
    assert VolumeCache(cfg).load(sources[0]).shape[0] >= 16


def _build_at_once(cache_dir: str, path: str, barrier) -> None:
    source = VolumeSource("lps", (path,), False)
    barrier.wait()
    VolumeCache(PreprocessConfig(cache_dir=cache_dir, crop=16)).ensure(source)


@pytest.mark.parametrize("round_", range(3))
def test_two_writers_of_one_entry_leave_a_whole_entry(tmp_path, round_):
    """Two processes build one entry at the same moment (after this process used blosc2, as a training process
    has): both finish, and the entry left is whole and consistent with its sidecar."""
    source = _nifti(tmp_path / "lps.nii.gz", LPS)
    VolumeCache(_cfg(tmp_path)).load(_nifti(tmp_path / "other.nii", LPS)).numpy()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_at_once, args=(str(tmp_path / "cache"), source.files[0], barrier)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 4 and not any(n.startswith(".") for n in names)  # no torn or temporary file
    path = VolumeCache(_cfg(tmp_path)).path(source)
    assert zlib.crc32(path.read_bytes()) == json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["crc32"]


@pytest.mark.parametrize("affine", [NO_TIES, TILTED_NO_TIES, SAGITTAL_NO_TIES], ids=["lps", "oblique", "sagittal"])
def test_case_entries_equal_the_monai_chain_with_labels(tmp_path, affine):
    image, label = _nifti(tmp_path / "img.nii.gz", affine), _label(tmp_path / "lab.nii.gz", affine)
    cfg = _cfg(tmp_path)
    item = {"image": list(image.files), "label": list(label.files)}
    expected = preprocess_transforms(cfg, label=True)(item)
    case = VolumeCache(cfg).load_case(image, label)
    for key in ("image", "label"):
        assert case[key].shape == expected[key].shape and case[key].dtype == expected[key].dtype
        np.testing.assert_allclose(case[key].affine.numpy(), expected[key].affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(case["image"].numpy(), expected["image"].numpy(), atol=HALF_STEP + RESAMPLE_ATOL)
    np.testing.assert_array_equal(case["label"].numpy(), expected["label"].numpy())  # exactly


def test_labels_differ_from_monai_only_at_halfway_ties(tmp_path):
    """1 mm voxels to 1.5 mm: every other output voxel centre is halfway between two input voxels. SimpleITK's
    nearest neighbour rounds those halves up; MONAI's grid_sample rounds them to even (or as float rounding falls):
    both are a nearest voxel. Everywhere else the labels are equal."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    image, label = _nifti(tmp_path / "img.nii.gz", affine), _label(tmp_path / "lab.nii.gz", affine)
    cfg = _cfg(tmp_path)
    expected = preprocess_transforms(cfg, label=True)({"image": list(image.files), "label": list(label.files)})
    ours = VolumeCache(cfg).load_case(image, label)["label"]
    to_input = np.linalg.inv(affine)  # RAS -> input voxel index
    index = np.indices(ours.shape[1:]).reshape(3, -1)  # output voxel indices (3, N)
    position = (to_input @ ours.affine.numpy())[:3] @ np.vstack([index, np.ones(index.shape[1])])  # input indices
    halfway = (np.abs(position - np.floor(position) - 0.5) < 1e-3).any(0).reshape(ours.shape[1:])
    differs = ours[0].numpy() != expected["label"][0].numpy()
    assert differs.any() and not (differs & ~halfway).any()


def test_case_entries_are_reused_and_shared_with_the_image_entry(tmp_path, monkeypatch):
    image, label = _nifti(tmp_path / "img.nii.gz", NO_TIES), _label(tmp_path / "lab.nii.gz", NO_TIES)
    cfg = _cfg(tmp_path)
    first = VolumeCache(cfg).load_case(image, label)
    assert len(list((tmp_path / "cache").glob("*.b2nd"))) == 2  # the image entry (pretraining's) and the label's
    monkeypatch.setattr(cache_module.CTReader, "read", lambda *a, **k: pytest.fail("a cached case was read again"))
    again = VolumeCache(cfg).load_case(image, label)
    for key in ("image", "label"):
        np.testing.assert_array_equal(again[key].numpy(), first[key].numpy())


@pytest.mark.parametrize(
    "values, words",
    [(np.float32(0.5), "non-integer"), (np.float32(-1), "found -1"), (np.int16(300), "holds class 300")],
    ids=["fraction", "negative", "above-255"],
)
def test_a_label_that_is_not_class_indices_is_named(tmp_path, values, words):
    image = _nifti(tmp_path / "img.nii.gz", NO_TIES)
    label = _label(tmp_path / "lab.nii.gz", NO_TIES, dtype=values.dtype)
    array = nib.load(label.files[0]).get_fdata().astype(values.dtype)
    array[40, 40, 10] = values
    label = _save(tmp_path / "lab.nii.gz", array, NO_TIES)
    with pytest.raises(InputError) as info:
        VolumeCache(_cfg(tmp_path)).load_case(image, label)
    assert str(info.value).startswith(f"{label.files[0]}: ") and words in str(info.value)
