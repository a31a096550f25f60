"""Options several commands share, declared once: the same name, type and help wherever they appear.

Use them as parameter types, with the default in the signature: ``threads: Threads = None``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ctmae.cli.common import INPUTS_HELP, THREADS_HELP, WORKERS_HELP, UsageError

DEVICES = ("auto", "cpu", "cuda")

Threads = Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)]
Workers = Annotated[Optional[int], typer.Option(help=WORKERS_HELP)]
Device = Annotated[str, typer.Option(help="|".join(DEVICES))]
# sliding-window inference (reconstruct, embed): how many windows the model sees at once
WindowBatch = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.", min=1)]
Inputs = Annotated[list[Path], typer.Argument(help=INPUTS_HELP, show_default=False)]


def check_device(device: str) -> None:
    """Refuse a --device ctmae does not know (UsageError), before any model is loaded."""
    if device not in DEVICES:
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")


# the training commands (pretrain, finetune-seg)
TrainDevice = Annotated[Optional[str], typer.Option(help="auto|cpu|cuda (default: auto)")]
Precision = Annotated[Optional[str], typer.Option(help="auto|bf16|fp16|fp32; auto = bf16 on GPU, fp32 on CPU")]
Steps = Annotated[Optional[int], typer.Option(help="Optimiser steps (default: 1000)")]
Epochs = Annotated[Optional[float], typer.Option(help="Passes over all training crops, instead of --steps")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoints/last.pt (fresh if none yet).")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace ctmae's outputs in a non-empty RUN_DIR.")]
StopAt = Annotated[
    Optional[int],
    typer.Option(help="Checkpoint and stop after this step (e.g. the end of a job's time slot); --resume continues."),
]
# the commands that read scans for a cache (prepare, pretrain)
Modality = Annotated[
    Optional[str],
    typer.Option(
        help="Keep only DICOM series of this modality (e.g. CT); by default non-CT series are used with a warning."
    ),
]
