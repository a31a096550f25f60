"""Run an evaluation: every unit of every protocol on every subject, journalled, then the report.

Knows nothing of the CLI: ``run_evaluation`` takes settings, subjects, checked cases and a report folder, reports
progress through callbacks and returns the report. SIGTERM/SIGUSR1 and a first Ctrl-C stop it between cases and
between the sliding windows of a scan (a few-shot run stops after its step, or in its validation, and keeps its
last.pt); finished units stay in the journal and the report is written from them, so ``--resume`` continues where it
stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctmae.experiments.evaluate.cases import EvalCases, PreparedCases, shot_subset
from ctmae.experiments.evaluate.fewshot import drop_checkpoints, run_fewshot, seg_config
from ctmae.experiments.evaluate.journal import Journal
from ctmae.experiments.evaluate.probe import (
    Featurizer,
    ProbeResult,
    encoder_featurizer,
    intensity_featurizer,
    mean_of_draws,
    run_probe,
)
from ctmae.experiments.evaluate.recon import run_recon
from ctmae.experiments.evaluate.report import write_report
from ctmae.experiments.evaluate.settings import EvalSettings
from ctmae.experiments.evaluate.subjects import Subject, Unit, plan_units
from ctmae.infer.sliding import LoadedModel
from ctmae.mae.checkpoint import load_checkpoint, model_from_checkpoint
from ctmae.mae.model import MaskedAutoencoder3D, build_model
from ctmae.runtime.device import resolve_device
from ctmae.runtime.signals import StopFlag, Stopped

JOURNAL = "journal.jsonl"


@dataclass
class Progress:
    """Callbacks of a running evaluation (all optional)."""

    start: Callable[[int, int], None] | None = None  # (total ticks, ticks already done by earlier runs)
    unit: Callable[[str], None] | None = None  # a unit begins: its description
    tick: Callable[[int], None] | None = None  # ticks done


def run_evaluation(
    settings: EvalSettings,
    subjects: Sequence[Subject],
    cases: EvalCases,
    out: Path,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or continue) the evaluation and write report.json, report.md, report.png and cases.csv into ``out``.

    Returns:
        The report (as report.json holds it), plus ``stopped`` (None or the signal's name) and ``interrupted``.
    """
    progress = progress or Progress()
    header = {
        "settings": settings.result_key(),
        "checkpoints": [s.sha256 for s in subjects if s.kind == "pretrained"],
        "cases": cases.ids(),
        **cases.describe_classes(),
    }
    journal = Journal(out / JOURNAL, header, resume)
    units = plan_units(subjects, settings, len(cases.pool), len(cases.test))
    if progress.start:
        progress.start(sum(u.ticks for u in units), sum(u.ticks for u in units if u.id in journal.done))
    worker = _Worker(settings, cases, out, PreparedCases(cases.class_map.remap()))
    stopped = None
    with StopFlag(on_ctrl_c="stopping after this window or case; finished units are kept") as flag:
        worker.flag = flag
        try:
            for unit in units:
                if unit.id in journal.done:
                    continue
                if progress.unit:
                    progress.unit(describe(unit))
                result = worker.run(unit, progress.tick)
                if "stopped" in result:
                    stopped = "SIGINT" if result["interrupted"] else result["stopped"]
                    break
                journal.record(unit.id, result)
                if unit.protocol == "fewshot":
                    drop_checkpoints(worker.run_dir(unit))
        except Stopped as e:  # between cases or sliding windows: the unit's partial work is dropped
            stopped = e.signal
        finally:
            report = write_report(out, settings, subjects, cases, journal.done, units)
    return {**report, "stopped": stopped, "interrupted": stopped == "SIGINT"}


def describe(unit: Unit) -> str:
    """How the progress bar names a unit: "probe last.pt", "fewshot scratch (tiny) k=2 #1"."""
    shots = f" k={unit.k} #{unit.repeat}" if unit.protocol == "fewshot" else ""
    return f"{unit.protocol} {unit.subject.label}{shots}"


