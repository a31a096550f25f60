"""`ctmae prepare` builds the cache as a job of its own (shards, skip-and-report, dataset summary), pretrain and
finetune-seg then read it without reading the scans again, and explicitly named image/label files pair in order."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

import ctmae.preprocess.cache as cache_module
from conftest import write_body_scans, write_volume
from ctmae.cli import app
from ctmae.io.checks import InputError
from ctmae.io.discovery import find_volumes
from ctmae.preprocess.build_cache import build_entries
from ctmae.preprocess.cache import OLD_CACHE_NOTE, VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.prepare import Shard, hu_percentiles
from ctmae.seg.data import cache_cases, find_cases

SMALL = ["--crop", "32"]  # prepare's settings that pretrain's TINY options match
TINY = ["--model", "tiny", "--crop", "32", "--patch", "8", "--workers", "0", "--batch-size", "2"]
ISO = (1.5, 1.5, 1.5)
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def prepare(*args) -> object:
    return CliRunner().invoke(app, ["prepare", *map(str, args)])


def errors_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture
def scans(tmp_path) -> Path:
    """Three small body scans, a text file posing as a NIfTI and a label map among them."""
    folder = write_body_scans(tmp_path / "scans", 3)
    (folder / "broken.nii.gz").write_text("not an image", encoding="utf-8")
    label = np.zeros((30, 30, 20), np.uint8)
    label[5:25, 5:25, 5:15] = 1
    label[10:20, 10:20, 8:12] = 2
    write_volume(folder / "zz_mask.nii.gz", label, spacing=ISO, dtype=np.uint8)
    return folder


def fail_on_read(monkeypatch) -> None:
    """Make reading any scan's voxels fail, so a test shows that nothing reads them."""

    def no_read(*args, **kwargs):
        raise AssertionError("a scan was read although its cache entry is valid")

    monkeypatch.setattr(cache_module.CTReader, "read", no_read)


