"""``ctmae.pretrain``: find and cache the scans, train the masked autoencoder, write a run folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctmae.api.common import SILENT, OptionError, Reporter
from ctmae.api.runs import last_checkpoint, open_run_dir, plan_workers, rank_reporter, training_callbacks

if TYPE_CHECKING:
    from ctmae.io.discovery import VolumeSource
    from ctmae.mae.config import RunConfig
    from ctmae.runtime.distributed import DistInfo


@dataclass(frozen=True)
class Pretraining:
    """What ``pretrain`` did: the run folder, its figures, and what it left out or warned about."""

    out: Path  # config.yaml, metrics.jsonl, train.log, inputs.csv, checkpoints/ (last.pt: what resume continues)
    checkpoint: Path  # out/checkpoints/last.pt, the encoder to reconstruct, embed, export or fine-tune from
    figures: dict[str, Any]  # start_step, steps, total_steps, first_loss, last_loss, crops_per_s, device, precision,
    # stopped (None, or why the run ended early), interrupted (the stop was Ctrl-C), ...
    volumes: int  # scans trained on (voxel-identical duplicates used once)
    skipped: tuple[str, ...]  # inputs left out, one line each
    warnings: tuple[str, ...]  # settings that may not do well, DICOM series that are not CT
    model: Any  # the trained ``ctmae.mae.model.MaskedAutoencoder3D``, on its training device

    @property
    def stopped(self) -> str | None:
        """Why the run ended early (a stop signal, repeated non-finite losses), or None (``stop_at`` included)."""
        return self.figures["stopped"]


def resumed_config(out: str | os.PathLike) -> RunConfig | None:
    """The config of ``out/checkpoints/last.pt`` (None when there is none), with the loader workers left to plan:
    they belong to the machine, not the run, and a requeued job plans its own."""
    from ctmae.mae.checkpoint import load_checkpoint

    last = last_checkpoint(out)
    return load_checkpoint(last)["config"].replace(data={"workers": None}) if last.is_file() else None


def pretrain(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    modality: str | None = None,
    threads: int | None = None,
    probe_images: Sequence[str | os.PathLike] = (),
    probe_labels: Sequence[str | os.PathLike] = (),
    probe_every: int | None = None,
    preview_every: int | None = None,
    reporter: Reporter = SILENT,
) -> Pretraining:
    """Pretrain a 3D masked autoencoder on the scans among ``inputs`` and write the run into ``out``.

    Under torchrun every rank calls this; the ranks preprocess and train on disjoint shares of the scans, and rank
    0 alone writes files and talks to ``reporter``.

    Args:
        inputs: files, folders (searched recursively), DICOM series folders or .txt/.csv lists of them.
        out: the run folder (created); it must be empty unless ``resume`` or ``overwrite``.
        config: the run's settings (``ctmae.PretrainConfig``, e.g. ``PretrainConfig.recipe("demo")``); None: the
            config of the run being resumed, else the defaults.
        resume: continue from ``out/checkpoints/last.pt`` (start fresh if there is none yet); the config must keep
            the checkpoint's preprocessing.
        overwrite: replace ctmae's outputs in a non-empty ``out``.
        stop_at: checkpoint and stop after this step (the end of a job's time slot); ``resume`` continues.
        modality: keep only DICOM series of this modality (e.g. "CT"); None: other series are used, with a warning.
        threads: CPU cores to keep busy (None: the CPU budget decides; ``ctmae.runtime.cpu``).
        probe_images, probe_labels: labelled scans for a frozen probe during training (probe_dice in
            metrics.jsonl); labels paired by name, or one datalist / nnU-Net folder as ``probe_images``.
        probe_every: steps between probes (None: the checkpoint interval).
        preview_every: steps between reconstruction previews in ``out/previews/`` (None: the checkpoint interval;
            0: none).
        reporter: hears preprocessing and training progress, the run's news lines, warnings and skipped inputs.

    Raises:
        OptionError: a folder that is not empty or writable, a config that cannot work (or that changes a resumed
            run's preprocessing), bad probe settings. InputError: no usable scan among the inputs.
        CheckpointError: a resumed checkpoint that cannot be read.
    """
    from ctmae.mae.config import RunConfig
    from ctmae.mae.context import context_problem, context_warnings
    from ctmae.mae.primus import missing_extra
    from ctmae.mae.train import pretrain as run_pretrain
    from ctmae.preprocess.contract import checkpoint_preprocessing, preprocessing_change
    from ctmae.runtime.distributed import cleanup

    out, last = Path(out), last_checkpoint(out)
    cfg = config or (resumed_config(out) if resume else None) or RunConfig()
    dist = open_run_dir(out, resume, overwrite, cfg.train.device)
    reporter = rank_reporter(reporter, dist)
    trained = checkpoint_preprocessing(last) if resume and last.is_file() else None
    change = trained and preprocessing_change(trained, cfg.preprocess)
    if change:  # the checkpoint's encoder learned from that preprocessing: a resumed run keeps it
        raise OptionError(f"--resume: {change} ({last}); resume without changing it, or start a new RUN_DIR")
    problem = context_problem(cfg) or missing_extra(cfg.model)
    if problem:
        raise OptionError(problem)
    warnings = list(context_warnings(cfg))
    for line in warnings:
        reporter.warn(line)
    item_bytes = cfg.data.crops_per_volume * cfg.preprocess.crop**3 * 4  # one visit's float32 crops
    cfg = cfg.replace(data={"workers": plan_workers(threads, cfg.train.device, cfg.data.workers, item_bytes, reporter)})
    probe = _probe_cases(cfg, probe_images, probe_labels, probe_every) if dist.is_main else None
    if preview_every is not None and preview_every < 0:
        raise OptionError(f"--preview-every must be >= 0, got {preview_every}")
    sources, skipped = _volumes(inputs, cfg, dist, modality, out, reporter, warnings)
    monitor = None
    if dist.is_main:
        from ctmae.experiments.monitor import TrainingMonitor

        monitor = TrainingMonitor.for_run(cfg, out, sources[0], probe, probe_every, preview_every)

    def describe(info: dict[str, Any]) -> list[str]:
        return [
            f"training on {info['device']} ({info['precision']}), {cfg.model.size} model, "
            f"mask {cfg.mask.kind}, global batch {info['global_batch']}"
        ]

    def status(info: dict[str, Any]) -> str:
        if info["loss"] is None:
            return ""
        probed = f"  probe Dice {monitor.last['probe_dice']:.3f}" if monitor and "probe_dice" in monitor.last else ""
        return f"loss {info['loss']:.4f}  {info['crops_per_s']:.1f} crops/s{probed}"

    started, stepped = training_callbacks("pretraining", out, resume, reporter, describe, status)
    figures = run_pretrain(
        cfg, sources, out, resume=resume, stop_at=stop_at, dist=dist, on_start=started, on_step=stepped, monitor=monitor
    )
    cleanup(dist)
    model = figures.pop("model")
    return Pretraining(out, last, figures, len(sources), skipped, tuple(warnings), model)


def _probe_cases(cfg: RunConfig, images: Sequence, labels: Sequence, every: int | None):
    """The in-training probe's labelled cases, checked and preprocessed (None without probe images)."""
    from ctmae.experiments.monitor import ProbeCases
    from ctmae.seg.data import find_cases

    if not images:
        if labels or every:
            raise OptionError("--probe-labels and --probe-every need --probe-images")
        return None
    if every is not None and every < 1:
        raise OptionError(f"--probe-every must be >= 1, got {every}")
    return ProbeCases.prepare(find_cases([str(p) for p in images], [str(p) for p in labels]), cfg)


def _volumes(
    inputs: Sequence, cfg: RunConfig, dist: DistInfo, modality: str | None, out: Path, reporter: Reporter, warned: list
) -> tuple[list[VolumeSource], tuple[str, ...]]:
    """(the usable, cached volumes, the skipped inputs' lines): found, cached, duplicates used once, listed in
    ``out/inputs.csv``; InputError when none is usable. Non-CT series kept (no ``modality``) go into ``warned``.

    Under torchrun the ranks preprocess disjoint shares of the volumes, then meet at a barrier: each volume is
    cached once, by one process (cache files are written atomically, so a reader never sees half of one).
    """
    from ctmae.io.checks import InputError
    from ctmae.io.discovery import check_modality, find_volumes, skipped_only
    from ctmae.preprocess.build_cache import build_cache
    from ctmae.preprocess.cache import VolumeCache
    from ctmae.preprocess.inventory import inventory, used_sources, write_inventory
    from ctmae.runtime.distributed import barrier, gather

    sources, problems = find_volumes([str(p) for p in inputs])
    sources, lines = check_modality(sources, modality)
    if modality:
        problems += lines
    else:
        warned += lines
        for line in lines:
            reporter.warn(line)
    mine = sources[dist.rank :: dist.world]
    reporter.start("preprocessing", len(mine))
    ready, bad = build_cache(
        mine,
        cfg.preprocess,
        on_volume=reporter.advance,
        min_edge=cfg.model.patch,
        on_note=reporter.note,
        workers=cfg.data.workers or 0,
    )
    barrier(dist)
    ready_ids, bad = set(gather([s.id for s in ready], dist)), gather(bad, dist)
    good = [s for s in sources if s.id in ready_ids]
    reporter.skipped(problems + bad)
    count = len(skipped_only(problems)) + len(bad)  # a note on ignored files skips no volume
    if not good:
        raise InputError(f"no usable volume among the inputs ({count} skipped)")
    rows, duplicates = inventory(good, VolumeCache(cfg.preprocess))
    for line in duplicates:
        reporter.note(line)
    if dist.is_main:
        write_inventory(out / "inputs.csv", rows)
    good = used_sources(good, rows)
    skipped = f", {count} skipped" if count else ""
    twins = f", {len(duplicates)} duplicate(s) used once" if duplicates else ""
    listed = f"; cache: {cfg.preprocess.cache_dir}; inventory: {out / 'inputs.csv'}"
    reporter.say(f"{len(good)} volume(s) ready{skipped}{twins}{listed}")
    return good, tuple(problems + bad)
