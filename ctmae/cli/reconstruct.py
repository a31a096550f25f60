"""``ctmae reconstruct``: mask one scan, reconstruct it with a pretrained MAE, write NIfTIs, a preview and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ctmae.cli.common import (
    THREADS_HELP,
    UsageError,
    app,
    console,
    errors,
    progress_bar,
    run_command,
    use_resources,
    windows_bar,
)
from ctmae.mae.masking import MASKS
from ctmae.runtime.signals import StopFlag, Stopped


@app.command()
def reconstruct(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint written by ctmae pretrain (.pt).", show_default=False)
    ],
    input: Annotated[
        Path, typer.Argument(help="One scan: a NIfTI/NRRD/MHA file or a DICOM series folder.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the NIfTIs, preview.png, metrics.json.")] = ...,
    mask: Annotated[Optional[str], typer.Option(help=f"{'|'.join(MASKS)} (default: the checkpoint's)")] = None,
    mask_ratio: Annotated[
        Optional[float], typer.Option(help="Share of patches hidden (default: the checkpoint's)")
    ] = None,
    block: Annotated[
        Optional[int],
        typer.Option(help="Block edge for --mask block, in mask units (default: the checkpoint's, in patches)"),
    ] = None,
    mask_unit: Annotated[
        Optional[int],
        typer.Option(
            help="Draw the mask on cubes of this many voxels, a multiple of the patch (default: the patch); "
            "the same --mask-unit and --seed hide the same voxels for checkpoints of different patch sizes",
            min=1,
        ),
    ] = None,
    window_step: Annotated[
        Optional[int],
        typer.Option(
            help="Voxels between overlapping windows, a multiple of the patch (default: about 3/4 of a crop); one "
            "patch averages every hidden voxel over the most contexts, at up to (crop/patch)³ times the work",
            min=1,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the mask and the noise; the same seed repeats a run.")] = 0,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 2,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
) -> None:
    """Mask a scan, reconstruct it, and write the result on the scan's own grid (opens in 3D Slicer / ITK-SNAP)."""

    def body() -> None:
        from ctmae.infer.reconstruct import mask_config
        from ctmae.infer.reconstruct import reconstruct as run_reconstruct
        from ctmae.infer.sliding import load_model
        from ctmae.preprocess.contract import path_warnings, preprocessing_of

        if device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
        use_resources(threads, device, 0, show=False)  # one scan, one result line: the budget is not news here
        loaded = load_model(checkpoint, device)
        try:
            mask_cfg = mask_config(loaded, mask, mask_ratio, block)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for line in path_warnings(preprocessing_of(loaded.cfg.preprocess), input):  # the encoder's input contract
            errors.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
        patch, crop = loaded.cfg.model.patch, loaded.cfg.model.img_size
        if mask_unit is not None and mask_unit % patch:
            raise UsageError(f"--mask-unit {mask_unit} must be a multiple of the patch size {patch}")
        if window_step is not None and (window_step % patch or window_step > crop):
            raise UsageError(
                f"--window-step {window_step} must be a multiple of the patch size {patch}, at most {crop}"
            )
        with StopFlag(on_ctrl_c="stopping after this window") as flag, progress_bar() as progress:
            try:
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
                    on_windows=windows_bar(progress),
                )
            except Stopped as e:
                raise Stopped(e.signal, f"nothing written to {out}/") from None
        shift = metrics["shift"]
        if shift["warning"] or shift["note"]:
            line = escape(shift["warning"] or shift["note"])
            errors.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
        masked, fill = metrics["masked"]["psnr"], metrics["fill"]
        summary = f"masked PSNR {masked:.2f} dB, " if masked is not None else ""
        if fill["masked_minus_fill_db"] is not None:  # the trivial baseline beside the model, every time
            summary += f"gaussian fill {fill['psnr']:.2f} dB ({fill['masked_minus_fill_db']:+.2f} dB), "
        if shift["shift_score"] is not None:  # how unlike the training scans (ctmae.mae.shift), every time
            summary += f"shift score {shift['shift_score']:.1f} (warning above {shift['threshold']:g}), "
        console.print(
            f"{summary}mask ratio {metrics['mask_ratio']:.3f}, SSIM {metrics['ssim']:.3f}; wrote {out}/",
            highlight=False,
        )
        if flag.signal:  # it came once the outputs were being written: they are whole, the exit code says it came
            raise Stopped(flag.signal, f"the outputs were written to {out}/")

    run_command(body)
