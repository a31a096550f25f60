"""What a user watches while pretraining runs: the frozen probe's Dice and a reconstruction preview, at set steps.

``TrainingMonitor`` is handed to ``ctmae.mae.train.pretrain`` as ``monitor``, which calls it on rank 0 after every
step with the step, the model and the run's ``MetricsLog``. It acts only at multiples of its intervals:

- every ``probe_every`` steps (with labelled probe cases): the frozen probe of
  ``ctmae.experiments.evaluate.probe`` on the current encoder, logged to metrics.jsonl (and TensorBoard) as
  ``probe_dice`` (mean over classes) and ``probe_dice_<c>``;
- every ``preview_every`` steps, and at every probe step: ``ctmae reconstruct``'s preview of one fixed scan, written
  to ``previews/step_NNNNNNN.png`` in the run folder, its masked-voxel PSNR logged as ``preview_psnr_masked``.

The probe's linear classifier is refitted from scratch each time on the probe cases' training share and scored on
the rest (with one probe case, on that same case: then it measures fit, not generalisation). Both run on the
training device under ``torch.random.fork_rng``, so a monitored run trains exactly as an unmonitored one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctmae.experiments.evaluate.cases import PreparedCases, check_cases, split_cases
from ctmae.experiments.evaluate.probe import encoder_featurizer, run_probe
from ctmae.infer.sliding import LoadedModel
from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource
from ctmae.mae.config import RunConfig
from ctmae.mae.model import MaskedAutoencoder3D
from ctmae.runtime.checkpoint import CheckpointError
from ctmae.runtime.metrics_log import MetricsLog
from ctmae.runtime.signals import Stopped
from ctmae.seg.data import LabelledCase

PREVIEWS = "previews"


@dataclass
class ProbeCases:
    """The monitor's labelled cases, preprocessed once with the run's settings."""

    train: list
    test: list
    classes: int
    held_out: bool  # False with a single case: the probe is scored on its own training case
    scan: VolumeSource  # the first test case's image: the scan the previews show

    @staticmethod
    def prepare(cases: Sequence[LabelledCase], cfg: RunConfig, seed: int = 0) -> ProbeCases:
        """Check the pairs (one-line InputError), hold out one case in five (none if there is only one),
        preprocess them."""
        test, pool = (tuple(cases), tuple(cases)) if len(cases) == 1 else split_cases(cases, None, 1, seed)
        classes = check_cases(test, pool).classes
        prepared = PreparedCases()
        train, held = prepared.get(cfg.preprocess, pool), prepared.get(cfg.preprocess, test)
        return ProbeCases(train, held, classes, len(cases) > 1, test[0].image)


class TrainingMonitor:
    """Probe and preview at set steps; see the module docstring. ``last`` holds the latest logged row."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        preview: VolumeSource | None,
        preview_every: int = 0,
        probe: ProbeCases | None = None,
        probe_every: int = 0,
        seed: int = 0,
    ) -> None:
        self.cfg, self.folder, self.name = cfg, Path(run_dir) / PREVIEWS, f"run {Path(run_dir).name}"
        self.preview, self.preview_every = preview, preview_every
        self.probe, self.probe_every, self.seed = probe, probe_every, seed
        self.last: dict[str, Any] = {}
        self._told = False  # whether the log says that a single probe case is not held out

    @classmethod
    def for_run(
        cls,
        cfg: RunConfig,
        run_dir: Path,
        first_scan: VolumeSource,
        probe: ProbeCases | None = None,
        probe_every: int | None = None,
        preview_every: int | None = None,
    ) -> TrainingMonitor:
        """A run's monitor: intervals default to ``train.ckpt_every``; previews show the probe's first test scan,
        or without probe cases the first training scan."""
        every = cfg.train.ckpt_every
        scan = probe.scan if probe is not None else first_scan
        preview = every if preview_every is None else preview_every
        return cls(cfg, run_dir, scan, preview, probe, every if probe_every is None else probe_every, cfg.train.seed)

    def due(self, step: int) -> tuple[bool, bool]:
        """(probe now, preview now) at ``step``."""
        probe = self.probe is not None and self.probe_every > 0 and step % self.probe_every == 0
        every = self.preview_every > 0 and step % self.preview_every == 0
        return probe, self.preview is not None and (every or probe)

    def __call__(self, step: int, model: MaskedAutoencoder3D, log: MetricsLog) -> None:
        probe_now, preview_now = self.due(step)
        if not (probe_now or preview_now):
            return
        device = next(model.parameters()).device
        loaded = LoadedModel(model, self.cfg, step, device)
        was_training = model.training
        row: dict[str, Any] = {"step": step}
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if probe_now:
                    row.update(self._probe(loaded))
                if preview_now:
                    row.update(self._preview(loaded, step, log))
        except Stopped as e:  # between sliding windows: the training loop then checkpoints the step and stops
            log.info(f"step {step}: probe / preview cut short by {e.signal}")
            return
        finally:
            model.train(was_training)
        if len(row) > 1:
            if probe_now and not self.probe.held_out and not self._told:
                log.info("probe_dice is scored on the single probe case it was fitted on: a fit, not held out")
                self._told = True
            log.metrics(row)
            log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
        self.last = row

    def _probe(self, loaded: LoadedModel) -> dict[str, float]:
        p = self.probe
        result = run_probe(
            encoder_featurizer(loaded, 2), p.train, p.test, p.classes, self.cfg.model.patch, seed=self.seed
        )
        return {"probe_dice": result.dice, **{f"probe_dice_{c}": d for c, d in enumerate(result.dice_per_class, 1)}}

    def _preview(self, loaded: LoadedModel, step: int, log: MetricsLog) -> dict[str, float]:
        """``ctmae reconstruct`` of the preview scan into a scratch folder; keep its preview.png as step_N.png."""
        from ctmae.infer.reconstruct import reconstruct

        scratch = self.folder / f".step_{step:07d}.tmp"
        try:
            metrics = reconstruct(
                loaded, _path(self.preview), scratch, self.cfg.mask, seed=self.seed, checkpoint_name=self.name
            )
            os.replace(scratch / "preview.png", self.folder / f"step_{step:07d}.png")
        except (InputError, CheckpointError) as e:  # e.g. a norm_pix_loss model: no previews, training goes on
            log.info(f"step {step}: no preview ({e}); previews are off for this run")
            self.preview = None
            return {}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        psnr = metrics["masked"]["psnr"]
        return {} if psnr is None else {"preview_psnr_masked": psnr}


def _path(source: VolumeSource) -> str:
    """What ``reconstruct`` reads for a volume: its file, or a DICOM series' folder."""
    return source.files[0] if not source.is_dicom else os.path.dirname(source.files[0])
