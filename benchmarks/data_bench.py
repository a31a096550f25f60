"""Data-path rows: the first pass that builds the cache, the cached crop stream, and the loader against the step.

The reference is MONAI's usual uncached chain on the same file, with ctmae's spacing and HU window:
LoadImaged → Orientationd → Spacingd → ScaleIntensityRanged (the deterministic part, compared with building the
cache) → RandSpatialCropSamplesd(num_samples=crops_per_volume) (compared with the cached crop stream).
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from monai.data import PydicomReader
from monai.transforms import Compose, LoadImaged, Orientationd, RandSpatialCropSamplesd, ScaleIntensityRanged, Spacingd

from benchmarks.common import Figure, Row, Target, interleaved, progress
from ctmae.io.discovery import VolumeSource
from ctmae.mae.config import RunConfig
from ctmae.mae.crops import crop_batches
from ctmae.preprocess.cache import VolumeCache
from ctmae.runtime.loader import PREFETCH

FIRST_PASS_TARGET = Target("<=", 0.5, "≤ 0.5×")
CROPS_TARGET = Target(">=", 10.0, "≥ 10×")
LOADER_TARGET = Target(">=", 2.0, "≥ 2×")


def monai_chain(cfg: RunConfig, dicom: bool, crops: bool) -> Compose:
    """MONAI's uncached pipeline; ``crops`` appends RandSpatialCropSamplesd (seeded)."""
    lo, hi = cfg.preprocess.hu_window
    reader = PydicomReader() if dicom else None  # None: LoadImaged picks its default reader for the suffix
    steps = [
        LoadImaged("image", reader=reader, ensure_channel_first=True, image_only=True),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=cfg.preprocess.spacing, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if crops:
        steps.append(
            RandSpatialCropSamplesd(
                "image", roi_size=(cfg.preprocess.crop,) * 3, num_samples=cfg.data.crops_per_volume, random_size=False
            )
        )
    chain = Compose(steps)
    chain.set_random_state(seed=0)
    return chain


def monai_input(source: VolumeSource) -> dict:
    """MONAI's input for a source: the file, or the DICOM series' folder (PydicomReader reads a folder)."""
    return {"image": str(Path(source.files[0]).parent) if source.is_dicom else source.files[0]}


def first_pass(name: str, source: VolumeSource, cfg: RunConfig, repeats: int, scratch: Path) -> Row:
    """Seconds to build one cache entry on a fresh cache folder vs MONAI's deterministic chain on the same input."""
    chain = monai_chain(cfg, source.is_dicom, crops=False)
    data = monai_input(source)
    counter = iter(range(10**6))

    def ours() -> None:
        cache_dir = scratch / f"first_pass_{next(counter)}"
        VolumeCache(dataclasses.replace(cfg.preprocess, cache_dir=str(cache_dir))).ensure(source)
        shutil.rmtree(cache_dir)

    def theirs() -> None:
        chain(dict(data))

    shape = tuple(chain(dict(data))["image"].shape[1:])  # also warms up imports and the reader
    times = interleaved({"ctmae": ours, "monai": theirs}, repeats, label=f"first pass {name}")
    a, b = Figure(times["ctmae"], "s"), Figure(times["monai"], "s")
    ratio = a.median / b.median
    reader = reader_name(chain, data["image"])
    return Row(
        f"First pass (build cache) per volume: {name}",
        a.fmt(),
        b.fmt(),
        ratio,
        FIRST_PASS_TARGET,
        notes=f"ctmae: `VolumeCache.ensure` on a fresh cache folder: read (a NIfTI is decompressed once, by "
        f"nibabel, with SimpleITK's header for geometry; DICOM through SimpleITK/GDCM), then SimpleITK resamples "
        f"the stored int16 straight to float32 on the RAS {cfg.preprocess.spacing} mm grid that MONAI's Orientationd → "
        f"Spacingd plan lazily (equal to `preprocess_transforms` within 1e-4), HU window in place, foreground "
        f"crop, pad, write .npy + CRC. MONAI: LoadImaged ({reader}) → "
        f"Orientationd → Spacingd → ScaleIntensityRanged, output {shape}. Ratio = ctmae / MONAI time.",
    )


def cached_crops(name: str, source: VolumeSource, cfg: RunConfig, repeats: int, visits: int) -> Row:
    """Crops/s of ctmae's cached crop stream (workers 0) vs MONAI's uncached chain with RandSpatialCropSamplesd."""
    cfg = cfg.replace(data={"workers": 0})
    VolumeCache(cfg.preprocess).ensure(source)
    n = cfg.data.crops_per_volume
    stream = crop_batches([source], cfg.preprocess, cfg.data, seed=0, batch_size=n)  # one batch = one visit = n crops
    chain = monai_chain(cfg, source.is_dicom, crops=True)
    data = monai_input(source)
    next(stream)
    chain(dict(data))  # warm-up

    def ours() -> None:
        for _ in range(visits):
            batch = next(stream)
            assert batch.shape == (n, 1, cfg.preprocess.crop, cfg.preprocess.crop, cfg.preprocess.crop)

    def theirs() -> None:
        assert len(chain(dict(data))) == n

    times = interleaved({"ctmae": ours, "monai": theirs}, repeats, label=f"cached crops {name}")
    a = Figure([visits * n / t for t in times["ctmae"]], "crops/s")
    b = Figure([n / t for t in times["monai"]], "crops/s")
    return Row(
        f"Cached crop stream: {name}",
        a.fmt(),
        b.fmt(),
        a.median / b.median,
        CROPS_TARGET,
        notes=f"ctmae: `crop_batches` over a built `VolumeCache` (memory-mapped .npy), crop {cfg.preprocess.crop}, "
        f"{n} crops per volume visit, workers 0, {visits} visits per repeat. MONAI: the uncached chain "
        f"+ RandSpatialCropSamplesd(num_samples={n}) on the same input, one call per repeat. "
        f"Ratio = ctmae crops/s ÷ MONAI crops/s.",
    )


def loader_vs_step(
    sources: list[VolumeSource],
    cfg: RunConfig,
    step,
    batch: int,
    steps: int,
    repeats: int,
    batches_per_repeat: int,
    model_text: str,
) -> Row:
    """Crops/s the default loader delivers vs crops/s the default-size training step consumes.

    Consumption comes from a live loop (``steps`` training steps fed by ``crop_batches`` with the default workers,
    so the workers compete with the step for cores as in training); its waits for data are reported too. Delivery
    is measured afterwards on a fresh loader alone, after its workers started.
    """
    for s in sources:
        VolumeCache(cfg.preprocess).ensure(s)
    waits, computes = [], []
    stream = crop_batches(sources, cfg.preprocess, cfg.data, seed=0, batch_size=batch)
    step(next(stream))  # warm-up, includes the workers' start
    for i in range(steps):
        t0 = time.perf_counter()
        x = next(stream)
        t1 = time.perf_counter()
        step(x)
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        computes.append(t2 - t1)
        progress(f"live loop step {i + 1}/{steps}: waited {waits[-1] * 1e3:.1f} ms, step {computes[-1]:.3g}s")
    del stream
    consumed = Figure([batch / t for t in computes], "crops/s")

    stream = crop_batches(sources, cfg.preprocess, cfg.data, seed=1, batch_size=batch)
    for _ in range(2 * (cfg.data.workers or 0) * PREFETCH + 1):  # fill and drain the prefetch queue: workers are up
        next(stream)
    delivered = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batches_per_repeat):
            next(stream)
        delivered.append(batches_per_repeat * batch / (time.perf_counter() - t0))
        progress(f"loader alone round {r + 1}/{repeats}: {delivered[-1]:.1f} crops/s")
    del stream
    delivered_fig = Figure(delivered, "crops/s")
    wait_share = sum(waits) / (sum(waits) + sum(computes))
    return Row(
        "Loader delivery vs training-step consumption (default CPU config)",
        delivered_fig.fmt(),
        consumed.fmt(),
        delivered_fig.median / consumed.median,
        LOADER_TARGET,
        notes=f"ctmae column: crops/s from `crop_batches` alone, workers {cfg.data.workers}, crops_per_volume "
        f"{cfg.data.crops_per_volume}, batch {batch}, {batches_per_repeat} batches per repeat, over "
        f"{len(sources)} cached volumes. Reference column: crops/s consumed by ctmae training steps "
        f"({model_text}, crop {cfg.preprocess.crop}, batch {batch}) in a live loop fed by that loader; in that loop "
        f"the step waited for data {statistics.median(waits) * 1e3:.1f} ms median "
        f"(max {max(waits) * 1e3:.1f} ms) per step, {wait_share:.2%} of the loop's time. "
        f"Ratio = delivered ÷ consumed.",
    )


def reader_name(chain: Compose, path: str) -> str:
    """The reader MONAI's LoadImaged uses for ``path``: the last registered one that accepts its suffix."""
    loader = chain.transforms[0]._loader  # an explicitly given reader is registered last, so it is found first
    return next((type(r).__name__ for r in reversed(loader.readers) if r.verify_suffix(path)), "?")


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ctmae_bench_"))
