"""A study's plan: its points (stable index, name, config) and the manifest in ``study.json`` that ties a study
folder to its data and settings, so a re-run continues it and a run with other data or settings is refused."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctmae.experiments.evaluate import EvalSettings
from ctmae.experiments.study.grid import FLAT_ALIASES, expand, point_name
from ctmae.mae.config import RunConfig
from ctmae.mae.masking import strategy
from ctmae.preprocess.config import lift_flat_layout
from ctmae.runtime.files import atomic_write_text

MANIFEST = "study.json"
FORMAT = 1
MAX_POINTS = 12  # a larger grid needs --yes


class StudyMismatch(ValueError):
    """The study folder was made with other data or settings (a usage error unless --overwrite)."""


@dataclass(frozen=True)
class Point:
    """One pretraining run and its evaluation."""

    index: int
    name: str
    overrides: dict[str, Any]  # section.key -> value: what this point changes from the base config
    cfg: RunConfig

    @property
    def folder(self) -> str:
        return f"{self.index:03d}-{self.name}"

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "folder": self.folder, "overrides": self.overrides}


def plan_points(grid: dict[str, list[Any]], base: RunConfig) -> list[Point]:
    """The grid's points in a stable order (the product of the keys in the order given), without repeats: a point
    that differs from an earlier one only in settings its mask ignores (the ratio of ``none``/``noise``, the block of
    ``random``) is the same experiment and runs once."""
    points: list[Point] = []
    seen: set[str] = set()
    for overrides, cfg in expand(grid, base):
        key = _effective(cfg)
        if key not in seen:
            seen.add(key)
            points.append(Point(len(points), point_name(overrides), overrides, cfg))
    return points


def _effective(cfg: RunConfig) -> str:
    """The config with the mask settings its strategy ignores blanked out, as a comparable string."""
    d = cfg.to_dict()
    mask = d["mask"]
    if not strategy(cfg.mask).uses_ratio:
        mask["ratio"] = None
    if cfg.mask.kind != "block":
        mask["block"] = None
    if cfg.mask.kind != "noise":
        mask["noise_std"] = None
    return json.dumps(d, sort_keys=True)


def file_identity(paths: Sequence[str | os.PathLike]) -> list[list[Any]]:
    """What ties a study to its data: each input file (folders walked) by absolute path and size."""
    files = []
    for p in paths:
        p = Path(p)
        found = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        files += [[str(q.resolve()), q.stat().st_size if q.exists() else None] for q in found]
    return files


def manifest(
    scans: Sequence[str | os.PathLike],
    eval_inputs: Sequence[str | os.PathLike],
    grid: dict[str, list[Any]],
    base: RunConfig,
    settings: EvalSettings,
) -> dict[str, Any]:
    """The study's identity: data, grid, base config (seed and steps included) and evaluation settings."""
    data = base.to_dict()
    data["preprocess"].pop("cache_dir")  # where the cache lives does not change a figure
    data["data"].pop("workers")
    return {
        "format": FORMAT,
        "scans": file_identity(scans),
        "eval_data": file_identity(eval_inputs),
        "grid": {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in grid.items()},
        "seed": base.train.seed,
        "steps": base.train.steps,
        "base": data,
        "eval_settings": settings.result_key(),
    }


def read_manifest(out: Path) -> dict[str, Any] | None:
    """study.json's manifest, or None when the folder has none."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text(encoding="utf-8"))["manifest"]
        man["base"] = lift_flat_layout(man["base"])  # a study begun before the preprocess section continues
        man["grid"] = {FLAT_ALIASES.get(k, k): v for k, v in man["grid"].items()}
        return man
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise StudyMismatch(
            f"{path}: not a ctmae study manifest; pass --overwrite to start a new study there"
        ) from None


def open_study(out: Path, wanted: dict[str, Any], overwrite: bool) -> None:
    """Create the study folder with its manifest, or check an existing one against ``wanted``.

    Raises:
        StudyMismatch: the folder holds another study (or other files) and ``overwrite`` is False.
    """
    if out.exists() and not out.is_dir():
        raise StudyMismatch(f"{out}: --out must be a folder, but a file is there")
    existing = read_manifest(out) if not overwrite else None
    if existing is not None and existing != wanted:
        diff = sorted(k for k in set(wanted) | set(existing) if wanted.get(k) != existing.get(k))
        raise StudyMismatch(
            f"{out}: a study made with other {', '.join(diff)}; use the same inputs and options to continue it, "
            "another --out, or --overwrite to start again"
        )
    if existing is None and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StudyMismatch(f"{out}: folder is not empty and holds no study; pass --overwrite or another --out")
    if overwrite and out.is_dir():
        for name in (MANIFEST, "study.md", "study.png", "points"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if existing is None:
        atomic_write_text(out / MANIFEST, json.dumps({"manifest": wanted, "points": []}, indent=2) + "\n")
