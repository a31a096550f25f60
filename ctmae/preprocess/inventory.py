"""What a run trained on: one row per input scan (``inputs.csv`` in the run folder), and scans that are the same
voxels under two names (a PACS export's second reconstruction, a copied file) used once.

Two entries built with the same settings hold the same bytes exactly when their preprocessed voxels are equal, so
the cache's size and CRC-32 of each entry (kept in its sidecar, no re-reading) with its shape find duplicates. Rows
name scans by their privacy-safe id (``ctmae.io.discovery.VolumeSource.id``) and hold no DICOM tag but the modality.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ctmae.io.discovery import VolumeSource
from ctmae.preprocess.cache import VolumeCache
from ctmae.runtime.files import atomic_path

COLUMNS = ("id", "kind", "modality", "shape", "spacing_mm", "cache_key", "used")
KINDS = {".nii": "NIfTI", ".gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}


def inventory(sources: Sequence[VolumeSource], cache: VolumeCache) -> tuple[list[dict], list[str]]:
    """(one row per source, in order; one line per voxel-identical duplicate, which is marked unused).

    The sources' cache entries must exist (``ctmae.preprocess.build_cache.build_cache``).
    """
    rows, notes, first_of = [], [], {}
    for source in sources:
        meta = json.loads(cache.path(source).with_suffix(".json").read_text(encoding="utf-8"))
        fingerprint = (meta["bytes"], meta["crc32"], tuple(meta["shape"]))
        original = first_of.setdefault(fingerprint, source)
        if original is not source:
            notes.append(f"{source.label}: voxel-identical to {original.label} after preprocessing: used once")
        spacing = meta.get("source", {}).get("spacing", [])
        rows.append(
            {
                "id": source.id,
                "kind": _kind(source),
                "modality": source.modality,
                "shape": "x".join(map(str, meta["shape"])),
                "spacing_mm": "x".join(f"{s:g}" for s in spacing),
                "cache_key": cache.key(source),
                "used": "yes" if original is source else f"no: same voxels as {original.id}",
            }
        )
    return rows, notes


def _kind(source: VolumeSource) -> str:
    """The inventory's ``kind`` column: the format, and for DICOM a series of files or one multi-frame file."""
    if source.is_dicom:
        return "DICOM series" if len(source.files) > 1 else "DICOM multi-frame file"
    return KINDS.get(Path(source.files[0]).suffix.lower(), "image")


def used_sources(sources: Sequence[VolumeSource], rows: Sequence[dict]) -> list[VolumeSource]:
    """The sources whose row is used (duplicates dropped), in order."""
    return [s for s, row in zip(sources, rows) if row["used"] == "yes"]


def write_inventory(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """``inputs.csv``: the rows under ``COLUMNS``, written atomically."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
