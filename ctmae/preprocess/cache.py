"""The on-disk cache of preprocessed volumes, built in parallel workers, read back memory-mapped.

The deterministic part of the preprocessing (``ctmae.preprocess.transforms``) runs once per volume and is cached as
an uncompressed float32 ``.npy``. The cache computes what ``preprocess_transforms`` gives with SimpleITK doing the
resampling, several times faster (the cache test checks that they agree).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.transforms import SpatialCrop, SpatialPadd
from monai.transforms.utils import generate_spatial_bounding_box
from torch.utils.data import DataLoader, Dataset

from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.io.labels import refuse_label_map
from ctmae.io.volume import CTReader
from ctmae.mae.config import DataConfig
from ctmae.preprocess.resample import resample_to_grid
from ctmae.preprocess.transforms import body_threshold, ras_grid
from ctmae.runtime.files import atomic_path, atomic_write_text
from ctmae.runtime.signals import iterate_workers

CACHE_VERSION = 1  # bump when the preprocessing code changes what it produces


class VolumeCache:
    """Preprocessed volumes on disk, one ``<key>.npy`` + ``<key>.json`` pair per (file identity, settings).

    Files are written to a temporary name in the cache folder and renamed, so a reader never sees half a file. The
    ``.json`` is renamed last: it marks the entry complete and records the ``.npy``'s size and CRC-32. The size is
    checked at every read and the checksum once per process and entry; a truncated or corrupted entry is rebuilt.
    """

    def __init__(self, cfg: DataConfig, min_edge: int = 1) -> None:
        self.dir = Path(cfg.cache_dir)
        self.reader = CTReader()
        self.grid = ras_grid(["image"], cfg, lazy=True)
        self.window = cfg.hu_window
        self.body = body_threshold(cfg)
        self.pad = SpatialPadd("image", spatial_size=(cfg.crop,) * 3, value=0.0)
        self.min_edge = min_edge
        settings = dict(v=CACHE_VERSION, spacing=cfg.spacing, window=cfg.hu_window, crop=cfg.crop)
        self.settings = json.dumps(settings, sort_keys=True)
        self._verified: set[str] = set()

    def key(self, source: VolumeSource) -> str:
        return hashlib.sha256(f"{source.identity()}|{self.settings}".encode()).hexdigest()[:32]

    def ensure(self, source: VolumeSource) -> Path:
        """Preprocess ``source`` unless validly cached; returns the ``.npy`` path. Raises InputError if unusable."""
        npy = self.dir / f"{self.key(source)}.npy"
        if self._valid(npy):
            return npy
        image = self._preprocess(source)
        self.dir.mkdir(parents=True, exist_ok=True)
        # (1, X, Y, Z) -> (X, Y, Z) in Fortran order, SimpleITK's own layout: a block copy of the body box, no transpose
        array = np.asfortranarray(image.numpy()[0])
        with atomic_path(npy) as tmp:  # no fsync: every read checks the size (and once per process the CRC-32)
            np.save(tmp, array)
        size = npy.stat().st_size
        with open(npy, "rb") as f:
            header = f.read(size - array.nbytes)
        meta = {
            "affine": image.affine.tolist(),
            "shape": list(array.shape),
            "bytes": size,
            "crc32": zlib.crc32(memoryview(array.T).cast("B"), zlib.crc32(header)),  # the file's bytes, from memory
        }
        atomic_write_text(npy.with_suffix(".json"), json.dumps(meta))
        self._verified.add(npy.name)
        return npy

    def load(self, source: VolumeSource) -> np.ndarray:
        """The preprocessed volume (X, Y, Z) float32, memory-mapped; built first if missing or damaged."""
        return np.load(self.ensure(source), mmap_mode="r")

    def _preprocess(self, source: VolumeSource):
        """What ``preprocess_transforms(cfg)`` gives, built faster (the cache test checks that they agree).

        SimpleITK resamples onto the grid MONAI's Orientationd → Spacingd plan (``ctmae.preprocess.resample``); the HU window is
        ScaleIntensityRanged's formula applied in place (its out-of-place passes take 5x longer); the body's box
        comes from MONAI's ``generate_spatial_bounding_box`` on a NumPy view (10x faster than on a torch tensor).
        """
        image = self.reader.read(list(source.files))
        refuse_label_map(image, source.label)  # a segmentation among the scans is not trained on as CT
        lo, hi = self.window
        try:
            # only the box that can hold body voxels; 1 HU below the threshold covers float rounding
            image = resample_to_grid(image, self.grid, above=lo + self.body * (hi - lo) - 1.0)  # (1, X, Y, Z) HU
        except RuntimeError as e:
            raise InputError(f"{source.label}: could not preprocess: {str(e).splitlines()[0]}") from None
        image.as_tensor().sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
        start, end = generate_spatial_bounding_box(image.numpy(), lambda v: v > self.body)
        image = SpatialCrop(roi_start=start, roi_end=end)(image)
        if min(image.shape[1:]) < self.min_edge:
            shape = "x".join(str(n) for n in image.shape[1:])
            raise InputError(
                f"{source.label}: body region is {shape} voxels after resampling, smaller than one "
                f"{self.min_edge}³ patch"
            )
        return self.pad({"image": image})["image"]

    def _valid(self, npy: Path) -> bool:
        """True for a complete, undamaged entry; a damaged one is removed so that it is rebuilt."""
        sidecar = npy.with_suffix(".json")
        if not sidecar.is_file():
            return False
        try:
            meta = json.loads(sidecar.read_text())
            ok = npy.stat().st_size == meta["bytes"] and (npy.name in self._verified or _crc32(npy) == meta["crc32"])
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            self._verified.add(npy.name)
        else:
            sidecar.unlink(missing_ok=True)
            npy.unlink(missing_ok=True)
        return ok


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class _Prepare(Dataset):
    """Builds cache entries in DataLoader workers; an item is None on success or the one-line problem."""

    def __init__(self, sources: Sequence[VolumeSource], cache: VolumeCache) -> None:
        self.sources, self.cache = sources, cache

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> str | None:
        try:
            self.cache.ensure(self.sources[i])
        except InputError as e:
            return str(e)
        return None


def prepare_cache(
    sources: Sequence[VolumeSource], cfg: DataConfig, on_volume=None, min_edge: int = 1
) -> tuple[list[VolumeSource], list[str]]:
    """Preprocess every volume into the cache (in parallel workers); returns (usable sources, problems).

    Args:
        sources: volumes from ``ctmae.io.discovery.find_volumes``.
        cfg: preprocessing settings and cache folder.
        on_volume: optional callback called once per finished volume (progress).
        min_edge: refuse volumes whose body region is smaller than this many voxels along an axis (one patch).
    """
    cache = VolumeCache(cfg, min_edge)
    loader = DataLoader(_Prepare(sources, cache), batch_size=None, num_workers=min(cfg.workers, len(sources)))
    good, problems = [], []
    for source, problem in zip(sources, iterate_workers(loader)):
        (problems.append(problem) if problem else good.append(source))
        if on_volume:
            on_volume()
    return good, problems
