"""``ctmae.reconstruct``: mask one scan, let a pretrained MAE fill it in, write the outputs on the scan's own grid."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctmae.api.common import SILENT, OptionError, Reporter


@dataclass(frozen=True)
class Reconstruction:
    """What ``reconstruct`` wrote: the folder, the figures of its metrics.json, and the warnings it gave."""

    out: Path  # input, masked, reconstruction, error and mask .nii.gz, preview.png, metrics.json
    metrics: dict[str, Any]  # metrics.json as written (ctmae.infer.reconstruct.DEFINITIONS says what each means)
    warnings: tuple[str, ...]  # the input against the checkpoint's preprocessing, the scan's shift score


def reconstruct(
    checkpoint: str | os.PathLike,
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mask: str | None = None,
    mask_ratio: float | None = None,
    block: int | None = None,
    mask_unit: int | None = None,
    window_step: int | None = None,
    adapt_steps: int = 0,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 2,
    reporter: Reporter = SILENT,
) -> Reconstruction:
    """Mask one scan, reconstruct it with the MAE of ``checkpoint`` and write the result into ``out``.

    Args:
        checkpoint: a ``.pt`` written by ``ctmae pretrain``.
        input: one scan: a NIfTI/NRRD/MHA file, a DICOM series folder or a multi-frame DICOM file.
        out: folder for the NIfTIs, preview.png and metrics.json (created; those files are replaced).
        mask: masking strategy (``ctmae.mae.masking.MASKS``); None: the checkpoint's.
        mask_ratio: share of patches hidden; None: the checkpoint's.
        block: block edge for the block mask, in mask units; None: the checkpoint's.
        mask_unit: draw the mask on cubes of this many voxels, a multiple of the patch (None: the patch), so that
            checkpoints of different patch sizes are scored on the very same hidden voxels.
        window_step: voxels between overlapping windows, a multiple of the patch up to the crop (None: about 3/4 of
            a crop).
        adapt_steps: first train a copy of the model this many steps on the scan's own visible voxels (test-time
            training, ``ctmae.infer.adapt``): it lifts a model on a patient or body region it never saw. 0: none.
        seed: seeds the mask and the noise; the same seed repeats a run exactly.
        device: auto, cpu or cuda.
        batch_size: windows per forward pass.
        reporter: hears the sliding windows and the warnings.

    Raises:
        OptionError: a mask setting, ``mask_unit`` or ``window_step`` this checkpoint cannot take.
        CheckpointError: the checkpoint is unusable. InputError: the input is not one readable scan.
        Stopped: a stop signal came before the outputs were written (between windows); nothing is written.
    """
    from ctmae.infer.reconstruct import mask_config
    from ctmae.infer.reconstruct import reconstruct as run_reconstruct
    from ctmae.infer.sliding import load_model
    from ctmae.mae.masking import strategy
    from ctmae.preprocess.contract import path_warnings, preprocessing_of

    loaded = load_model(checkpoint, device)
    try:
        mask_cfg = mask_config(loaded, mask, mask_ratio, block)
    except ValueError as e:
        raise OptionError(str(e)) from None
    warnings = path_warnings(preprocessing_of(loaded.cfg.preprocess), input)  # the encoder's input contract
    for line in warnings:
        reporter.warn(line)
    patch, crop = loaded.cfg.model.patch, loaded.cfg.model.img_size
    if mask_unit is not None and (mask_unit < 1 or mask_unit % patch):
        raise OptionError(f"--mask-unit {mask_unit} must be a multiple of the patch size {patch}")
    if window_step is not None and (window_step < 1 or window_step % patch or window_step > crop):
        raise OptionError(f"--window-step {window_step} must be a multiple of the patch size {patch}, at most {crop}")
    if adapt_steps < 0 or (adapt_steps and not strategy(mask_cfg).hides_tokens):
        raise OptionError(f"--adapt-steps {adapt_steps}: needs a mask that hides tokens (block, random) and >= 0")

    def adapting(done: int, total: int) -> None:
        if done == 1:
            reporter.start("test-time training on the scan", total)
        reporter.progress(done)

    metrics = run_reconstruct(
        loaded,
        input,
        out,
        mask_cfg,
        seed=seed,
        batch_size=batch_size,
        checkpoint_name=str(checkpoint),
        mask_unit=mask_unit,
        window_step=window_step,
        on_windows=reporter.windows,
        adapt_steps=adapt_steps,
        on_adapt=adapting,
    )
    margin = metrics["fill"]["masked_minus_fill_db"]
    if margin is not None and margin < 0 and not adapt_steps and loaded.cfg.model.fill_context:
        reporter.note(
            f"{input}: {margin:+.2f} dB against the gaussian fill; on a patient or body region pretraining never saw, "
            f"--adapt-steps 500 first trains a copy of the model on this scan's visible voxels (test-time training; "
            f"1 to 3 minutes on a 2-core CPU, by scan size)"
        )
    shift = metrics["shift"]
    if shift["warning"] or shift["note"]:  # how unlike the training scans (ctmae.mae.shift)
        warnings.append(shift["warning"] or shift["note"])
        reporter.warn(warnings[-1])
    return Reconstruction(Path(out), metrics, tuple(warnings))
