"""Helpers and fixtures that write small real volumes to disk: any SimpleITK format, and DICOM series.

Import the helpers as plain functions: `from conftest import write_volume, write_dicom_series`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from ctmae.io.dicom_writer import deterministic_uid, write_series

# A right-handed oblique direction (rotations of 0.4 rad about z, then 0.3 rad about x), LPS, row-major 3x3.
OBLIQUE = tuple(
    (
        np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]])
        @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    ).ravel()
)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-12.5, 30.25, 7.0)


def _image_from_xyz(array_xyz: np.ndarray, spacing, origin, direction, dtype) -> sitk.Image:
    """A SimpleITK image from an (X, Y, Z) array; SimpleITK's own arrays are (Z, Y, X)."""
    image = sitk.GetImageFromArray(np.asarray(array_xyz, dtype=dtype).transpose(2, 1, 0))  # (X, Y, Z) -> (Z, Y, X)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


def expected_affine(spacing=SPACING, origin=ORIGIN, direction=OBLIQUE) -> np.ndarray:
    """The RAS affine ctmae should report for a volume written with this LPS geometry."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def write_volume(
    path: str | os.PathLike,
    array_xyz: np.ndarray,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    direction: Sequence[float] = OBLIQUE,
    dtype: np.dtype | type = np.int16,
) -> Path:
    """Write an (X, Y, Z) array in the format its extension names (.nii.gz, .nrrd, .mha, ...), LPS geometry.

    Args:
        path: the file to write; parent folders are created.
        array_xyz: voxel values, (X, Y, Z).
        spacing: mm per voxel along X, Y, Z.
        origin: LPS position of voxel (0, 0, 0).
        direction: 3x3 LPS direction cosines, row-major, as SimpleITK's SetDirection takes them.
        dtype: the stored voxel type.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image_from_xyz(array_xyz, spacing, origin, direction, dtype), str(path))
    return path


def write_dicom_series(
    folder: str | os.PathLike,
    array_xyz: np.ndarray,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    direction: Sequence[float] = OBLIQUE,
    series_uid: str | None = None,
    patient_name: str = "Anon^Test",
    patient_id: str = "ANON",
    modality: str = "CT",
    skip_slices: Sequence[int] = (),
) -> list[Path]:
    """Write an (X, Y, Z) array as an int16 CT DICOM series, one `slice_NNNN.dcm` per Z slice.

    Args:
        folder: where the files go (created if missing).
        array_xyz: voxel values in HU, (X, Y, Z).
        spacing, origin, direction: LPS geometry, as for `write_volume`; keep direction right-handed so the series
            reads back in the same slice order.
        series_uid: SeriesInstanceUID; derived from `folder`'s name when None.
        patient_name, patient_id, modality: written as given.
        skip_slices: slice indices not written (to make a series with a missing slice).

    Returns:
        The files written, in slice order.
    """
    image = _image_from_xyz(array_xyz, spacing, origin, direction, np.int16)
    uid = series_uid or deterministic_uid(f"series:{Path(folder).name}")
    return write_series(image, folder, uid, patient_name, patient_id, modality, "ctmae test series", skip_slices)


@pytest.fixture
def ct_array() -> np.ndarray:
    """A small (X, Y, Z) = (20, 18, 12) int16 volume of distinct HU-like values, so any axis mix-up shows."""
    rng = np.random.default_rng(0)
    return rng.integers(-1024, 2000, size=(20, 18, 12)).astype(np.int16)


