"""Issue 17's data-at-scale measures, side by side in one run: cache bytes per scan against the float32 ``.npy`` a
previous ctmae stored, the crop stream from either cache with the page cache warm and cold, ``ctmae prepare`` on two
workers against one, finetune-seg's first pass against the MONAI chain it replaces (and its second pass), and the
peak memory of reading a ``.nii.gz``.

    python -m benchmarks.cache_bench            # ~10 minutes on 2 cores
    python -m benchmarks.cache_bench --quick    # fewer repeats

Prints a Markdown table with notes to stdout; progress goes to stderr. Compared timings are interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset
from torch.utils.data import Dataset

from benchmarks import synthetic
from benchmarks.common import Figure, Row, Target, interleaved, machine, peak_read_bytes, progress
from benchmarks.data_bench import scratch_dir
from ctmae.io.discovery import VolumeSource, find_volumes
from ctmae.mae.config import RunConfig
from ctmae.mae.crops import crop_batches
from ctmae.preprocess import cache as cache_module
from ctmae.preprocess.cache import VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.prepare import prepare_dataset
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.preprocess.visit_order import visit_batches, visit_volume
from ctmae.seg.data import LabelledCase, cache_cases

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
FRAGMENT = Path(__file__).resolve().parent / "cache_results.md"
HEADING = "## Data at scale: the compressed cache, `ctmae prepare`, finetune-seg's first pass"
FULL_SHAPE = (512, 512, 300)
BYTES_TARGET = Target("<=", 0.25, "≤ 0.25×")
WARM_TARGET = Target(">=", 0.9, "≥ 0.9×")
COLD_TARGET = Target(">=", 1.0, "> 1×")
WORKERS_TARGET = Target(">=", 1.6, "≥ 1.6×")
FIRST_PASS_TARGET = Target("<=", 0.4, "≤ 0.4×")
SECOND_PASS_TARGET = Target("<=", 0.0, "0 preprocessed", on_ctmae=True)
MEMORY_TARGET = Target("<=", 1.5, "≤ 1.5×")


@dataclasses.dataclass(frozen=True)
class Plan:
    repeats: int  # interleaved rounds per compared timing
    warm_visits: int  # visits of each crop stream per round
    copies: int  # distinct files per format for the cold rows, and scans for the prepare row


FULL, QUICK = Plan(5, 24, 8), Plan(3, 8, 4)


class NpyVisits(Dataset):
    """Crops from float32 ``.npy`` files, as the previous cache read them: a memory map, ``np.array`` per crop, then
    ``np.stack`` (``prealloc``: straight into one preallocated batch, to compare the formats alone). Same schedule
    and random offsets as ``ctmae.mae.crops.CropVisits``."""

    def __init__(self, files: list[Path], cfg: RunConfig, seed: int, prealloc: bool) -> None:
        self.files, self.cfg, self.seed, self.prealloc = files, cfg, seed, prealloc

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, visit: int) -> tuple[torch.Tensor]:
        volume = np.load(self.files[visit_volume(len(self.files), self.seed, visit)], mmap_mode="r")
        rng, c, n = np.random.default_rng([self.seed, visit]), self.cfg.preprocess.crop, self.cfg.data.crops_per_volume
        if self.prealloc:
            crops = np.empty((n, 1, c, c, c), np.float32)
            for crop in crops:
                x, y, z = (int(rng.integers(0, e - c + 1)) for e in volume.shape)
                np.copyto(crop[0], volume[x : x + c, y : y + c, z : z + c])
            return (torch.from_numpy(crops),)
        stack = []
        for _ in range(n):
            x, y, z = (int(rng.integers(0, e - c + 1)) for e in volume.shape)
            stack.append(np.array(volume[x : x + c, y : y + c, z : z + c]))
        return (torch.from_numpy(np.stack(stack))[:, None],)


def npy_batches(files: list[Path], cfg: RunConfig, seed: int, prealloc: bool = False):
    n = cfg.data.crops_per_volume
    return (b for (b,) in visit_batches(NpyVisits(files, cfg, seed, prealloc), n, n, 0, cfg.data.workers))


def write_npy(cache: VolumeCache, source: VolumeSource, path: Path) -> Path:
    """The float32 ``.npy`` the previous cache stored for ``source`` (the same values, decoded)."""
    np.save(path, np.asfortranarray(cache.load(source).numpy()))
    return path


def bytes_row(name: str, source: VolumeSource, cfg: PreprocessConfig, scratch: Path) -> Row:
    cache = VolumeCache(cfg)
    entry = cache.ensure(source)
    npy = write_npy(cache, source, scratch / f"{entry.stem}.npy")
    ours, theirs = entry.stat().st_size, npy.stat().st_size
    shape = "×".join(map(str, json.loads(entry.with_suffix(".json").read_text(encoding="utf-8"))["shape"]))
    return Row(
        f"Cache bytes per scan: {name}",
        f"{ours / 2**20:.2f} MiB ({ours / theirs:.3f}×)",
        f"{theirs / 2**20:.2f} MiB (float32 .npy)",
        ours / theirs,
        BYTES_TARGET,
        notes=f"cached volume {shape} voxels. ctmae: the `.b2nd` entry (int16 HU, blosc2 chunks "
        f"{cache_module.CHUNKS}, blocks {cache_module.BLOCKS}, {cache_module.CPARAMS['codec'].name} level "
        f"{cache_module.CPARAMS['clevel']}, bit-shuffled). Reference: the same volume as the float32 `.npy` "
        f"CACHE_VERSION 1 wrote. Ratio = bytes ÷ bytes.",
    )


def copies(source: VolumeSource, npy: Path, cfg: PreprocessConfig, count: int, folder: Path):
    """``count`` distinct files per format holding one scan's entry: hard links of the scan (new keys), the
    entry's files copied under each key, and copies of the ``.npy``; for rows that need distinct files."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = VolumeCache(cfg)
    entry = cache.path(source)
    sources, npys = [], []
    for i in range(count):
        link = folder / f"copy{i}.nii.gz"
        if not link.exists():
            os.link(source.files[0], link)
        s = VolumeSource(link.name, (str(link),), False)
        for suffix in (".b2nd", ".json"):
            shutil.copyfile(entry.with_suffix(suffix), cache.path(s).with_suffix(suffix))
        shutil.copyfile(npy, folder / f"copy{i}.npy")
        sources.append(s)
        npys.append(folder / f"copy{i}.npy")
    return sources, npys


