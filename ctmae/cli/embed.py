"""``ctmae embed``: one embedding per scan from a pretrained encoder, streamed, resumable, to .npz/.csv/.parquet."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ctmae.cli.common import (
    INPUTS_HELP,
    THREADS_HELP,
    WORKERS_HELP,
    UsageError,
    app,
    console,
    errors,
    progress_bar,
    report_skipped,
    run_command,
    use_resources,
    windows_bar,
)
from ctmae.io.checks import InputError
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
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help=INPUTS_HELP,
            show_default=False,
        ),
    ],
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
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 2,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help=WORKERS_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
) -> None:
    """Embed scans with a pretrained encoder: one vector per scan (no masking; the whole scan is covered)."""

    def body() -> None:
        from ctmae.infer.embed import check_options
        from ctmae.infer.embed import embed as run_embed
        from ctmae.share.load import load_encoder_model

        if device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
        try:
            check_options(out, pool, tokens)
        except ValueError as e:
            raise UsageError(str(e)) from None
        res = use_resources(threads, device, workers, SCAN_BYTES)  # a worker hands over a whole preprocessed scan
        loaded = load_encoder_model(checkpoint, device)
        loaded = dataclasses.replace(loaded, cfg=loaded.cfg.replace(data={"workers": res.workers}))
        with StopFlag(on_ctrl_c="writing the scans embedded so far") as flag, progress_bar() as progress:
            task = progress.add_task("embedding", total=None, info="")

            def scanned(status: str) -> None:
                progress.advance(task)
                progress.update(task, info=f"{progress.tasks[task].speed or 0.0:.2f} scans/s")

            result = run_embed(
                loaded,
                [str(p) for p in inputs],
                out,
                pool=pool,
                tokens_dir=tokens,
                batch_size=batch_size,
                on_start=lambda n: progress.update(task, total=n),
                on_scan=scanned,
                on_windows=windows_bar(progress),
            )
        report_skipped(result["skipped"])
        for line in result["warnings"]:  # the checkpoint's preprocessing contract (ctmae.preprocess.contract)
            errors.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
        skipped = len(skipped_only(result["skipped"]))  # a note on ignored files skips no scan
        summary = (
            f"embedded {result['embedded']} scan(s), {result['resumed']} already done, "
            f"{skipped} skipped; {result['rows']} row(s) in {out}"
        )
        stopped = result["stopped"] or flag.signal
        if stopped:
            raise Stopped(stopped, f"{summary}; the same command embeds the rest")
        if result["embedded"] + result["resumed"] == 0:
            raise InputError(f"no scan embedded ({skipped} skipped)")
        console.print(summary, highlight=False)

    run_command(body)
