"""``ctmae reconstruct``: mask one scan, reconstruct it with a pretrained MAE, write NIfTIs, a preview and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ctmae.cli.common import ProgressReporter, app, console, run_command, use_resources
from ctmae.cli.options import Device, Threads, WindowBatch, check_device
from ctmae.mae.masking import MASKS
from ctmae.runtime.signals import StopFlag, Stopped


@app.command()
def reconstruct(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint written by ctmae pretrain (.pt).", show_default=False)
    ],
    input: Annotated[
        Path,
        typer.Argument(
            help="One scan: a NIfTI/NRRD/MHA file, a DICOM series folder or a multi-frame DICOM file.",
            show_default=False,
        ),
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
    adapt_steps: Annotated[
        int,
        typer.Option(
            help="First train a copy of the model this many steps on the scan's own visible voxels (test-time "
            "training): for a patient or body region pretraining never saw (0: none; 500 take 1 to 3 minutes on a "
            "2-core CPU, by scan size)",
            min=0,
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the mask and the noise; the same seed repeats a run.")] = 0,
    device: Device = "auto",
    batch_size: WindowBatch = 2,
    threads: Threads = None,
) -> None:
    """Mask a scan, reconstruct it, and write the result on the scan's own grid (opens in 3D Slicer / ITK-SNAP)."""

    def body() -> None:
        from ctmae.api.reconstruct import reconstruct as run_reconstruct

        check_device(device)
        use_resources(threads, device, 0, show=False)  # one scan, one result line: the budget is not news here
        with StopFlag(on_ctrl_c="stopping after this window") as flag, ProgressReporter() as reporter:
            try:
                done = run_reconstruct(
                    checkpoint,
                    input,
                    out,
                    mask=mask,
                    mask_ratio=mask_ratio,
                    block=block,
                    mask_unit=mask_unit,
                    window_step=window_step,
                    adapt_steps=adapt_steps,
                    seed=seed,
                    device=device,
                    batch_size=batch_size,
                    reporter=reporter,
                )
            except Stopped as e:
                raise Stopped(e.signal, f"nothing written to {out}/") from None
        _summary(done.metrics, out)
        if flag.signal:  # it came once the outputs were being written: they are whole, the exit code says it came
            raise Stopped(flag.signal, f"the outputs were written to {out}/")

    run_command(body)


def _summary(metrics: dict, out: Path) -> None:
    """One line: masked PSNR, the gaussian fill beside it, the shift score, mask ratio and SSIM."""
    masked, fill, shift = metrics["masked"]["psnr"], metrics["fill"], metrics["shift"]
    summary = f"masked PSNR {masked:.2f} dB, " if masked is not None else ""
    if fill["masked_minus_fill_db"] is not None:  # the trivial baseline beside the model, every time
        summary += f"gaussian fill {fill['psnr']:.2f} dB ({fill['masked_minus_fill_db']:+.2f} dB), "
    if shift["shift_score"] is not None:  # how unlike the training scans (ctmae.mae.shift), every time
        summary += f"shift score {shift['shift_score']:.1f} (warning above {shift['threshold']:g}), "
    console.print(
        f"{summary}mask ratio {metrics['mask_ratio']:.3f}, SSIM {metrics['ssim']:.3f}; wrote {out}/",
        highlight=False,
    )