def evict(paths: list[Path]) -> str:
    """Drop ``paths``' pages from the page cache with posix_fadvise(DONTNEED) (the files alone: the machine is
    shared, so not /proc/sys/vm/drop_caches); returns how."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(POSIX_FADV_DONTNEED) on each file"


def crop_rows(sources: list[VolumeSource], npys: list[Path], cfg: RunConfig, plan: Plan) -> list[Row]:
    """Crops/s of the new cache's stream against the previous .npy stream: warm, warm vs the format alone, cold."""
    cfg = cfg.replace(data={"workers": 0})
    n, visits, pre = cfg.data.crops_per_volume, plan.warm_visits, cfg.preprocess
    ours = crop_batches(sources, pre, cfg.data, 0, n)
    old, alone = npy_batches(npys, cfg, 0), npy_batches(npys, cfg, 0, True)
    for stream in (ours, old, alone):  # warm: every file read once
        for _ in range(len(sources)):
            next(stream)

    def run(stream):
        return lambda: [next(stream) for _ in range(visits)]

    times = interleaved({"b2nd": run(ours), "npy": run(old), "npy prealloc": run(alone)}, plan.repeats, "warm crops")
    warm = {k: Figure([visits * n / t for t in v], "crops/s") for k, v in times.items()}
    files = [VolumeCache(pre).path(s) for s in sources] + npys
    how = evict(files)
    cold_streams = {"b2nd": crop_batches(sources, pre, cfg.data, 1, n), "npy": npy_batches(npys, cfg, 1)}

    def cold(name):
        def go():
            evict(files)
            for _ in range(len(sources)):  # one visit per file: each read from disk
                next(cold_streams[name])

        return go

    times = interleaved({k: cold(k) for k in cold_streams}, plan.repeats, "cold crops")
    cold_fig = {k: Figure([len(sources) * n / t for t in v], "crops/s") for k, v in times.items()}
    common = (
        f"`crop_batches` (crop {pre.crop}, {n} crops per visit, batch {n}, workers 0) over {len(sources)} cached "
        f"copies of the synthetic {'×'.join(map(str, FULL_SHAPE))} scan"
    )
    return [
        Row(
            "Crop stream, page cache warm: new cache vs the .npy cache",
            warm["b2nd"].fmt(),
            warm["npy"].fmt(),
            warm["b2nd"].median / warm["npy"].median,
            WARM_TARGET,
            notes=f"{common}, {visits} visits per round. Reference: the previous .npy crop stream (memory map, "
            f"`np.array` per crop, `np.stack`) on the same volumes, offsets and re-batching.",
        ),
        Row(
            "Crop stream, page cache warm: new cache vs .npy read into a preallocated batch (the formats alone)",
            warm["b2nd"].fmt(),
            warm["npy prealloc"].fmt(),
            warm["b2nd"].median / warm["npy prealloc"].median,
            None,
            notes=f"{common}. Reference: the .npy memory map copied straight into one preallocated batch, as the new "
            f"stream writes its crops: decompressing blosc2 blocks against copying pages.",
        ),
        Row(
            "Crop stream, cold (files evicted from the page cache before each round)",
            cold_fig["b2nd"].fmt(),
            cold_fig["npy"].fmt(),
            cold_fig["b2nd"].median / cold_fig["npy"].median,
            COLD_TARGET,
            notes=f"{common}; each round visits every file once after evicting them ({how}). Reference: the "
            f"previous .npy stream. Ratio = crops/s ÷ crops/s.",
        ),
    ]