def write_body_scans(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` small synthetic CT-like volumes (a block of tissue in air, 1.5 mm voxels) as NIfTI in `folder`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        a = np.full((44, 42, 38), -1000, np.int16)
        a[5:39, 4:38, 4:34] = rng.integers(-300, 400, (34, 34, 30))
        write_volume(folder / f"scan{i}.nii.gz", a, spacing=(1.5, 1.5, 1.5))
    return folder


def organ_map(shape=(48, 48, 40), classes: int = 117, seed: int = 0) -> np.ndarray:
    """A TotalSegmentator-like (X, Y, Z) uint8 label map: an ellipsoid "body" cut into ``classes`` organs (the
    nearest of ``classes`` seeded points, one per class, so every class is present), background 0 around it."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)  # (X, Y, Z, 3)
    centre, radii = (np.asarray(shape) - 1) / 2, np.asarray(shape) * 0.47
    body = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    inside = np.argwhere(body)
    seeds = inside[rng.choice(len(inside), classes, replace=False)]  # (classes, 3)
    nearest = np.zeros(shape, np.int64)
    best = np.full(shape, np.inf)
    for c, point in enumerate(seeds, start=1):
        distance = ((grid - point) ** 2).sum(-1)
        closer = distance < best
        nearest[closer], best[closer] = c, distance[closer]
    return np.where(body, nearest, 0).astype(np.uint8)


def organ_ct(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """An int16 HU scan for a label map: air (-1000) outside, each class its own tissue HU plus noise."""
    rng = np.random.default_rng(seed)
    tissue = rng.integers(-100, 300, 256)
    tissue[0] = -1000
    return (tissue[label] + rng.normal(0.0, 15.0, label.shape)).astype(np.int16)


SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny MAE (64³ crops, 16³ patches, block masking) trained for a few CPU steps on the sample scan."""
    from ctmae.io.discovery import find_volumes
    from ctmae.mae.config import RunConfig
    from ctmae.mae.train import pretrain
    from ctmae.preprocess.build_cache import build_cache

    root = tmp_path_factory.mktemp("tiny_mae")
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny"},
            "preprocess": {"crop": 64, "cache_dir": str(root / "cache")},
            "data": {"workers": 0},
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1},
        }
    )
    sources, _ = find_volumes([str(SAMPLE_DATA / "ct")])
    good, problems = build_cache(sources, cfg.preprocess)
    assert good and not problems, problems
    pretrain(cfg, good, root / "run")
    return root / "run" / "checkpoints" / "last.pt"


@pytest.fixture(autouse=True)
def _restore_threads():
    """Commands apply their CPU budget to this process (torch, SimpleITK): each test starts from the defaults."""
    import torch

    from ctmae.runtime import cpu

    threads, sitk_threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_threads)
    cpu._IN_FORCE.clear()


class Heard:
    """A reporter for the API functions (``ctmae.api.common.Reporter``) that keeps what it hears, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, what: str, total: int | None, done: int = 0) -> None:
        self.events.append(("start", what, total, *([done] if done else [])))

    def progress(self, done: int, status: str = "") -> None:
        self.events.append(("progress", done, status))

    def say(self, line: str) -> None:
        self.events.append(("say", line))

    def note(self, line: str) -> None:
        self.events.append(("note", line))

    def advance(self, line: str = "") -> None:
        self.events.append(("advance", line))

    def windows(self, done: int, total: int) -> None:
        self.events.append(("windows", done, total))

    def warn(self, line: str) -> None:
        self.events.append(("warn", line))

    def skipped(self, lines) -> None:
        self.events.append(("skipped", tuple(lines)))


def stopped_by_sigterm(monkeypatch, hook: str, at: int, invoke: Callable[[], Any]) -> Any:
    """``invoke()`` with SIGTERM sent to this process once the CLI's progress reporter's ``hook`` (``progress``,
    ``windows``) hears ``at`` units done: a cluster's stop in mid-phase. The command's own handler catches it; around
    the call a no-op handler keeps a signal that arrives outside the command from ending pytest."""
    from ctmae.cli.common import ProgressReporter

    show = getattr(ProgressReporter, hook)

    def stopping(self, done: int, *args, **kwargs) -> None:
        show(self, done, *args, **kwargs)
        if done == at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ProgressReporter, hook, stopping)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        return invoke()
    finally:
        signal.signal(signal.SIGTERM, previous)


def assert_stopped_writing_nothing(result, out: Path) -> None:
    """A command stopped by SIGTERM before its outputs: exit 0, the line saying so, and no ``out`` folder."""
    assert result.exit_code == 0, result.output
    assert f"stopped early: stop signal (SIGTERM); nothing written to {out}/" in " ".join(result.output.split())
    assert not out.exists()
