"""The on-disk cache of preprocessed volumes: int16 HU in chunked, compressed blosc2 arrays, read crop by crop.

The deterministic part of the preprocessing (``ctmae.preprocess.transforms``) runs once per volume. The cache
computes what ``preprocess_transforms`` gives with SimpleITK doing the resampling, several times faster (the cache
test checks that they agree).

Format (``CACHE_VERSION`` 2): one entry per (scan identity, settings), ``<key>.b2nd`` holding the array and
``<key>.json`` describing it.

- An image is stored as int16 in 1-HU steps of the HU window (lo, hi): value = round(HU) clipped to the window
  (in general round(lo + x·(hi − lo)) of the windowed value x in 0..1, which is the same for a window with integer
  ends). Crops are read as float32 (v − lo) / (hi − lo) in 0..1, within half a HU step, 0.5 / (hi − lo), of
  ``preprocess_transforms``' output (2.5e-4 for the default 2000-HU window).
- A label (finetune-seg) is stored as uint8 class indices on its image's grid: resampled by nearest neighbour onto
  the image's body box, padded with 0 where the image is padded.
- Arrays are (X, Y, Z) in C order (z varies fastest, which compresses best on CT), in blosc2 chunks of 64³ voxels
  made of 16³ blocks, LZ4HC-compressed after bit-shuffling: a crop decompresses only the blocks it touches. On
  ``sample_data``'s scan that is 0.247 of the float32 ``.npy`` a previous version stored (ZSTD: 0.23, but crops read
  3x slower; byte shuffling: 0.257).

Files are written under a temporary name and renamed, so a reader never sees half a file; the ``.json`` is renamed
last: it marks the entry complete and records the array file's size and CRC-32. Entries are byte-for-byte
deterministic (one blosc2 thread: with several, chunks land in the frame in the order threads finish), so two
processes building one entry at once write the same bytes, and whichever renames land last leave a whole entry.
The size is checked at every read, the CRC once per process and entry (an entry verified or built by this process,
or by ``build_cache``'s workers for it, stays verified in DataLoader workers forked afterwards). A damaged entry is
removed and rebuilt. The sidecar also keeps facts about the scan (spacing, shape, modality, an HU histogram) that
``ctmae prepare`` summarises without reading the scan again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blosc2
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialCrop, SpatialPadd
from monai.transforms.utils import generate_spatial_bounding_box

from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.io.labels import class_counts, refuse_label_map
from ctmae.io.volume import CTReader, itk_grid
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.resample import resample_to_grid
from ctmae.preprocess.transforms import ras_grid
from ctmae.runtime.files import atomic_path, atomic_write_text

CACHE_VERSION = 2  # bump when the preprocessing code or the format changes what an entry holds
# DICOM series entries only: bumped when the reading of a series changes what an entry holds (2: a gantry-tilted
# series resampled where its slices lie); the previous revision's entry of a series is removed when it is rebuilt
SERIES_READING = 2
CHUNKS = (64, 64, 64)  # (X, Y, Z) voxels per chunk
BLOCKS = (16, 16, 16)  # voxels per block, the unit a crop decompresses
# One blosc2 thread everywhere: its thread pools do not survive fork (a DataLoader worker or a process forked while
# they were live can hang), and the parallelism is in the worker processes.
CPARAMS = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE], "nthreads": 1}
DPARAMS = {"nthreads": 1}
HU_BIN = 8  # HU per bin of the histogram kept in each image's sidecar
HU_RANGE = (-4096, 8192)  # histogram range; values outside count in the first/last bin
HU_SAMPLE = 1 << 20  # about this many voxels (a strided subsample) go into the histogram
OLD_CACHE_NOTE = "cache written by an older ctmae: rebuilding"

# (path, mtime_ns, crc32) of entries whose CRC this process checked or wrote; forked workers inherit it.
_VERIFIED: set[tuple[str, int, int]] = set()


def encode(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Windowed values (X, Y, Z) float in 0..1 -> int16 HU codes (X, Y, Z), C order: round(lo + x·(hi - lo))."""
    lo, hi = window
    hu = values * np.float32(hi - lo) + np.float32(lo)  # float32, in the memory order of values
    np.rint(hu, out=hu)
    np.clip(hu, math.ceil(lo), math.floor(hi), out=hu)
    return np.ascontiguousarray(hu, dtype=np.int16)


