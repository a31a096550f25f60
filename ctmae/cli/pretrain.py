"""``ctmae pretrain``: options -> a ``PretrainConfig`` -> ``ctmae.api.pretrain.pretrain`` -> a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ctmae.cli.common import (
    INPUTS_HELP,
    ProgressReporter,
    UsageError,
    app,
    check_steps_or_epochs,
    console,
    end_stopped_run,
    given_options,
    quiet_other_ranks,
    run_command,
    sample_data_dir,
)
from ctmae.cli.options import Modality, Overwrite, Precision, Resume, Steps, StopAt, Threads, TrainDevice, Workers
from ctmae.mae.config import MODEL_PRESETS, PRIMUS_PRESETS, RECIPES, RunConfig, recipe_path
from ctmae.mae.masking import MASKS

# With no INPUTS, `ctmae pretrain` is a short CPU demo on the bundled scans (sample_data/demo/pretrain) with the
# recipe ctmae/recipes/demo.yaml; options given explicitly still win.
DEMO_OUT = Path("runs/demo")


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
            help=f"YAML file with preprocess/data/model/mask/train sections (as a run's config.yaml), or a recipe "
            f"shipped with ctmae: {'|'.join(RECIPES)}; options given here override it."
        ),
    ] = None,
    arch: Annotated[
        Optional[str],
        typer.Option(
            help="Encoder: mae3d (a ViT for MONAI's UNETR) | primus (nnU-Net's Primus, for nnUNetv2_train "
            "-pretrained_weights; needs ctmae[nnunet]) (default: mae3d)"
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            help=f"Size preset: {'|'.join(MODEL_PRESETS)} (default: base); with --arch primus "
            f"{'|'.join(PRIMUS_PRESETS)} (default: b)"
        ),
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
    steps: Steps = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over all crops, instead of --steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Crops per step (default: 2)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: 1.5e-4)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for weights, data order, crops, masks (default: 0)")] = None,
    device: TrainDevice = None,
    precision: Precision = None,
    workers: Workers = None,
    threads: Threads = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Preprocessing cache (default: ~/.cache/ctmae)")] = None,
    modality: Modality = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    stop_at: StopAt = None,
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
        from ctmae.api.pretrain import pretrain as run
        from ctmae.api.pretrain import resumed_config

        check_steps_or_epochs(steps, epochs)
        if out is None and inputs:
            raise UsageError("--out RUN_DIR is required when INPUTS are given")
        run_dir = out or DEMO_OUT
        quiet_other_ranks()
        base = (resumed_config(run_dir) if resume else None) or (RunConfig() if inputs else RunConfig.recipe("demo"))
        given = {
            "model": {"arch": arch, "size": model, "patch": patch},
            "preprocess": {"crop": crop, "cache_dir": str(cache_dir) if cache_dir else None},
            "data": {"workers": workers},
            "mask": {"kind": mask, "ratio": mask_ratio, "block": block, "predict_ratio": predict_ratio},
            "train": {"steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        }
        given["preprocess"]["spacing"] = (spacing,) * 3 if spacing else None
        given["mask"]["noise_std"], given["train"]["device"], given["train"]["precision"] = noise_std, device, precision
        cfg = _config(base, config, given, epochs_only=epochs is not None and steps is None)
        scans = inputs or [sample_data_dir() / "demo" / "pretrain"]  # the upper slab stays held out
        probe = {"probe_images": probe_images or (), "probe_labels": probe_labels or (), "probe_every": probe_every}
        with ProgressReporter() as reporter:
            result = run(
                scans, run_dir, cfg, resume=resume, overwrite=overwrite, stop_at=stop_at, modality=modality,
                threads=threads, preview_every=preview_every, reporter=reporter, **probe,
            )  # fmt: skip
        _print_summary(result.figures)
        end_stopped_run(result.figures)

    run_command(body)


def _config(base: RunConfig, config: Optional[Path], given: dict[str, dict[str, Any]], epochs_only: bool) -> RunConfig:
    """The run's config: ``base`` (a resumed run's, the defaults, or the demo recipe), then the ``--config`` file or
    recipe, then the options given (None: not given); ``--epochs`` alone replaces a step count set before."""
    try:
        cfg = RunConfig.load_yaml(recipe_path(config), base=base) if config is not None else base
        cfg = cfg.replace(**given_options(given))
        return cfg.replace(train={"steps": None}) if epochs_only else cfg
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_summary(figures: dict) -> None:
    table = Table(title="pretraining summary", show_header=False)
    keys = ("start_step", "steps", "total_steps", "first_loss", "last_loss", "crops_per_s", "device", "precision")
    for key in (*keys, "checkpoint"):
        value = figures[key]
        if value is not None:
            table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