def prepare_row(scan: Path, name: str, plan: Plan, scratch: Path) -> Row:
    """Scans/s of ``prepare_dataset`` (``ctmae prepare``'s library call) with 2 workers vs 1 on a fresh cache."""
    folder = scratch / "prepare_scans"
    folder.mkdir()
    for i in range(plan.copies):
        os.link(scan, folder / f"scan{i}.nii.gz")
    sources = find_volumes([folder])[0]
    runs = iter(range(10**6))

    def build(workers: int):
        def go():
            cfg = PreprocessConfig(cache_dir=str(scratch / f"prepare_{next(runs)}"))
            summary, problems = prepare_dataset(sources, cfg, workers=workers, min_edge=16)
            assert summary["scans"] == len(sources) and not problems, problems
            shutil.rmtree(cfg.cache_dir)

        return go

    times = interleaved({"2 workers": build(2), "1 worker": build(1)}, plan.repeats, "prepare")
    two, one = (Figure([len(sources) / t for t in times[k]], "scans/s") for k in ("2 workers", "1 worker"))
    return Row(
        "`ctmae prepare`: scans/s on 2 workers vs 1",
        two.fmt(),
        one.fmt(),
        two.median / one.median,
        WORKERS_TARGET,
        notes=f"`prepare_dataset` over {len(sources)} scans (hard links of the {name} scan, so each is "
        f"built), a fresh cache folder per round, including the workers' start; each worker gets its share of the "
        f"{len(os.sched_getaffinity(0))} usable cores for SimpleITK's threads (torch: one thread per worker, "
        f"blosc2: one per process). One worker alone already resamples on every core, so only its serial parts "
        f"(decompressing the .nii.gz, the HU window, writing the entry) gain from a second worker.",
    )


def seg_rows(cases: list[LabelledCase], cfg: PreprocessConfig, plan: Plan, scratch: Path) -> list[Row]:
    """finetune-seg's first pass over labelled cases (on-disk cache) vs the MONAI chain, then its second pass."""
    runs = iter(range(10**6))

    def ours():
        cache_cases(cases, dataclasses.replace(cfg, cache_dir=str(scratch / f"seg_{next(runs)}")))

    def theirs():
        transform = preprocess_transforms(cfg, label=True)
        CacheDataset([c.item() for c in cases], transform=transform, cache_rate=1.0, num_workers=0, progress=False)

    times = interleaved({"ctmae": ours, "monai": theirs}, plan.repeats, "finetune-seg first pass")
    a, b = Figure(times["ctmae"], "s"), Figure(times["monai"], "s")
    built = scratch / "seg_0"
    calls = []
    real_image, real_label = VolumeCache._preprocess, cache_module._label_on_grid
    VolumeCache._preprocess = lambda self, s: calls.append(s) or real_image(self, s)
    cache_module._label_on_grid = lambda *args: calls.append(args) or real_label(*args)
    try:
        t0 = time.perf_counter()
        cached = cache_cases(cases, dataclasses.replace(cfg, cache_dir=str(built)))
        second = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(cached)):
            cached[i]
        read = time.perf_counter() - t0
    finally:
        VolumeCache._preprocess, cache_module._label_on_grid = real_image, real_label
    names = ", ".join(c.id for c in cases)
    return [
        Row(
            "finetune-seg first pass (preprocessing the labelled cases) vs the MONAI chain",
            a.fmt(),
            b.fmt(),
            a.median / b.median,
            FIRST_PASS_TARGET,
            notes=f"cases: {names}. ctmae: `cache_cases` on a fresh cache folder (image through SimpleITK's "
            f"resampler, label by nearest neighbour onto its grid, both written as blosc2 entries). MONAI: the "
            f"previous `cache_cases`, a CacheDataset over `preprocess_transforms(cfg, label=True)`. Reading every "
            f"case back from the cache once (as a validation pass does) took {read:.2f} s more.",
        ),
        Row(
            "finetune-seg second pass over the same cases",
            f"{len(calls)} preprocessed, {second:.3f} s",
            "the MONAI chain again (as above)",
            None,
            SECOND_PASS_TARGET,
            notes="ctmae: `cache_cases` again over the same cache folder; its image and label preprocessing "
            "counted (0: each case's entries were found by path, size and mtime, and CRC-checked).",
            ctmae_value=float(len(calls)),
        ),
    ]


