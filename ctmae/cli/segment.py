"""``ctmae segment``: label new scans with a fine-tuned segmentation checkpoint, one label volume per scan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ctmae.cli.common import ProgressReporter, UsageError, app, console, note, run_command, use_resources
from ctmae.cli.options import Device, Inputs, Threads, check_device
from ctmae.runtime.signals import StopFlag, Stopped

ALIAS_NOTE = "finetune-seg --predict is ctmae segment now: ctmae segment CHECKPOINT INPUTS... --out DIR"


@app.command()
def segment(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A fine-tuned segmentation checkpoint: RUN_DIR/checkpoints/best.pt written by ctmae finetune-seg.",
            show_default=False,
        ),
    ],
    inputs: Inputs,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the label files: <name>.nii.gz on each scan's grid, <name>.json naming its classes.",
        ),
    ] = ...,
    device: Device = "auto",
    threads: Threads = None,
) -> None:
    """Segment scans with a fine-tuned UNETR: one label volume per scan, in the scan's own geometry."""
    run_command(lambda: run_segment(checkpoint, inputs, out, device, threads))


def segment_alias(
    checkpoint: Path, inputs: list[Path], out: Optional[Path], device: str, threads: Optional[int]
) -> None:
    """``finetune-seg --predict CHECKPOINT INPUTS... --out DIR``: says once that it is ``ctmae segment`` now, then
    runs it."""
    note(ALIAS_NOTE)
    if not inputs:
        raise UsageError("--predict needs INPUTS: the scans to segment")
    if out is None:
        raise UsageError("--out PRED_DIR is required: the folder for the label files")
    run_segment(checkpoint, inputs, out, device, threads)


def run_segment(checkpoint: Path, inputs: list[Path], out: Path, device: str, threads: int | None) -> None:
    """The body of ``ctmae segment`` (and of its alias ``finetune-seg --predict``): options checked, the API called
    under a stop flag and a progress bar, a summary line printed."""
    from ctmae.api.segment import segment as run

    check_device(device)
    use_resources(threads, device, 0, show=False)  # one line per scan follows: the budget is not news here
    with StopFlag(on_ctrl_c="stopping after this window") as flag, ProgressReporter() as reporter:
        result = run(checkpoint, inputs, out, device=device, reporter=reporter)
    if flag.signal:  # also when it came after the last window: the exit code says a stop signal came
        done = len(result.written)
        rest = "" if done == result.scans else "; the others were not segmented"
        raise Stopped(flag.signal, f"{done} of {result.scans} label volume(s) written to {out}{rest}")
    console.print(f"{len(result.written)} label volume(s) written to {out}", highlight=False)
