"""``ctmae prepare``'s library part: build the cache for a list of scans as a job of its own, and summarise them.

Building the cache is CPU work that can run on CPU nodes before GPU time: a SLURM array splits the scans into shards
(``Shard``), each job builds its share of the entries. Every entry's sidecar keeps facts about its scan (spacing,
shape, modality, an HU histogram of a strided subsample), so a summary is computed from the sidecars alone.

Summaries: a run with ``--shard I/N`` writes ``dataset.shard-I-of-N.json`` for its share; a run without ``--shard``
writes ``dataset.json`` for all its inputs. After a sharded build, one final run without ``--shard`` over the same
inputs finds every entry already built (it reads sidecars, not scans; scans that failed are tried again and
reported) and writes the complete ``dataset.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmae.io.discovery import VolumeSource
from ctmae.preprocess.build_cache import build_all
from ctmae.preprocess.cache import CACHE_VERSION, HU_BIN, HU_RANGE
from ctmae.preprocess.config import PreprocessConfig
from ctmae.runtime.files import atomic_write_text

PERCENTILES = (1, 50, 99)


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0 <= index < count): sources index, index + count, index + 2·count, ..."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` -> Shard(I, N). Raises ValueError naming what was given."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/8 (SLURM_ARRAY_TASK_ID/8)")
        return cls(int(match.group(1)), int(match.group(2)))

    def select(self, sources: Sequence[VolumeSource]) -> list[VolumeSource]:
        """This shard's share of ``sources`` (every ``count``-th, so long and short scans spread evenly)."""
        return list(sources[self.index :: self.count])

    @property
    def summary_name(self) -> str:
        return f"dataset.shard-{self.index}-of-{self.count}.json"


def prepare_dataset(
    sources: Sequence[VolumeSource],
    cfg: PreprocessConfig,
    skipped: Sequence[str] = (),
    workers: int = 0,
    min_edge: int = 1,
    on_scan: Callable[[], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> tuple[dict, list[str]]:
    """Build every source's cache entry (in ``workers`` processes) and summarise the usable scans.

    Args:
        sources: scans from ``ctmae.io.discovery.find_volumes`` (one shard's share, if sharded).
        cfg: preprocessing settings and cache folder.
        skipped: one-line problems of inputs already skipped (discovery, modality), reported with the rest.
        workers: processes building entries (0: this process).
        min_edge: refuse scans whose body region is smaller than this along an axis (pretraining's patch).
        on_scan: called once per finished scan (progress).
        on_note: called once with ``OLD_CACHE_NOTE`` when entries of an older ctmae are being rebuilt.

    Returns:
        (the summary (``summarise``), the one-line problems of the scans skipped while building).

    Raises:
        OutputError: the cache could not be written (e.g. a full disk); entries written before are intact.
    """
    built, problems = build_all(sources, cfg, min_edge, workers, on_volume=on_scan, on_note=on_note)
    return summarise([entry.meta for _, entry in built], [*skipped, *problems], cfg), problems


def summarise(metas: Sequence[dict], skipped: Sequence[str], cfg: PreprocessConfig) -> dict:
    """The dataset summary of image entries' sidecars: counts, ranges, HU percentiles, modalities, bytes.

    HU percentiles come from the merged histograms (``HU_BIN``-wide bins, each scan's strided subsample), as bin
    centres: exact to half a bin.
    """
    facts = [m["source"] for m in metas]
    modalities: dict[str, int] = {}
    for f in facts:
        name = f["modality"] or "not recorded (NIfTI/NRRD/MHA)"
        modalities[name] = modalities.get(name, 0) + 1
    cache_bytes = sum(m["bytes"] for m in metas)
    float32_bytes = sum(4 * int(np.prod(m["shape"])) for m in metas)
    return {
        "cache_version": CACHE_VERSION,
        "settings": {"spacing": list(cfg.spacing), "hu_window": list(cfg.hu_window), "crop": cfg.crop},
        "scans": len(metas),
        "skipped": list(skipped),
        "spacing_mm": _ranges([f["spacing"] for f in facts]),
        "shape": _ranges([f["size"] for f in facts]),
        "cached_shape": _ranges([m["shape"] for m in metas]),
        "hu_percentiles": hu_percentiles([f["hu_histogram"] for f in facts]),
        "modalities": dict(sorted(modalities.items())),
        "cache_bytes": cache_bytes,
        "cache_fraction_of_float32": round(cache_bytes / float32_bytes, 4) if float32_bytes else None,
    }


def _ranges(rows: Sequence[Sequence[float]]) -> dict | None:
    """``{"min": [...], "max": [...]}`` per axis, or None for no rows."""
    if not rows:
        return None
    a = np.asarray(rows, dtype=np.float64)
    as_int = np.all(a == np.round(a))
    pick = (lambda v: [int(x) for x in v]) if as_int else (lambda v: [round(float(x), 4) for x in v])
    return {"min": pick(a.min(0)), "max": pick(a.max(0))}


def hu_percentiles(histograms: Sequence[dict], percentiles: Sequence[float] = PERCENTILES) -> dict | None:
    """``{"p1": HU, ...}`` of the merged histograms (``ctmae.preprocess.cache.hu_histogram``), or None if empty."""
    lo, hi = HU_RANGE
    counts = np.zeros((hi - lo) // HU_BIN, np.int64)
    for h in histograms:
        first = (h["start"] - lo) // h["bin"]
        counts[first : first + len(h["counts"])] += np.asarray(h["counts"], np.int64)
    total = int(counts.sum())
    if not total:
        return None
    cumulative = np.cumsum(counts)
    return {
        f"p{q:g}": lo + HU_BIN * int(np.searchsorted(cumulative, q / 100 * total)) + HU_BIN / 2 for q in percentiles
    }


def write_summary(cache_dir: str | Path, summary: dict, shard: Shard | None = None) -> Path:
    """Write the summary atomically as ``dataset.json`` (or the shard's file) in the cache folder; returns it."""
    path = Path(cache_dir) / (shard.summary_name if shard else "dataset.json")
    atomic_write_text(
        path, json.dumps({**summary, "shard": f"{shard.index}/{shard.count}" if shard else None}, indent=1)
    )
    return path