def memory_row(nii: Path, small: Path) -> Row:
    """Peak resident memory of reading ``nii`` in a fresh process (as tests/test_io.py measures it) vs its
    decompressed voxels."""
    peak = peak_read_bytes(small, nii)
    voxels = int(np.prod(FULL_SHAPE)) * 2
    return Row(
        f"Peak memory reading a .nii.gz ({'×'.join(map(str, FULL_SHAPE))} int16)",
        f"{peak / 2**20:.0f} MiB",
        f"{voxels / 2**20:.0f} MiB decompressed",
        peak / voxels,
        MEMORY_TARGET,
        notes="`CTReader().read` in a fresh process after a warm-up read; peak resident size (VmHWM, reset through "
        "/proc/self/clear_refs) minus the resident size before the read. The previous reader (whole file, "
        "decompressed, nibabel, SimpleITK's copy) measured 3.1× on this volume.",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and copies")
    ap.add_argument("--out", type=Path, default=FRAGMENT, help="markdown section written here (BENCHMARKS.md's)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    command = "python -m benchmarks.cache_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    info = machine()
    scratch = scratch_dir()
    rows: list[Row] = []
    try:
        progress(f"writing a synthetic {'×'.join(map(str, FULL_SHAPE))} CT as .nii.gz")
        volume = synthetic.ct_volume(FULL_SHAPE)
        nii = synthetic.write_nifti(scratch / "synthetic.nii.gz", volume)
        lungs = (volume > -925) & (volume < -775)  # the synthetic lungs, -850 HU ± noise
        label = synthetic.write_nifti(scratch / "synthetic_label.nii.gz", lungs.astype(np.int16))
        small = synthetic.write_nifti(scratch / "small.nii.gz", volume[:16, :16, :16])
        del volume
        cfg = RunConfig().replace(preprocess={"cache_dir": str(scratch / "cache")})  # defaults: 1.5 mm, crop 96, ...
        pre = cfg.preprocess
        sample, full = find_volumes([SAMPLE / "ct"])[0][0], find_volumes([nii])[0][0]
        progress("memory, bytes")
        rows.append(memory_row(nii, small))
        rows.append(bytes_row("sample_data/ct/lung1.nii.gz", sample, pre, scratch))
        rows.append(bytes_row(f"synthetic {'×'.join(map(str, FULL_SHAPE))}", full, pre, scratch))
        sources, npys = copies(full, scratch / f"{VolumeCache(pre).key(full)}.npy", pre, plan.copies, scratch / "c")
        rows += crop_rows(sources, npys, cfg, plan)
        rows.append(prepare_row(nii, f"synthetic {'×'.join(map(str, FULL_SHAPE))}", plan, scratch))
        cases = [
            LabelledCase("lung1", sample, find_volumes([SAMPLE / "labels"])[0][0]),
            LabelledCase("synthetic", full, find_volumes([label])[0][0]),
        ]
        rows += seg_rows(cases, PreprocessConfig(), plan, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = markdown(rows, info, command)
    print(text)
    args.out.write_text(f"{HEADING}\n\n{text}\n", encoding="utf-8")
    progress(f"wrote {args.out}; `python -m benchmarks.run` includes it in BENCHMARKS.md")


def markdown(rows: list[Row], info: dict[str, str], command: str) -> str:
    met = {True: "yes", False: "**no**", None: "—"}
    lines = [f"Command: `{command}`", "", *[f"- **{k}**: {v}" for k, v in info.items()], ""]
    lines += ["| # | measure | ctmae | reference | ratio | target | met? |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "—"
        target = r.target.text if r.target else "—"
        lines.append(f"| {i} | {r.measure} | {r.ctmae} | {r.reference} | {ratio} | {target} | {met[r.met]} |")
    lines += ["", "Notes:", ""] + [f"{i}. {r.notes}" for i, r in enumerate(rows, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
