"""``ctmae.segment``: label new scans with a fine-tuned segmenter, one label volume per scan on that scan's grid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctmae.api.common import SILENT, OptionError, Reporter


@dataclass(frozen=True)
class Segmentation:
    """What ``segment`` wrote, and what it left out."""

    out: Path
    written: tuple[Path, ...]  # <name>.nii.gz per segmented scan, in input order; <name>.json beside each names classes
    scans: int  # volumes found among the inputs; fewer were written when a stop signal came
    skipped: tuple[str, ...]  # inputs left out, one line each
    warnings: tuple[str, ...]  # scans unlike the checkpoint's preprocessing (spacing, intensities)
    stopped: str | None  # the stop signal that ended the work between windows, or None


def segment(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    device: str = "auto",
    reporter: Reporter = SILENT,
) -> Segmentation:
    """Segment every scan among ``inputs`` with a ``ctmae finetune-seg`` checkpoint.

    Each label volume has its scan's shape and affine exactly and holds class indices (0: background); the JSON
    beside it names them (``ctmae.seg.predict``).

    Args:
        checkpoint: ``best.pt`` or ``last.pt`` of a fine-tuning run.
        inputs: files, folders (searched recursively), DICOM series folders or .txt/.csv lists of them.
        out: folder for the label files (created); inputs are never overwritten.
        device: auto, cpu or cuda.
        reporter: hears the volumes done (one line each), the sliding windows, the warnings and skipped inputs.

    Raises:
        OptionError: no inputs, or ``out`` is a file. InputError: no usable volume among the inputs, or one that
        cannot be read. CheckpointError: not a fine-tuned segmentation checkpoint.
    """
    from ctmae.io.checks import InputError
    from ctmae.io.discovery import find_volumes, skipped_only
    from ctmae.preprocess.contract import checkpoint_preprocessing, source_warnings
    from ctmae.runtime.signals import Stopped
    from ctmae.seg.predict import predict

    out = Path(out)
    if not inputs:
        raise OptionError("no INPUTS given: name the scans to segment")
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: --out must be a folder, but a file is there")
    sources, problems = find_volumes([str(p) for p in inputs])
    reporter.skipped(problems)
    if not sources:
        raise InputError(f"no usable volume among the inputs ({len(skipped_only(problems))} skipped)")
    trained = checkpoint_preprocessing(checkpoint)
    warnings = source_warnings(trained, sources) if trained else []  # the segmenter's input contract
    for line in warnings:
        reporter.warn(line)
    reporter.start("segmenting", len(sources))
    written: list[Path] = []

    def done(info: dict[str, Any]) -> None:
        written.append(info["path"])
        counts = ", ".join(f"{n} {v}" for n, v in zip(info["class_names"], info["voxels_per_class"]))
        reporter.advance(f"{info['source'].id} -> {info['path']}  voxels per class: {counts}")

    stopped = None
    try:
        predict(checkpoint, sources, out, device=device, on_volume=done, on_windows=reporter.windows)
    except Stopped as e:  # between windows: the volumes finished so far are written whole
        stopped = e.signal
    return Segmentation(out, tuple(written), len(sources), tuple(problems), tuple(warnings), stopped)
