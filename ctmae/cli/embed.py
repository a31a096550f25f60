"""``ctmae embed``: one embedding per scan from a pretrained encoder, streamed, resumable, to .npz/.csv/.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ctmae.cli.common import ProgressReporter, app, console, run_command, use_resources
from ctmae.cli.options import Device, Inputs, Threads, WindowBatch, Workers, check_device
from ctmae.io.discovery import skipped_only
from ctmae.runtime.signals import StopFlag, Stopped

SCAN_BYTES = 256 << 20  # a large preprocessed scan (float32, 400³ voxels): what /dev/shm must hold per item


@app.command()
def embed(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint written by ctmae pretrain (.pt), or an export folder written by ctmae export.",
            show_default=False,
        ),
    ],
    inputs: Inputs,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output table: .npz, .csv or .parquet (needs pyarrow). "
            "Re-running with the same file skips scans already in "
            "it.",
        ),
    ] = ...,
    pool: Annotated[
        str, typer.Option(help="mean|max over all tokens of the scan (cls: the encoder has none).")
    ] = "mean",
    tokens: Annotated[
        Optional[Path],
        typer.Option(help="Also write each scan's token map (D, gx, gy, gz) .npy and its RAS affine .json here."),
    ] = None,
    batch_size: WindowBatch = 2,
    device: Device = "auto",
    workers: Workers = None,
    threads: Threads = None,
) -> None:
    """Embed scans with a pretrained encoder: one vector per scan (no masking; the whole scan is covered)."""

    def body() -> None:
        from ctmae.api.common import OptionError
        from ctmae.api.embed import embed as run_embed
        from ctmae.infer.embed import check_options

        check_device(device)
        try:  # before the CPU budget line: a bad --out or --pool is the whole answer
            check_options(out, pool, tokens)
        except ValueError as e:
            raise OptionError(str(e)) from None
        res = use_resources(threads, device, workers, SCAN_BYTES)  # a worker hands over a whole preprocessed scan
        with StopFlag(on_ctrl_c="writing the scans embedded so far") as flag, ProgressReporter("scans") as reporter:
            result = run_embed(
                checkpoint,
                inputs,
                out,
                pool=pool,
                tokens=tokens,
                batch_size=batch_size,
                device=device,
                workers=res.workers,
                reporter=reporter,
            )
        skipped = len(skipped_only(list(result.skipped)))  # a note on ignored files skips no scan
        summary = (
            f"embedded {result.embedded} scan(s), {result.resumed} already done, "
            f"{skipped} skipped; {result.rows} row(s) in {out}"
        )
        stopped = result.stopped or flag.signal
        if stopped:
            raise Stopped(stopped, f"{summary}; the same command embeds the rest")
        console.print(summary, highlight=False)

    run_command(body)
