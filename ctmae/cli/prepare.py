"""``ctmae prepare``: build the preprocessing cache as a job of its own (CPU nodes, before GPU time), skip and report
bad scans, and write and print a summary of the dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ctmae.cli.common import (
    UsageError,
    app,
    console,
    note,
    progress_bar,
    report_skipped,
    run_command,
    use_resources,
    warn,
)
from ctmae.cli.options import Inputs, Modality, Threads
from ctmae.io.checks import InputError
from ctmae.io.discovery import check_modality, find_volumes, skipped_only
from ctmae.mae.config import RunConfig
from ctmae.preprocess.config import default_cache_dir


def _config(config: Optional[Path], spacing: Optional[float], crop: Optional[int], cache_dir: Optional[Path]):
    """The run settings: pretraining's defaults, a pretraining YAML, then the options (``preprocess`` section)."""
    try:
        run = RunConfig.load_yaml(config, base=RunConfig()) if config is not None else RunConfig()
        given = {"spacing": (spacing,) * 3 if spacing else None, "crop": crop}
        given["cache_dir"] = str(cache_dir) if cache_dir else None
        return run.replace(preprocess={k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_summary(summary: dict, path: Path) -> None:
    table = Table(title="dataset summary", show_header=False)
    ranges = {k: summary[k] for k in ("spacing_mm", "shape", "cached_shape")}
    hu = summary["hu_percentiles"]
    rows = {
        "scans": summary["scans"],
        "skipped": len(summary["skipped"]),
        **{
            f"{name.replace('_mm', ' (mm)').replace('_', ' ')} min..max": "-"
            if r is None
            else " x ".join(f"{a:g}..{b:g}" for a, b in zip(r["min"], r["max"]))
            for name, r in ranges.items()
        },
        "HU percentiles 1/50/99": "-" if hu is None else " / ".join(f"{v:g}" for v in hu.values()),
        "modalities": ", ".join(f"{k}: {v}" for k, v in summary["modalities"].items()) or "-",
        "cache bytes": f"{summary['cache_bytes']:,} ({(summary['cache_fraction_of_float32'] or 0):.3f} of float32)",
        "summary": str(path),
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def prepare(
    inputs: Inputs,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help=f"Cache folder, shared with pretrain's --cache-dir (default: {default_cache_dir()})"),
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Processes building entries (default: the cores of the CPU budget)", min=0)
    ] = None,
    threads: Threads = None,
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="Build share I of N (0 <= I < N; a SLURM array's task), summarised as dataset.shard-I-of-N.json"
        ),
    ] = None,
    spacing: Annotated[Optional[float], typer.Option(help="Isotropic target spacing in mm (default: 1.5)")] = None,
    crop: Annotated[
        Optional[int], typer.Option(help="Crop edge pretraining will use; small scans are padded to it (default: 96)")
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(help="A pretraining YAML (or a run's config.yaml): its data settings, then the options."),
    ] = None,
    modality: Modality = None,
) -> None:
    """Build the preprocessing cache for pretraining (and fine-tuning) as its own job, with a dataset summary.

    Entries already built are kept (a valid one is found without reading its scan), so the command can be rerun
    after adding scans or after a failure. pretrain with the same --cache-dir, --spacing and --crop reads them.
    """

    def body() -> None:
        from ctmae.preprocess.prepare import Shard, prepare_dataset, write_summary

        try:
            part = Shard.parse(shard) if shard else None
        except ValueError as e:
            raise UsageError(str(e)) from None
        cfg = _config(config, spacing, crop, cache_dir)
        sources, problems = find_volumes([str(p) for p in inputs])
        sources, lines = check_modality(sources, modality)
        if modality:
            problems += lines
        else:
            for line in lines:
                warn(line)
        mine = part.select(sources) if part else sources
        count = use_resources(threads, "cpu", 0).budget.cores if workers is None else workers
        with progress_bar() as progress:
            task = progress.add_task(f"preparing {len(mine)} scan(s), {count} worker(s)", total=len(mine), info="")

            def done() -> None:
                progress.advance(task)
                state = progress.tasks[task]
                progress.update(task, info=f"{state.completed / max(state.elapsed or 0.0, 1e-9):.2f} scans/s")

            summary, bad = prepare_dataset(
                mine,
                cfg.preprocess,
                skipped=skipped_only(problems) if not part else [],
                workers=count,
                min_edge=cfg.model.patch,
                on_scan=done,
                on_note=note,
            )
        report_skipped(problems + bad)
        path = write_summary(cfg.preprocess.cache_dir, summary, part)
        _print_summary(summary, path)
        if not summary["scans"] and mine:
            raise InputError(f"no usable scan among the inputs ({len(summary['skipped'])} skipped)")

    run_command(body)
