"""Preprocessing (MONAI dictionary transforms), the on-disk volume cache, and the seeded stream of training crops.

The deterministic part — load, orientation to RAS, resampling, HU window, foreground crop, padding to the crop
size — runs once per volume and is cached as an uncompressed float32 ``.npy`` (read back memory-mapped). The cache
computes what ``preprocess_transforms`` gives with SimpleITK doing the resampling, several times faster. Random
crops are drawn from the cache: volume visit ``v`` of the endless schedule is epoch ``v // V``, slot ``v % V`` of
that epoch's seeded permutation, and its crops come from a generator seeded by ``(seed, v)``. Any step's data is
thus a pure function of the seed, which makes ``--resume`` exact without saving loader state.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
)
from monai.transforms.utils import generate_spatial_bounding_box
from torch.utils.data import DataLoader, Dataset

from ctmae.config import DataConfig
from ctmae.inputs import VolumeSource
from ctmae.io import CTReader, InputError
from ctmae.resample import resample_to_grid

CACHE_VERSION = 1  # bump when the preprocessing code changes what it produces
BODY_HU = -500.0  # voxels above this HU count as foreground (body) for the foreground crop


class LoadCTd(MapTransform):
    """Load volumes with ``CTReader`` alone, as MetaTensors carrying the RAS affine.

    Not ``LoadImaged``: MONAI's LoadImage registers every installed reader and falls back to them when the designated
    one refuses a file, which would let NaN-filled or truncated volumes through (and some readers warn at creation).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys)
        self.reader = CTReader()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array, meta = self.reader.get_data(self.reader.read(d[key]))
            d[key] = MetaTensor(torch.from_numpy(array), meta=meta)  # meta["affine"] becomes .affine
        return d


def preprocess_transforms(cfg: DataConfig, label: bool = False, pad: bool = True) -> Compose:
    """The deterministic chain: {"image": files} -> {"image": MetaTensor (1, X, Y, Z) float32 in 0..1, RAS}.

    With ``label``, a "label" key (a label volume on the image's grid) follows every spatial step with
    nearest-neighbour resampling, so image and label stay aligned. Every step is invertible (``Compose.inverse``),
    which brings results back to the source geometry. ``pad=False`` leaves out the final padding to the crop size.
    """
    lo, hi = cfg.hu_window
    keys = ["image", "label"] if label else ["image"]
    return Compose(
        [
            LoadCTd(keys),
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            *_ras_grid(keys, cfg),
            ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys, source_key="image", select_fn=functools.partial(torch.gt, other=_body(cfg))),
            *([SpatialPadd(keys, spatial_size=(cfg.crop,) * 3, value=0.0)] if pad else []),
        ]
    )


def _ras_grid(keys: list[str], cfg: DataConfig, lazy: bool = False) -> list[MapTransform]:
    """Orientation to RAS, then resampling to ``cfg.spacing`` (bilinear for the image, nearest for a label)."""
    return [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=lazy),
        Spacingd(keys, pixdim=cfg.spacing, mode=["bilinear", "nearest"][: len(keys)], dtype=torch.float32, lazy=lazy),
    ]


def _body(cfg: DataConfig) -> float:
    """The foreground (body) threshold ``BODY_HU`` in HU-window units (0..1)."""
    lo, hi = cfg.hu_window
    return min(max((BODY_HU - lo) / (hi - lo), 0.0), 0.99)