@dataclass
class _Worker:
    settings: EvalSettings
    cases: EvalCases
    out: Path
    prepared: PreparedCases
    flag: StopFlag | None = None

    def run(self, unit: Unit, tick: Callable[[int], None] | None) -> dict[str, Any]:
        def on_case() -> None:
            if tick:
                tick(1)
            if self.flag is not None and self.flag.signal:
                raise Stopped(self.flag.signal)

        if unit.protocol == "probe":
            return self._probe(unit.subject, on_case)
        if unit.protocol == "recon":
            return self._recon(unit.subject, on_case)
        return self._fewshot(unit, tick)

    def run_dir(self, unit: Unit) -> Path:
        return self.out / "fewshot" / unit.subject.slug / f"k{unit.k}_r{unit.repeat}"

    def _model(self, subject: Subject, draw: int = 0) -> tuple[MaskedAutoencoder3D, dict[str, Any] | None]:
        """The subject's MAE in eval mode on the device, and the checkpoint's weights (None for a scratch twin, whose
        initialisation ``draw`` picks)."""
        device = resolve_device(self.settings.device)
        if subject.kind == "pretrained":
            state = load_checkpoint(subject.path)
            return model_from_checkpoint(state).to(device).eval(), state["model"]
        with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
            torch.manual_seed(self.settings.seed + draw)
            return build_model(subject.cfg.model).to(device).eval(), None

    def _probe(self, subject: Subject, on_case: Callable[[], None]) -> dict[str, Any]:
        s, data = self.settings, subject.cfg.preprocess
        train, test = self.prepared.get(data, self.cases.pool), self.prepared.get(data, self.cases.test)
        p, classes = subject.cfg.model.patch, self.cases.classes

        def fit(featurize: Featurizer) -> ProbeResult:
            return run_probe(
                featurize, train, test, classes, p, s.probe_steps, s.probe_lr, s.seed, s.probe_tokens, on_case
            )

        if subject.kind == "intensity":
            return fit(intensity_featurizer(p)).to_dict()
        results = []
        for draw in range(s.probe_draws if subject.kind == "scratch" else 1):
            model, _ = self._model(subject, draw)
            loaded = LoadedModel(model, subject.cfg, subject.step, next(model.parameters()).device)
            results.append(fit(encoder_featurizer(loaded, s.batch_windows)))
        return mean_of_draws(results).to_dict()

    def _recon(self, subject: Subject, on_case: Callable[[], None]) -> dict[str, Any]:
        model, _ = self._model(subject)
        test = self.prepared.get(subject.cfg.preprocess, self.cases.test)
        use_model = not subject.cfg.model.norm_pix_loss  # normalised targets carry no intensity scale
        device = next(model.parameters()).device
        s = self.settings
        result = run_recon(model, subject.cfg.mask, test, s.recon_windows, s.seed, device, use_model, on_case)
        if not use_model:
            result["note"] = "norm_pix_loss checkpoint: its predictions have no intensity scale; fills only"
        return result

    def _fewshot(self, unit: Unit, tick: Callable[[int], None] | None) -> dict[str, Any]:
        s, subject = self.settings, unit.subject
        pretrained = subject.path if subject.kind == "pretrained" else ""
        cfg = seg_config(subject.cfg, s, self.cases.class_map, unit.repeat, pretrained)
        weights = load_checkpoint(subject.path)["model"] if pretrained else None
        train = shot_subset(self.cases.pool, unit.k, unit.repeat, s.seed)
        test = self.cases.test
        last = [0]

        def stepped(step: int) -> None:
            if tick:
                tick(step - last[0])
            last[0] = step

        prepared = lambda: self.prepared.get(cfg.preprocess, test)  # noqa: E731
        result = run_fewshot(cfg, train, test, prepared, self.run_dir(unit), weights, stepped)
        if tick and "stopped" not in result:
            tick(unit.ticks - last[0])
        return result
