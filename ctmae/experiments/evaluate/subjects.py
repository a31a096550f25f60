"""What an evaluation compares: each MAE checkpoint, a from-scratch twin of each checkpoint's size (always
included), and the raw-intensity floor; and the units of work each protocol runs on them.

A unit is the smallest piece of work the journal records: the probe of one subject, one few-shot run (subject, k,
repeat), or the recon protocol of one checkpoint. Checkpoints of one size and preprocessing share their scratch
twin and their intensity floor, so the baselines are computed once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctmae.experiments.evaluate.settings import EvalSettings
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.seg.network import net_config_from_mae

KINDS = ("pretrained", "scratch", "intensity")


@dataclass(frozen=True)
class Subject:
    """One row of the report: a checkpoint, a from-scratch twin or the intensity floor."""

    slug: str  # unit and folder name: ckpt0, scratch0, intensity0
    kind: str  # one of KINDS
    label: str  # how the report names it
    cfg: RunConfig  # sizes and preprocessing: the checkpoint's, or the one a baseline copies
    path: str = ""  # the checkpoint file (pretrained only)
    sha256: str = ""
    step: int = 0  # pretraining steps of the checkpoint
    fewshot_problem: str = ""  # why few-shot fine-tuning cannot use this encoder ("" when it can)

    def describe(self) -> dict:
        return {
            "slug": self.slug,
            "kind": self.kind,
            "label": self.label,
            "path": self.path,
            "sha256": self.sha256,
            "step": self.step,
            "model": self.cfg.model.size,
            "patch": self.cfg.model.patch,
            "crop": self.cfg.model.img_size,
            "mask": self.cfg.mask.kind,
            "fewshot_problem": self.fewshot_problem,
            "config": self.cfg.to_dict(),  # the checkpoint's whole config (a baseline: the one it copies)
        }


@dataclass(frozen=True)
class Unit:
    """One journalled piece of work; ``ticks`` is its share of the progress bar."""

    id: str
    protocol: str
    subject: Subject
    ticks: int
    k: int = 0
    repeat: int = 0


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_subjects(checkpoints: Sequence[str | os.PathLike], settings: EvalSettings) -> list[Subject]:
    """Every checkpoint (loaded once here, so a bad one fails before any work) and its baselines.

    Raises:
        CheckpointError: a file that is not an MAE pretraining checkpoint (a segmentation one included).
    """
    subjects: list[Subject] = []
    scratch: dict[str, Subject] = {}
    floor: dict[str, Subject] = {}
    for i, path in enumerate(checkpoints):
        state = load_checkpoint(path)
        cfg: RunConfig = state["config"]
        problem = ""
        if "fewshot" in settings.protocols:
            try:
                net_config_from_mae(cfg.model, settings.feature_size, 2)
            except ValueError as e:
                problem = f"{path}: few-shot fine-tuning skipped: {e}"
        label = _short(Path(path), [Path(p) for p in checkpoints])
        subjects.append(
            Subject(f"ckpt{i}", "pretrained", label, cfg, str(path), file_sha256(path), int(state["step"]), problem)
        )
        del state
        m, d = cfg.model, cfg.preprocess
        twin = repr((m, d.spacing, d.hu_window))
        if twin not in scratch:
            scratch[twin] = Subject(
                f"scratch{len(scratch)}", "scratch", f"scratch ({m.size})", cfg, fewshot_problem=problem
            )
        floor_key = repr((m.patch, m.img_size, d.spacing, d.hu_window))
        if floor_key not in floor:
            floor[floor_key] = Subject(f"intensity{len(floor)}", "intensity", f"intensity (patch {m.patch})", cfg)
    for group in (scratch, floor):  # the same label twice: name the checkpoint each copies
        if len({s.label for s in group.values()}) < len(group):
            for key, s in group.items():
                group[key] = Subject(**{**s.__dict__, "label": f"{s.label} like {_first_like(s, subjects)}"})
    return [*subjects, *scratch.values(), *floor.values()]


def _first_like(baseline: Subject, subjects: list[Subject]) -> str:
    return next(s.label for s in subjects if s.cfg is baseline.cfg)


def _short(path: Path, all_paths: list[Path]) -> str:
    """The shortest tail of ``path`` (``last.pt``, ``run/checkpoints/last.pt``...) that tells it from the others."""
    parts = path.parts
    for n in range(1, len(parts) + 1):
        tail = parts[-n:]
        if sum(1 for p in all_paths if p.parts[-n:] == tail) == 1:
            return str(Path(*tail))
    return str(path)


def plan_units(subjects: Sequence[Subject], settings: EvalSettings, n_train: int, n_test: int) -> list[Unit]:
    """The units of every protocol, probe first (fast), then recon, then few-shot (slow)."""
    units: list[Unit] = []
    if "probe" in settings.protocols:
        draws = {"scratch": settings.probe_draws}  # a scratch probe fits one probe per random encoder
        units += [Unit(f"probe/{s.slug}", "probe", s, (n_train + n_test) * draws.get(s.kind, 1)) for s in subjects]
    if "recon" in settings.protocols:
        units += [Unit(f"recon/{s.slug}", "recon", s, n_test) for s in subjects if s.kind == "pretrained"]
    if "fewshot" in settings.protocols:
        for s in subjects:
            if s.kind == "intensity" or s.fewshot_problem:
                continue
            for k in settings.shots:
                for r in range(settings.repeats):
                    units.append(Unit(f"fewshot/{s.slug}/k{k}_r{r}", "fewshot", s, settings.steps + n_test, k, r))
    return units
