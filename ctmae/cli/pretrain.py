"""``ctmae pretrain``: find and cache the scans, train the MAE, print a summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ctmae.cli.common import (
    INPUTS_HELP,
    THREADS_HELP,
    WORKERS_HELP,
    UsageError,
    announce_start,
    app,
    check_steps_or_epochs,
    console,
    end_stopped_run,
    errors,
    open_run_dir,
    progress_bar,
    report_skipped,
    run_command,
    sample_data_dir,
    use_resources,
)
from ctmae.io.checks import InputError
from ctmae.io.discovery import check_modality, find_volumes, skipped_only
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import MODEL_PRESETS, RunConfig
from ctmae.mae.context import context_problem, context_warnings
from ctmae.mae.masking import MASKS
from ctmae.runtime.distributed import DistInfo, barrier, cleanup, gather

if TYPE_CHECKING:
    from ctmae.experiments.monitor import TrainingMonitor

# With no INPUTS, `ctmae pretrain` is a short CPU demo on the bundled scans (lower slabs of two patients); options
# given explicitly still win. The recipe is the best measured by benchmarks/recipe.py (BENCHMARKS.md, issue 18): 64³
# crops, the loss on every hidden token, a decoder that predicts the residual over a gaussian fill (sigma 8) with
# queries that read the fills around them, batch 8 at learning rate 3e-3, each batch 8 crops of one scan, scaled by
# 1/1.25 to 1.25, intensities bent by a gamma in [1/1.25, 1.25] (benchmarks/lopo.py's contrast25: the best
# leave-one-patient-out margin of the levers measured, BENCHMARKS.md "Generalisation to unseen patients"). Loader
# workers are planned from the CPU budget: none below four cores, where they slow the step.
DEMO = {
    "model": {"size": "tiny", "fill_sigma": 8.0, "fill_queries": True},
    "data": {"crop": 64, "crops_per_volume": 8, "zoom": 0.25, "contrast": 0.25},
    "mask": {"predict_ratio": 0.75},
    "train": {"steps": 1400, "batch_size": 8, "lr": 3e-3, "log_every": 10},
}  # benchmarks/recipe_table.py's demo-cpv8-zoom with benchmarks/lopo.py's contrast25
DEMO_OUT = Path("runs/demo")


def _given(**sections: dict) -> dict:
    """Drop options the user did not give (None), keeping the nested config layout."""
    return {name: {k: v for k, v in values.items() if v is not None} for name, values in sections.items()}


def _volumes(inputs: list[Path], cfg: RunConfig, dist: DistInfo, modality: str | None, run_dir: Path):
    """Find and cache the input volumes, reporting skipped ones and voxel-identical duplicates (used once), and
    write RUN_DIR/inputs.csv; InputError when none is usable.

    Under torchrun the ranks preprocess disjoint shares of the volumes, then meet at a barrier: each volume is
    cached once, by one process (cache files are written atomically, so a reader never sees half of one).
    """
    from ctmae.preprocess.build_cache import build_cache
    from ctmae.preprocess.cache import VolumeCache
    from ctmae.preprocess.inventory import inventory, used_sources, write_inventory

    sources, problems = find_volumes([str(p) for p in inputs])
    sources, lines = check_modality(sources, modality)
    if modality:
        problems += lines
    else:
        for line in lines:
            errors.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    mine = sources[dist.rank :: dist.world]
    with progress_bar() as progress:
        task = progress.add_task("preprocessing", total=len(mine), info="")
        ready, bad = build_cache(
            mine,
            cfg.data,
            on_volume=lambda: progress.advance(task),
            min_edge=cfg.model.patch,
            on_note=lambda line: console.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False),
        )
    barrier(dist)
    ready_ids, bad = set(gather([s.id for s in ready], dist)), gather(bad, dist)
    good = [s for s in sources if s.id in ready_ids]
    report_skipped(problems + bad)
    count = len(skipped_only(problems)) + len(bad)  # a note on ignored files skips no volume
    if not good:
        raise InputError(f"no usable volume among the inputs ({count} skipped)")
    rows, duplicates = inventory(good, VolumeCache(cfg.data))
    for line in duplicates:
        errors.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    if dist.is_main:
        write_inventory(run_dir / "inputs.csv", rows)
    good = used_sources(good, rows)
    skipped = f", {count} skipped" if count else ""
    twins = f", {len(duplicates)} duplicate(s) used once" if duplicates else ""
    listed = f"; inventory: {run_dir / 'inputs.csv'}" if dist.is_main else ""
    console.print(
        f"{len(good)} volume(s) ready{skipped}{twins}; cache: {cfg.data.cache_dir}{listed}",
        highlight=False,
        soft_wrap=True,
    )
    return good


@app.command()
def pretrain(
    inputs: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help=f"{INPUTS_HELP} None: a short demo on the bundled sample_data (tiny model, CPU-sized).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help=f"Run folder for config, metrics, logs and checkpoints. Required with INPUTS; the demo's default is "
            f"{DEMO_OUT}.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(
            help="YAML file with data/model/mask/train sections (as a run's "
            "config.yaml); options given here override it."
        ),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help=f"Size preset: {'|'.join(MODEL_PRESETS)} (default: base)")
    ] = None,
    crop: Annotated[Optional[int], typer.Option(help="Cubic crop edge in voxels (default: 96)")] = None,
    patch: Annotated[Optional[int], typer.Option(help="Cubic patch edge in voxels (default: 16)")] = None,
    mask: Annotated[Optional[str], typer.Option(help=f"Corruption: {'|'.join(MASKS)} (default: block)")] = None,
    mask_ratio: Annotated[Optional[float], typer.Option(help="Share of patches hidden (default: 0.75)")] = None,
    block: Annotated[Optional[int], typer.Option(help="Block edge in patches for --mask block (default: 2)")] = None,
    predict_ratio: Annotated[
        Optional[float],
        typer.Option(help="Share of all tokens the loss covers each step, drawn from the hidden ones (default: 0.25)"),
    ] = None,
    noise_std: Annotated[Optional[float], typer.Option(help="Noise std for --mask noise (default: 0.1)")] = None,
    spacing: Annotated[Optional[float], typer.Option(help="Isotropic target spacing in mm (default: 1.5)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (default: 1000)")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over all crops, instead of --steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Crops per step (default: 2)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: 1.5e-4)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for weights, data order, crops, masks (default: 0)")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|cuda (default: auto)")] = None,
    precision: Annotated[
        Optional[str], typer.Option(help="auto|bf16|fp16|fp32; auto = bf16 on GPU, fp32 on CPU")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help=WORKERS_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Preprocessing cache (default: ~/.cache/ctmae)")] = None,
    modality: Annotated[
        Optional[str],
        typer.Option(
            help="Keep only DICOM series of this modality (e.g. CT); by default non-CT series are used with a warning."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoints/last.pt (fresh if none yet).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace ctmae's outputs in a non-empty RUN_DIR.")
    ] = False,
    stop_at: Annotated[
        Optional[int],
        typer.Option(
            help="Checkpoint and stop after this step (e.g. the end of a job's time slot); --resume continues."
        ),
    ] = None,
    probe_images: Annotated[
        Optional[list[Path]],
        typer.Option(
            help="Labelled scans for a frozen probe during training (with --probe-labels, or one datalist / "
            "nnU-Net folder): probe_dice in metrics.jsonl."
        ),
    ] = None,
    probe_labels: Annotated[
        Optional[list[Path]], typer.Option(help="Labels of --probe-images, paired by name.")
    ] = None,
    probe_every: Annotated[
        Optional[int], typer.Option(help="Steps between probes (default: the checkpoint interval, 500)")
    ] = None,
    preview_every: Annotated[
        Optional[int],
        typer.Option(help="Steps between reconstruction previews in RUN_DIR/previews/ (default: 500; 0: none)"),
    ] = None,
) -> None:
    """Pretrain a 3D masked autoencoder on CT scans."""

    def body() -> None:
        from ctmae.preprocess.contract import preprocessing_change

        check_steps_or_epochs(steps, epochs)
        if out is None and inputs:
            raise UsageError("--out RUN_DIR is required when INPUTS are given")
        run_dir = out or DEMO_OUT
        dist = open_run_dir(run_dir, resume, overwrite, device)
        scans = inputs or [sample_data_dir() / "demo" / "pretrain"]  # the upper slab stays held out
        last = run_dir / "checkpoints" / "last.pt"
        base = load_checkpoint(last)["config"] if resume and last.is_file() else None
        if base is not None:  # loader workers belong to the machine, not the run: a requeued job plans its own
            base = base.replace(data={"workers": None})
        try:
            cfg = base or (RunConfig() if inputs else RunConfig.from_dict(DEMO))
            if config is not None:
                cfg = RunConfig.load_yaml(config, base=cfg)
            cfg = cfg.replace(
                **_given(
                    model={"size": model, "patch": patch},
                    data={
                        "crop": crop,
                        "workers": workers,
                        "cache_dir": str(cache_dir) if cache_dir else None,
                        "spacing": (spacing,) * 3 if spacing else None,
                    },
                    mask={
                        "kind": mask,
                        "ratio": mask_ratio,
                        "block": block,
                        "predict_ratio": predict_ratio,
                        "noise_std": noise_std,
                    },
                    train={
                        "steps": steps,
                        "epochs": epochs,
                        "batch_size": batch_size,
                        "lr": lr,
                        "seed": seed,
                        "device": device,
                        "precision": precision,
                    },
                )
            )
            if epochs is not None and steps is None:
                cfg = cfg.replace(train={"steps": None})
        except ValueError as e:
            raise UsageError(str(e)) from None
        change = base and preprocessing_change(base.data, cfg.data)
        if change:  # the checkpoint's encoder learned from that preprocessing: a resumed run keeps it
            raise UsageError(f"--resume: {change} ({last}); resume without changing it, or start a new RUN_DIR")
        problem = context_problem(cfg)
        if problem:
            raise UsageError(problem)
        for line in context_warnings(cfg):
            errors.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
        crop_bytes = cfg.data.crop**3 * 4  # float32
        res = use_resources(threads, cfg.train.device, cfg.data.workers, cfg.data.crops_per_volume * crop_bytes)
        cfg = cfg.replace(data={"workers": res.workers})
        probe = _probe_cases(cfg, probe_images, probe_labels, probe_every) if dist.is_main else None
        sources = _volumes(scans, cfg, dist, modality, run_dir)
        monitor = _monitor(cfg, run_dir, sources[0], probe, probe_every, preview_every) if dist.is_main else None
        result = _train(cfg, sources, run_dir, resume, stop_at, dist, monitor)
        cleanup(dist)
        _print_summary(result)
        end_stopped_run(result)

    run_command(body)


def _probe_cases(cfg: RunConfig, images: Optional[list[Path]], labels: Optional[list[Path]], every: Optional[int]):
    """The in-training probe's labelled cases, checked and preprocessed (None without --probe-images)."""
    from ctmae.experiments.monitor import ProbeCases
    from ctmae.seg.data import find_cases

    if not images:
        if labels or every:
            raise UsageError("--probe-labels and --probe-every need --probe-images")
        return None
    if every is not None and every < 1:
        raise UsageError(f"--probe-every must be >= 1, got {every}")
    return ProbeCases.prepare(find_cases([str(p) for p in images], [str(p) for p in labels or []]), cfg)