def decode(codes: np.ndarray, window: tuple[float, float], out: np.ndarray | None = None) -> np.ndarray:
    """int16 HU codes -> float32 (v - lo) / (hi - lo), the windowed 0..1 values, into ``out`` if given.

    Multiplies by the reciprocal of (hi - lo), which is faster than dividing and differs by at most one float32 ulp.
    """
    lo, hi = window
    out = np.empty(codes.shape, np.float32) if out is None else out
    np.subtract(codes, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
    np.multiply(out, np.float32(1.0 / (hi - lo)), out=out)
    return out


class CachedVolume:
    """A cached image, (X, Y, Z), sliced like an array: ``volume[x:x+c, y:y+c, z:z+c]`` decompresses only the blocks
    that box touches and returns float32 0..1 (X, Y, Z)."""

    def __init__(self, array: blosc2.NDArray, window: tuple[float, float]) -> None:
        self.array, self.window = array, window  # array: (X, Y, Z) int16 HU codes
        self.shape = tuple(int(n) for n in array.shape)
        self._codes = np.empty(0, np.int16)  # reused between reads of one size: no fresh pages to fault in

    def __getitem__(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        bounds = [s.indices(n) for s, n in zip(box, self.shape)]
        if len(bounds) != 3 or any(step != 1 for _, _, step in bounds):
            raise IndexError("a CachedVolume is sliced by three unit-step slices (x, y, z)")
        return self.read([a for a, _, _ in bounds], [max(0, b - a) for a, b, _ in bounds])

    def read(self, start: Sequence[int], size: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """The box of ``size`` (X, Y, Z) voxels at ``start`` as float32 0..1, written into ``out`` if given."""
        stop = [a + n for a, n in zip(start, size)]
        if self._codes.shape != tuple(size):
            self._codes = np.empty(size, np.int16)
        self.array.get_slice_numpy(self._codes, (list(start), stop))  # decompresses only the blocks the box touches
        return decode(self._codes, self.window, out)

    def numpy(self) -> np.ndarray:
        """The whole volume, float32 0..1 (X, Y, Z)."""
        return decode(self.array[...], self.window)


@dataclass
class Built:
    """What building (or finding) one entry gave: its sidecar, or why the scan is skipped."""

    meta: dict | None = None  # the entry's sidecar
    problem: str | None = None  # one line: the scan is unusable and skipped
    fatal: str | None = None  # one line: the cache could not be written (e.g. a full disk); the job stops
    stale: bool = False  # it replaced an entry written by an older ctmae
    path: str = ""  # the entry's array file


class VolumeCache:
    """Preprocessed volumes on disk, one ``<key>.b2nd`` + ``<key>.json`` pair per (file identity, settings).

    The key hashes the scan's files' path, size and mtime with the settings, so finding a valid entry reads no
    voxel of the scan. An unusable scan leaves ``<key>.problem``, its one-line reason, so that it is reported again
    without being read again. ``stale`` counts entries of an older ctmae this object replaced.
    """

    def __init__(self, cfg: PreprocessConfig, min_edge: int = 1) -> None:
        lo, hi = cfg.hu_window
        if not -32768 <= lo < hi <= 32767:
            raise ValueError(f"hu_window {cfg.hu_window}: the cache stores HU as int16; use a window in -32768..32767")
        self.dir = Path(cfg.cache_dir)
        self.reader = CTReader()
        self.grid = ras_grid(["image"], cfg, lazy=True)
        self.window = cfg.hu_window
        self.body = cfg.body_threshold
        self.pad = SpatialPadd(["image"], spatial_size=(cfg.crop,) * 3, value=0.0)
        self.min_edge = min_edge
        self.settings, self.old_settings = (
            json.dumps(dict(v=v, spacing=cfg.spacing, window=cfg.hu_window, crop=cfg.crop), sort_keys=True)
            for v in (CACHE_VERSION, 1)
        )
        self.stale = 0

    def key(self, source: VolumeSource, series_reading: int = SERIES_READING) -> str:
        reading = f"|series{series_reading}" if source.is_dicom and series_reading > 1 else ""
        return hashlib.sha256(f"{source.identity()}|{self.settings}{reading}".encode()).hexdigest()[:32]

    def label_key(self, source: VolumeSource, label: VolumeSource) -> str:
        """The key of ``label``'s entry on the grid of ``source``'s image entry."""
        return hashlib.sha256(f"{self.key(source)}|{label.identity()}|label".encode()).hexdigest()[:32]

    def path(self, source: VolumeSource) -> Path:
        return self.dir / f"{self.key(source)}.b2nd"

    def ensure(self, source: VolumeSource) -> Path:
        """Preprocess ``source`` unless validly cached; returns the ``.b2nd`` path. Raises InputError if unusable."""
        self.entry(source)
        return self.path(source)

    def entry(self, source: VolumeSource) -> dict:
        """The sidecar of ``source``'s entry, built first if missing or damaged.

        Raises:
            InputError: the scan is unusable (unreadable, a label map, a body region smaller than ``min_edge``).
            OutputError: the entry could not be written (e.g. a full disk); earlier entries are intact.
        """
        path = self.path(source)
        meta = self._valid(path)
        if meta is None:
            old = self.dir / f"{hashlib.sha256(f'{source.identity()}|{self.old_settings}'.encode()).hexdigest()[:32]}"
            known = path.with_suffix(".problem")  # an unusable scan (same files, same settings) is not read again
            if known.is_file():
                raise InputError(known.read_text(encoding="utf-8"))
            try:
                image, facts = self._preprocess(source)
            except InputError as e:
                atomic_write_text(known, str(e))
                raise
            padded = self.pad({"image": image})["image"]  # (1, X, Y, Z)
            pad = np.rint(np.linalg.solve(padded.affine.numpy(), image.affine.numpy()[:, 3])[:3]).astype(int)
            meta = {
                "affine": padded.affine.tolist(),
                "shape": list(padded.shape[1:]),  # (X, Y, Z)
                "body": list(image.shape[1:]),  # the body box before padding
                "pad": pad.tolist(),  # voxels of padding before the body box, along X, Y, Z
                "source": facts,
            }
            meta = self._write(path, encode(padded.numpy()[0], self.window), meta)
            replaced = [old.with_suffix(".npy")]  # an entry of the float32 .npy format (CACHE_VERSION 1)
            if source.is_dicom:  # the series as an older ctmae read it
                replaced.append((self.dir / self.key(source, SERIES_READING - 1)).with_suffix(".b2nd"))
            for array in (p for p in replaced if p.exists()):
                self.stale += 1
                array.unlink(missing_ok=True)
                array.with_suffix(".json").unlink(missing_ok=True)
        if min(meta["body"]) < self.min_edge:
            raise InputError(
                f"{source.label}: body region is {'x'.join(map(str, meta['body']))} voxels after resampling, smaller "
                f"than one {self.min_edge}³ patch"
            )
        return meta

    def load(self, source: VolumeSource) -> CachedVolume:
        """The preprocessed volume (X, Y, Z), read crop by crop; built first if missing or damaged."""
        return _open(self.ensure(source), self.window)

    def label_entry(self, source: VolumeSource, label: VolumeSource) -> tuple[Path, dict]:
        """(array path, sidecar) of ``label``'s entry on ``source``'s grid, built (with the image's) if missing.

        Raises:
            InputError: the scan or the label is unusable (a label with values that are not class indices 0..255).
        """
        path = self.dir / f"{self.label_key(source, label)}.b2nd"
        meta = self._valid(path)
        if meta is None:
            image = self.entry(source)
            codes, top = _label_on_grid(self.reader.read(list(label.files)), label.label, image)
            meta = self._write(path, codes, {"shape": image["shape"], "max_class": top})
        return path, meta

    def load_case(self, source: VolumeSource, label: VolumeSource) -> dict[str, MetaTensor]:
        """``{"image", "label"}``: MetaTensors (1, X, Y, Z) float32 with the grid's RAS affine, the image in 0..1 and
        the label holding class indices; what ``preprocess_transforms(cfg, label=True)`` gives (within half a HU
        step for the image). Builds the entries first if missing or damaged."""
        label_path, _ = self.label_entry(source, label)
        image = self.entry(source)
        affine = torch.tensor(image["affine"], dtype=torch.float64)
        volume = self.load(source).numpy()  # (X, Y, Z)
        labels = blosc2.open(str(label_path), mode="r", dparams=DPARAMS)[...].astype(np.float32)  # (X, Y, Z)
        return {
            key: MetaTensor(torch.from_numpy(array)[None], affine=affine, meta={"filename_or_obj": src.label})
            for key, array, src in (("image", volume, source), ("label", labels, label))
        }

    def trust(self, path: str | os.PathLike, meta: dict) -> None:
        """Count an entry checked or written by another process (a worker) as verified in this one."""
        _VERIFIED.add((os.fspath(path), os.stat(path).st_mtime_ns, meta["crc32"]))

    def _preprocess(self, source: VolumeSource) -> tuple[MetaTensor, dict]:
        """What ``preprocess_transforms(cfg)`` gives before its padding, built faster, and facts about the scan.

        SimpleITK resamples onto the grid MONAI's Orientationd → Spacingd plan (``ctmae.preprocess.resample``); the HU
        window is ScaleIntensityRanged's formula applied in place (its out-of-place passes take 5x longer); the body's
        box comes from MONAI's ``generate_spatial_bounding_box`` on a NumPy view (10x faster than on a torch tensor).

        Returns:
            (MetaTensor (1, X, Y, Z) float32 0..1 cropped to the body, the scan's facts for ``ctmae prepare``).
        """
        image = self.reader.read(list(source.files))
        refuse_label_map(image, source.label)  # a segmentation among the scans is not trained on as CT
        facts = {
            "spacing": list(image.GetSpacing()),
            "size": list(image.GetSize()),
            "modality": source.modality,
            "hu_histogram": hu_histogram(image),
        }
        lo, hi = self.window
        try:
            # only the box that can hold body voxels; 1 HU below the threshold covers float rounding
            image = resample_to_grid(image, self.grid, above=lo + self.body * (hi - lo) - 1.0)  # (1, X, Y, Z) HU
        except RuntimeError as e:
            raise InputError(f"{source.label}: could not preprocess: {str(e).splitlines()[0]}") from None
        image.as_tensor().sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
        start, end = generate_spatial_bounding_box(image.numpy(), lambda v: v > self.body)
        return SpatialCrop(roi_start=start, roi_end=end)(image), facts

    def _write(self, path: Path, codes: np.ndarray, meta: dict) -> dict:
        """Write ``codes`` (X, Y, Z) and then the sidecar ``meta`` plus size and CRC-32; returns the sidecar."""
        chunks = tuple(min(c, n) for c, n in zip(CHUNKS, codes.shape))
        blocks = tuple(min(b, c) for b, c in zip(BLOCKS, chunks))
        frame = blosc2.asarray(codes, chunks=chunks, blocks=blocks, cparams=CPARAMS).to_cframe()
        with atomic_path(path) as tmp:  # no fsync: every read checks the size (and once per process the CRC-32)
            write_bytes(tmp, frame)
        meta = {**meta, "bytes": len(frame), "crc32": zlib.crc32(frame)}
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta))
        self.trust(path, meta)
        return meta

    def _valid(self, path: Path) -> dict | None:
        """The sidecar of a complete, undamaged entry, else None; a damaged entry is removed so that it is rebuilt."""
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            return None
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            stat = path.stat()
            mark = (os.fspath(path), stat.st_mtime_ns, meta["crc32"])
            ok = stat.st_size == meta["bytes"] and (mark in _VERIFIED or _crc32(path) == meta["crc32"])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            _VERIFIED.add(mark)
            return meta
        sidecar.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return None


def _open(path: Path, window: tuple[float, float]) -> CachedVolume:
    """An image entry, memory-mapped, decompressed in the calling thread."""
    return CachedVolume(blosc2.open(str(path), mode="r", mmap_mode="r", dparams=DPARAMS), window)


def write_bytes(path: Path, data: bytes) -> None:
    """The one place entry bytes are written (tests make it fail as a full disk would)."""
    with open(path, "wb") as f:
        f.write(data)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def hu_histogram(image: sitk.Image) -> dict:
    """Counts of a strided subsample's values in ``HU_BIN``-wide bins: ``{"start": HU, "bin": HU, "counts": [...]}``
    from the first to the last non-empty bin (values outside ``HU_RANGE`` count in the edge bins)."""
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X), no copy
    step = max(1, round((array.size / HU_SAMPLE) ** (1 / 3)))
    sample = array[::step, ::step, ::step]
    lo, hi = HU_RANGE
    bins = np.clip(np.floor((sample.astype(np.float64) - lo) / HU_BIN), 0, (hi - lo) // HU_BIN - 1).astype(np.intp)
    counts = np.bincount(bins.ravel(), minlength=(hi - lo) // HU_BIN)
    used = np.flatnonzero(counts)
    first, last = (int(used[0]), int(used[-1])) if used.size else (0, -1)
    return {"start": lo + first * HU_BIN, "bin": HU_BIN, "counts": counts[first : last + 1].tolist()}


def _label_on_grid(label: sitk.Image, name: str, image: dict) -> tuple[np.ndarray, int]:
    """(uint8 codes (X, Y, Z) on the image entry's grid, largest class): nearest neighbour onto the body box, which
    is what Spacingd's nearest mode then CropForegroundd give, and 0 in the padding, as SpatialPadd gives."""
    top = int(np.flatnonzero(class_counts(label, name)).max(initial=0))  # checked: whole numbers 0..255
    shift = np.eye(4)
    shift[:3, 3] = image["pad"]
    origin, spacing, direction = itk_grid(np.asarray(image["affine"]) @ shift)  # the body box's grid
    on_box = sitk.Resample(
        label,
        [int(n) for n in image["body"]],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        origin,
        spacing,
        direction,
        0.0,
        sitk.sitkUInt8,
        True,  # nearest-neighbour extrapolation: Spacingd's border padding
    )
    codes = np.zeros(image["shape"], np.uint8)  # (X, Y, Z)
    (px, py, pz), (bx, by, bz) = image["pad"], image["body"]
    codes[px : px + bx, py : py + by, pz : pz + bz] = sitk.GetArrayViewFromImage(on_box).T  # (Z, Y, X) -> (X, Y, Z)
    return codes, top