def test_prepare_builds_the_cache_skips_bad_scans_and_summarises(tmp_path, scans):
    cache = tmp_path / "cache"
    result = prepare(scans, "--cache-dir", cache, "--workers", "2", *SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads((cache / "dataset.json").read_text(encoding="utf-8"))
    assert summary["scans"] == 3 and summary["shard"] is None
    assert len(summary["skipped"]) == 2
    assert any("broken.nii.gz" in s and "not a readable image" in s for s in summary["skipped"])
    assert any("zz_mask.nii.gz" in s and "looks like a label map" in s for s in summary["skipped"])
    assert summary["spacing_mm"] == {"min": [1.5, 1.5, 1.5], "max": [1.5, 1.5, 1.5]}
    assert summary["shape"] == {"min": [44, 42, 38], "max": [44, 42, 38]}
    p1, p50, p99 = summary["hu_percentiles"].values()
    assert p1 == -996 and p1 <= p50 < p99 and 300 < p99 <= 404  # air at -1000, tissue -300..399: 8-HU bin centres
    assert summary["modalities"] == {"not recorded (NIfTI/NRRD/MHA)": 3}
    entries = sorted(cache.glob("*.b2nd"))
    assert len(entries) == 3 and summary["cache_bytes"] == sum(p.stat().st_size for p in entries)
    assert 0 < summary["cache_fraction_of_float32"] < 1
    text = " ".join(result.output.split())
    assert "dataset summary" in text and "scans │ 3" in text and "skipped │ 2" in text and "scans/s" in text
    assert sum("skipped:" in line for line in result.output.splitlines()) == 2  # each bad scan named once
    assert "Traceback" not in result.output


def test_pretrain_reads_the_prepared_cache_without_reading_scans(tmp_path, scans, monkeypatch):
    cache = tmp_path / "cache"
    assert prepare(scans, "--cache-dir", cache, "--workers", "0", *SMALL).exit_code == 0
    fail_on_read(monkeypatch)  # every valid entry is found by path, size and mtime alone
    result = CliRunner().invoke(
        app, ["pretrain", str(scans), "--out", str(tmp_path / "run"), "--steps", "1", "--cache-dir", str(cache), *TINY]
    )
    assert "3 volume(s) ready, 2 skipped" in " ".join(result.output.split()), result.output
    assert result.exit_code == 0, result.output


def test_shards_build_their_share_and_a_final_run_summarises_all(tmp_path, scans, monkeypatch):
    cache = tmp_path / "cache"
    for i in range(2):
        result = prepare(scans, "--cache-dir", cache, "--workers", "0", "--shard", f"{i}/2", *SMALL)
        assert result.exit_code == 0, result.output
    shards = [json.loads((cache / f"dataset.shard-{i}-of-2.json").read_text(encoding="utf-8")) for i in range(2)]
    assert [s["shard"] for s in shards] == ["0/2", "1/2"] and shards[0]["scans"] + shards[1]["scans"] == 3
    assert len(list(cache.glob("*.b2nd"))) == 3
    built = []
    monkeypatch.setattr(VolumeCache, "_preprocess", lambda self, s: built.append(s) or pytest.fail("rebuilt"))
    result = prepare(scans, "--cache-dir", cache, "--workers", "0", *SMALL)
    summary = json.loads((cache / "dataset.json").read_text(encoding="utf-8"))
    assert summary["scans"] == 3 and len(summary["skipped"]) == 2 and built == []  # found, nothing rebuilt
    assert result.exit_code == 0


@pytest.mark.parametrize("text", ["2/2", "a/b", "1", "-1/3"])
def test_a_bad_shard_is_a_usage_error(tmp_path, scans, text):
    result = prepare(scans, "--cache-dir", tmp_path / "cache", "--shard", text)
    assert result.exit_code == 2 and len(errors_in(result.output)) == 1 and "--shard" in result.output


def test_shards_split_every_nth():
    assert Shard.parse(" 1 / 3 ") == Shard(1, 3) and Shard(1, 3).select(list(range(8))) == [1, 4, 7]


def test_a_full_disk_stops_prepare_in_one_line_and_keeps_earlier_entries(tmp_path, scans, monkeypatch):
    real, calls = cache_module.write_bytes, []

    def fills_up(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(cache_module, "write_bytes", fills_up)
    cache = tmp_path / "cache"
    result = prepare(scans, "--cache-dir", cache, "--workers", "0", *SMALL)
    assert result.exit_code == 1, result.output
    (line,) = errors_in(result.output)
    assert "No space left on device" in line and str(cache) in line and "Traceback" not in result.output
    assert not (cache / "dataset.json").exists() and not list(cache.glob(".*"))  # no half-written file
    (first,) = find_volumes([scans / "scan0.nii.gz"])[0]
    monkeypatch.setattr(cache_module, "_VERIFIED", set())
    VolumeCache(PreprocessConfig(cache_dir=str(cache), crop=32)).load(first)  # intact: its CRC holds


def test_an_older_cache_is_rebuilt_and_said_once(tmp_path, scans):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = VolumeCache(PreprocessConfig(cache_dir=str(cache), crop=32))
    for s in find_volumes([scans])[0][:3]:
        key = cache_module.hashlib.sha256(f"{s.identity()}|{old.old_settings}".encode()).hexdigest()[:32]
        np.save(cache / f"{key}.npy", np.zeros((32, 32, 32), np.float32))
        (cache / f"{key}.json").write_text("{}", encoding="utf-8")
    result = prepare(scans, "--cache-dir", cache, "--workers", "0", *SMALL)
    assert result.exit_code == 0 and result.output.count(OLD_CACHE_NOTE) == 1, result.output
    assert not list(cache.glob("*.npy"))


def test_hu_percentiles_merge_the_scans_histograms():
    low = {"start": -1000, "bin": 8, "counts": [90, 0, 10]}  # -1000..-992 and -984..-976
    high = {"start": 400, "bin": 8, "counts": [100]}
    assert hu_percentiles([low, high]) == {"p1": -996.0, "p50": -980.0, "p99": 404.0}
    assert hu_percentiles([]) is None


def pair(root: Path, image: str, label: str, seed: int = 0) -> tuple[Path, Path]:
    """An image and its label (a bright block labelled 1) under names that do not match."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(0.0, 50.0, (40, 36, 34))
    mask = np.zeros(ct.shape, np.uint8)
    mask[10:25, 8:20, 9:21] = 1
    ct[mask == 1] += 400
    kw = {"spacing": ISO, "direction": IDENTITY}
    return write_volume(root / image, ct, **kw), write_volume(root / label, mask, dtype=np.uint8, **kw)


def test_explicit_files_pair_in_the_order_given(tmp_path):
    a = pair(tmp_path, "case2_image.nii.gz", "case2_label.nii.gz")
    b = pair(tmp_path, "other/scan.nii.gz", "other/seg_b.nii.gz", seed=1)
    (case,) = find_cases([a[0]], [a[1]])
    assert case.id == "case2_image" and case.image.files == (str(a[0]),) and case.label.files == (str(a[1]),)
    cases = find_cases([b[0], a[0]], [b[1], a[1]])
    assert [(c.image.files[0], c.label.files[0]) for c in cases] == [(str(b[0]), str(b[1])), (str(a[0]), str(a[1]))]
    with pytest.raises(InputError) as info:
        find_cases([a[0], b[0]], [a[1]])
    assert "2 image file(s) but 1 label file(s)" in str(info.value) and "counts must match" in str(info.value)
    with pytest.raises(InputError, match="pair by file name"):  # folders still pair by name
        find_cases([tmp_path / "other"], [a[1]])


def finetune(tmp_path: Path, *args) -> object:
    options = ["--from-scratch", "--model", "tiny", "--crop", "32", "--feature-size", "8", "--batch-size", "1"]
    options += ["--crops-per-volume", "1", "--device", "cpu", "--steps", "1", "--val-every", "1"]
    return CliRunner().invoke(app, ["finetune-seg", *options, *map(str, args)])


@pytest.mark.slow
def test_finetune_seg_pairs_named_files_and_preprocesses_once(tmp_path, monkeypatch):
    image, label = pair(tmp_path, "case2_image.nii.gz", "case2_label.nii.gz")
    common = ["--images", image, "--labels", label, "--cache-dir", tmp_path / "cache"]
    first = finetune(tmp_path, *common, "--out", tmp_path / "run1")
    assert first.exit_code == 0, first.output
    assert len(list((tmp_path / "cache").glob("*.b2nd"))) == 2  # the image's entry and the label's
    built = []
    monkeypatch.setattr(VolumeCache, "_preprocess", lambda self, s: built.append(s) or pytest.fail("rebuilt"))
    monkeypatch.setattr(cache_module, "_label_on_grid", lambda *a: built.append(a) or pytest.fail("rebuilt"))
    second = finetune(tmp_path, *common, "--out", tmp_path / "run2")
    assert second.exit_code == 0, second.output
    assert built == []  # the second run over the same cases preprocessed nothing


@pytest.mark.parametrize(
    "values, option, words",
    [(0.5, [], "label values must be class indices"), (3, ["--num-classes", "3"], "holds class 3, but --num-classes")],
    ids=["not-integer", "too-many-classes"],
)
def test_a_bad_label_is_named_in_one_line(tmp_path, values, option, words):
    image, label = pair(tmp_path, "a.nii.gz", "a_seg.nii.gz")
    mask = np.zeros((40, 36, 34), np.float32)
    mask[10:25, 8:20, 9:21] = values
    write_volume(label, mask, spacing=ISO, direction=IDENTITY, dtype=np.float32)
    result = finetune(tmp_path, "--images", image, "--labels", label, "--out", tmp_path / "run", *option)
    assert result.exit_code == 1, result.output
    (line,) = errors_in(result.output)
    assert str(label) in line and words in line


def test_cache_cases_items_are_what_train_reads(tmp_path):
    image, label = pair(tmp_path, "a.nii.gz", "b.nii.gz")
    cases = find_cases([image], [label])
    cached = cache_cases(cases, PreprocessConfig(spacing=ISO, crop=32, cache_dir=str(tmp_path / "cache")))
    assert len(cached) == 1
    item = cached[0]
    for key in ("image", "label"):
        assert item[key].dtype == np.float32 or str(item[key].dtype) == "torch.float32"
        assert item[key].shape[0] == 1 and item[key].ndim == 4
    assert set(np.unique(item["label"].numpy())) == {0.0, 1.0}


def test_a_single_worker_takes_the_cores_for_simpleitk_and_keeps_torch_at_one_thread(tmp_path, monkeypatch):
    """Workers share the cores for SimpleITK's resampling; torch stays at the one thread DataLoader gives a worker
    (an OpenMP team inherited through fork can hang the first parallel region that uses more)."""
    scans = write_body_scans(tmp_path / "scans", 2)
    seen = tmp_path / "threads.txt"
    real = VolumeCache._preprocess

    def spy(self, source):
        with open(seen, "a") as f:
            f.write(f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} {torch.get_num_threads()}\n")
        return real(self, source)

    monkeypatch.setattr(VolumeCache, "_preprocess", spy)
    sources = find_volumes([scans])[0]
    built = [b for _, b in build_entries(sources, PreprocessConfig(cache_dir=str(tmp_path / "c"), crop=32), workers=1)]
    assert all(b.meta for b in built)
    cores = len(os.sched_getaffinity(0))
    assert seen.read_text().split("\n")[:2] == [f"{cores} 1", f"{cores} 1"]
