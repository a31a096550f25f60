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