def _monitor(cfg: RunConfig, run_dir: Path, first_scan, probe, probe_every, preview_every) -> TrainingMonitor:
    """Rank 0's probe-and-preview hook (``ctmae.experiments.monitor``)."""
    from ctmae.experiments.monitor import TrainingMonitor

    if preview_every is not None and preview_every < 0:
        raise UsageError(f"--preview-every must be >= 0, got {preview_every}")
    return TrainingMonitor.for_run(cfg, run_dir, first_scan, probe, probe_every, preview_every)


def _train(
    cfg: RunConfig,
    sources: list,
    run_dir: Path,
    resume: bool,
    stop_at: Optional[int],
    dist: DistInfo,
    monitor: Optional[TrainingMonitor] = None,
) -> dict:
    """Run the pretraining loop under a progress bar (steps, loss, crops/s, probe Dice, ETA)."""
    from ctmae.mae.train import pretrain as run_pretrain

    with progress_bar() as progress:
        task = progress.add_task("pretraining", total=None, info="")

        def started(info: dict) -> None:
            progress.update(task, total=info["total_steps"], completed=info["start_step"])
            announce_start(run_dir, resume, info["start_step"])
            console.print(
                f"training on {info['device']} ({info['precision']}), {cfg.model.size} model, "
                f"mask {cfg.mask.kind}, global batch {info['global_batch']}",
                highlight=False,
                soft_wrap=True,
            )

        def stepped(info: dict) -> None:
            if info["loss"] is not None:
                probe = (
                    f"  probe Dice {monitor.last['probe_dice']:.3f}" if monitor and "probe_dice" in monitor.last else ""
                )
                progress.update(task, info=f"loss {info['loss']:.4f}  {info['crops_per_s']:.1f} crops/s{probe}")
            progress.update(task, completed=info["step"])

        return run_pretrain(
            cfg,
            sources,
            run_dir,
            resume=resume,
            stop_at=stop_at,
            dist=dist,
            on_start=started,
            on_step=stepped,
            monitor=monitor,
        )


def _print_summary(result: dict) -> None:
    table = Table(title="pretraining summary", show_header=False)
    keys = ("start_step", "steps", "total_steps", "first_loss", "last_loss", "crops_per_s", "device", "precision")
    for key in (*keys, "checkpoint"):
        value = result[key]
        if value is not None:
            table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