class VolumeCache:
    """Preprocessed volumes on disk, one ``<key>.npy`` + ``<key>.json`` pair per (file identity, settings).

    Files are written to a temporary name in the cache folder and renamed, so a reader never sees half a file. The
    ``.json`` is renamed last: it marks the entry complete and records the ``.npy``'s size and CRC-32. The size is
    checked at every read and the checksum once per process and entry; a truncated or corrupted entry is rebuilt.
    """

    def __init__(self, cfg: DataConfig, min_edge: int = 1) -> None:
        self.dir = Path(cfg.cache_dir)
        self.reader = CTReader()
        self.grid = _ras_grid(["image"], cfg, lazy=True)
        self.window = cfg.hu_window
        self.body = _body(cfg)
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
        _atomic_write(npy, lambda f: np.save(f, array))
        size = npy.stat().st_size
        with open(npy, "rb") as f:
            header = f.read(size - array.nbytes)
        meta = {
            "affine": image.affine.tolist(),
            "shape": list(array.shape),
            "bytes": size,
            "crc32": zlib.crc32(memoryview(array.T).cast("B"), zlib.crc32(header)),  # the file's bytes, from memory
        }
        _atomic_write(npy.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
        self._verified.add(npy.name)
        return npy

    def load(self, source: VolumeSource) -> np.ndarray:
        """The preprocessed volume (X, Y, Z) float32, memory-mapped; built first if missing or damaged."""
        return np.load(self.ensure(source), mmap_mode="r")

    def _preprocess(self, source: VolumeSource):
        """What ``preprocess_transforms(cfg)`` gives, built faster (the cache test checks that they agree).

        SimpleITK resamples onto the grid MONAI's Orientationd → Spacingd plan (``ctmae.resample``); the HU window is
        ScaleIntensityRanged's formula applied in place (its out-of-place passes take 5x longer); the body's box
        comes from MONAI's ``generate_spatial_bounding_box`` on a NumPy view (10x faster than on a torch tensor).
        """
        image = self.reader.read(list(source.files))
        lo, hi = self.window
        try:
            # only the box that can hold body voxels; 1 HU below the threshold covers float rounding
            image = resample_to_grid(image, self.grid, above=lo + self.body * (hi - lo) - 1.0)  # (1, X, Y, Z) HU
        except RuntimeError as e:
            raise InputError(f"{source.files[0]}: could not preprocess: {str(e).splitlines()[0]}") from None
        image.as_tensor().sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
        start, end = generate_spatial_bounding_box(image.numpy(), lambda v: v > self.body)
        image = SpatialCrop(roi_start=start, roi_end=end)(image)
        if min(image.shape[1:]) < self.min_edge:
            shape = "x".join(str(n) for n in image.shape[1:])
            raise InputError(
                f"{source.files[0]}: body region is {shape} voxels after resampling, smaller than one "
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


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary name, then rename. No fsync: every read checks the size (and once per process the
    CRC-32), so an entry that a crash left incomplete is rebuilt, never used."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        sources: volumes from ``ctmae.inputs.find_volumes``.
        cfg: preprocessing settings and cache folder.
        on_volume: optional callback called once per finished volume (progress).
        min_edge: refuse volumes whose body region is smaller than this many voxels along an axis (one patch).
    """
    cache = VolumeCache(cfg, min_edge)
    loader = DataLoader(_Prepare(sources, cache), batch_size=None, num_workers=min(cfg.workers, len(sources)))
    good, problems = [], []
    for source, problem in zip(sources, loader):
        (problems.append(problem) if problem else good.append(source))
        if on_volume:
            on_volume()
    return good, problems


class CropVisits(Dataset):
    """Item ``v`` is visit ``v`` of the seeded schedule: ``crops_per_volume`` random crops (N, 1, c, c, c).

    Crops are cut straight from the memory-mapped cache, so a visit reads only the crops' bytes, not the volume
    (MONAI's RandSpatialCropSamplesd would first load the whole array). Offsets are uniform over the valid range.
    """

    def __init__(
        self, sources: Sequence[VolumeSource], cfg: DataConfig, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.sources, self.cfg, self.seed, self.rank, self.world = list(sources), cfg, seed, rank, world
        self.cache = VolumeCache(cfg)

    def source_of(self, visit: int) -> VolumeSource:
        """The volume of global visit ``visit``: slot ``visit % V`` of epoch ``visit // V``'s seeded permutation."""
        epoch, slot = divmod(visit, len(self.sources))
        order = torch.randperm(len(self.sources), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self.sources[int(order[slot])]

    def __len__(self) -> int:
        return 2**62  # endless; the sampler decides which visits are read

    def __getitem__(self, local_visit: int) -> torch.Tensor:
        visit = local_visit * self.world + self.rank
        volume = self.cache.load(self.source_of(visit))  # (X, Y, Z) memmap, each edge >= crop
        rng = np.random.default_rng([self.seed, visit])
        c = self.cfg.crop
        crops = []
        for _ in range(self.cfg.crops_per_volume):
            x, y, z = (int(rng.integers(0, n - c + 1)) for n in volume.shape)
            crops.append(np.array(volume[x : x + c, y : y + c, z : z + c]))  # reads only this crop
        return torch.from_numpy(np.stack(crops))[:, None]  # (N, c, c, c) -> (N, 1, c, c, c)


def crop_batches(
    sources: Sequence[VolumeSource],
    cfg: DataConfig,
    seed: int,
    batch_size: int,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[torch.Tensor]:
    """Endless batches (B, 1, c, c, c) of crops, continuing exactly where step ``start_step`` would be.

    Under ``world`` processes, rank ``r`` reads visits r, r + world, r + 2·world, ...: disjoint volumes in each
    epoch. When ``crops_per_volume`` equals the per-rank batch, the global batch of a step holds the same crops
    as a single process with ``world`` times the batch.
    """
    n = cfg.crops_per_volume
    first_visit, skip = divmod(start_step * batch_size, n)
    visits = CropVisits(sources, cfg, seed, rank, world)
    loader = DataLoader(
        visits,
        batch_size=None,
        sampler=itertools.count(first_visit),  # endless: visit indices from here on
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    pending: list[torch.Tensor] = []
    have = 0
    for crops in loader:
        if skip:
            crops, skip = crops[skip:], 0
        pending.append(crops)
        have += len(crops)
        while have >= batch_size:
            stacked = torch.cat(pending)
            yield stacked[:batch_size]
            pending, have = [stacked[batch_size:]], have - batch_size
