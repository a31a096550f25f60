"""Building cache entries in parallel DataLoader workers, each on its share of the cores; the one-line problems of
unusable scans come back instead of exceptions."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import SimpleITK as sitk
from torch.utils.data import DataLoader, Dataset

from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.preprocess.cache import OLD_CACHE_NOTE, Built, VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.runtime.cpu import current_budget
from ctmae.runtime.files import OutputError, sweep_temporaries
from ctmae.runtime.loader import iterate_workers


class _Build(Dataset):
    """Builds cache entries in DataLoader workers; item ``i`` is the ``Built`` of source ``i``."""

    def __init__(self, sources: Sequence[VolumeSource], cache: VolumeCache, threads: int = 0) -> None:
        self.sources, self.cache, self.threads = sources, cache, threads

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Built:
        if self.threads:  # first item in a worker (``iterate_workers`` owns the loader's worker_init_fn)
            _use_threads(self.threads)
            self.threads = 0
        stale = self.cache.stale
        try:
            meta = self.cache.entry(self.sources[i])
        except InputError as e:
            return Built(problem=str(e))
        except OSError as e:  # OutputError: one line naming the entry
            return Built(fatal=str(e))
        return Built(meta=meta, stale=self.cache.stale > stale, path=os.fspath(self.cache.path(self.sources[i])))


def _use_threads(threads: int) -> None:
    """SimpleITK's threads in this worker: its share of the cores. torch keeps the one thread DataLoader gives a
    worker: an OpenMP team inherited through fork hangs the first parallel region that uses more."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def build_entries(
    sources: Sequence[VolumeSource], cfg: PreprocessConfig, min_edge: int = 1, workers: int = 0
) -> Iterator[tuple[VolumeSource, Built]]:
    """Build (or find) every source's entry in ``workers`` processes (0: this one), yielding in order.

    Raises:
        OutputError: an entry could not be written (e.g. a full disk); entries written before are intact.
    """
    cache = VolumeCache(cfg, min_edge)
    sweep_temporaries(cache.dir)  # entries a killed process was writing: never valid, often large
    workers = min(workers, len(sources))
    threads = max(1, current_budget().cores // workers) if workers else 0  # each worker's share of the CPU budget
    loader = DataLoader(_Build(sources, cache, threads), batch_size=None, num_workers=workers)
    for source, built in zip(sources, iterate_workers(loader)):
        if built.fatal:
            raise OutputError(built.fatal)
        if built.meta is not None:
            cache.trust(built.path, built.meta)  # later readers in this process (and its forks) skip the CRC
        yield source, built


def build_cache(
    sources: Sequence[VolumeSource],
    cfg: PreprocessConfig,
    on_volume: Callable[[], None] | None = None,
    min_edge: int = 1,
    on_note: Callable[[str], None] | None = None,
    workers: int = 0,
) -> tuple[list[VolumeSource], list[str]]:
    """Preprocess every volume into the cache (in parallel workers); returns (usable sources, problems).

    Args:
        sources: volumes from ``ctmae.io.discovery.find_volumes``.
        cfg: preprocessing settings and cache folder.
        on_volume: optional callback called once per finished volume (progress).
        min_edge: refuse volumes whose body region is smaller than this many voxels along an axis (one patch).
        on_note: called once with ``OLD_CACHE_NOTE`` when entries of an older ctmae are being rebuilt.
        workers: DataLoader processes building entries (0: this process; the run's ``data.workers``).

    Raises:
        OutputError: the cache could not be written (e.g. a full disk); entries written before are intact.
    """
    built, problems = build_all(sources, cfg, min_edge, workers, on_volume=on_volume, on_note=on_note)
    return [source for source, _ in built], problems


def build_all(
    sources: Sequence[VolumeSource],
    cfg: PreprocessConfig,
    min_edge: int = 1,
    workers: int = 0,
    on_volume: Callable[[], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> tuple[list[tuple[VolumeSource, Built]], list[str]]:
    """``build_entries`` run to the end: (the usable sources with their entries, the one-line problems), calling
    ``on_volume`` after each volume and ``on_note`` once with ``OLD_CACHE_NOTE`` if older entries are rebuilt."""
    good, problems, noted = [], [], False
    for source, built in build_entries(sources, cfg, min_edge, workers):
        (problems.append(built.problem) if built.problem else good.append((source, built)))
        if built.stale and on_note and not noted:
            on_note(OLD_CACHE_NOTE)
            noted = True
        if on_volume:
            on_volume()
    return good, problems
