"""``ctmae finetune-seg``: options -> a ``FinetuneConfig`` -> ``ctmae.api.finetune.finetune`` -> a summary.
``--predict`` runs ``ctmae segment`` (``ctmae.cli.segment``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from ctmae.cli.classes import ClassesOption, LabelNamesOption
from ctmae.cli.common import (
    ProgressReporter,
    UsageError,
    app,
    check_steps_or_epochs,
    console,
    end_stopped_run,
    given_options,
    quiet_other_ranks,
    run_command,
)
from ctmae.cli.options import Epochs, Overwrite, Precision, Resume, Steps, StopAt, Threads, TrainDevice, Workers
from ctmae.cli.segment import segment_alias

if TYPE_CHECKING:
    from ctmae.api.finetune import Finetuning
    from ctmae.seg.config import SegConfig

PathList = Optional[list[Path]]


@app.command("finetune-seg")
def finetune_seg(
    args: Annotated[
        PathList,
        typer.Argument(
            help="Training: the MAE CHECKPOINT whose encoder starts the UNETR (omit with --from-scratch). "
            "With --predict: the scans to segment.",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        PathList,
        typer.Option(
            help="Training images: files/folders (paired with --labels by file "
            "name), or one .csv/.json datalist (image,label), or one nnU-Net "
            "folder with imagesTr/ and labelsTr/."
        ),
    ] = None,
    labels: Annotated[PathList, typer.Option(help="Label volumes (NIfTI/NRRD/MHA), named as their images.")] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run folder (training) or label folder (--predict).")
    ] = None,
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch", help="Random ViT weights: the baseline (sizes from CHECKPOINT if given, else --model)."
        ),
    ] = False,
    model: Annotated[
        str, typer.Option(help="ViT size preset with --from-scratch and no CHECKPOINT: tiny|small|base")
    ] = "base",
    num_classes: Annotated[
        Optional[int],
        typer.Option(help="Classes incl. background [default: largest label + 1, or the number of --classes + 1]"),
    ] = None,
    classes: ClassesOption = None,
    label_names: LabelNamesOption = None,
    val_fraction: Annotated[float, typer.Option(help="Share of cases held out for validation (seeded)")] = 0.2,
    val_images: Annotated[PathList, typer.Option(help="Validation images instead of --val-fraction")] = None,
    val_labels: Annotated[PathList, typer.Option(help="Validation labels, paired as --labels")] = None,
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: Annotated[int, typer.Option(help="Crops per step")] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine)")] = 1e-4,
    freeze_encoder: Annotated[
        bool, typer.Option("--freeze-encoder", help="Keep the ViT fixed; train the decoder only")
    ] = False,
    layer_decay: Annotated[float, typer.Option(help="Layer-wise LR decay per ViT block (1: off)")] = 1.0,
    crop: Annotated[
        Optional[int],
        typer.Option(help="Crop / sliding-window edge, a multiple of 16 [default: the checkpoint's, else 96]"),
    ] = None,
    crops_per_volume: Annotated[int, typer.Option(help="Crops per visit of a case")] = 4,
    pos_fraction: Annotated[float, typer.Option(help="Share of crops centred on a labelled voxel")] = 0.5,
    feature_size: Annotated[int, typer.Option(help="UNETR convolutional feature width")] = 16,
    spacing: Annotated[
        Optional[float],
        typer.Option(help="Isotropic spacing in mm with --from-scratch and no CHECKPOINT [default: 1.5]"),
    ] = None,
    val_every: Annotated[int, typer.Option(help="Steps between validations")] = 100,
    log_every: Annotated[int, typer.Option(help="Steps between metrics.jsonl lines")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for weights, split, crops and flips")] = 0,
    device: TrainDevice = None,
    precision: Precision = None,
    workers: Workers = None,
    threads: Threads = None,
    cache_dir: Annotated[
        Optional[Path], typer.Option(help="Preprocessing cache, as pretrain's and prepare's (default: ~/.cache/ctmae)")
    ] = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    stop_at: StopAt = None,
    predict: Annotated[
        Optional[Path], typer.Option(help="Segment ARGS with this fine-tuned checkpoint (best.pt): ctmae segment.")
    ] = None,
) -> None:
    """Fine-tune a UNETR for segmentation from a pretrained MAE encoder, or predict with one (--predict)."""

    def body() -> None:
        from ctmae.api.finetune import finetune

        if predict is not None:  # ctmae segment, by another name
            return segment_alias(predict, args or [], out, device or "auto", threads)
        check_steps_or_epochs(steps, epochs)
        if out is None:
            raise UsageError("--out RUN_DIR is required")
        if len(args or []) > 1:
            raise UsageError(f"one CHECKPOINT expected, got {len(args)} paths (scans to segment go with --predict)")
        if not args and not from_scratch:
            raise UsageError("give the pretrained CHECKPOINT, or --from-scratch to train from random weights")
        quiet_other_ranks()
        given = {
            "preprocess": {"crop": crop, "cache_dir": str(cache_dir) if cache_dir else None},
            "data": {"crops_per_volume": crops_per_volume, "pos_fraction": pos_fraction, "workers": workers},
            "train": {"steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        }
        given["train"].update(freeze_encoder=freeze_encoder, layer_decay=layer_decay, val_every=val_every)
        given["train"].update(log_every=log_every, device=device, precision=precision)
        start = {"from_scratch": from_scratch, "model": model, "spacing": spacing, "feature_size": feature_size}
        cfg = _config(args[0] if args else None, out, resume, start, given)
        cases = {"labels": labels or (), "val_images": val_images or (), "val_labels": val_labels or ()}
        with ProgressReporter() as reporter:
            result = finetune(
                images or (), out, cfg, **cases, val_fraction=val_fraction, classes=classes, label_names=label_names,
                num_classes=num_classes, resume=resume, overwrite=overwrite, stop_at=stop_at, threads=threads,
                reporter=reporter,
            )  # fmt: skip
        _print_summary(result)
        end_stopped_run(result.figures)

    run_command(body)


def _config(
    checkpoint: Optional[Path], out: Path, resume: bool, start: dict[str, Any], given: dict[str, dict[str, Any]]
) -> SegConfig:
    """The run's config: a resumed run's with the few options a resumed run may change (steps, device, precision,
    cache folder, loader workers; a spacing only to check it), or one started from the checkpoint's encoder (or from
    scratch, ``start``) with every option. None: not given."""
    from ctmae.api.finetune import finetune_config, resumed_config

    base = resumed_config(out) if resume else None
    if base is not None:
        train = given["train"]
        given = {
            "preprocess": {"cache_dir": given["preprocess"]["cache_dir"]},
            "data": {"workers": given["data"]["workers"]},
            "train": {"steps": train["steps"], "device": train["device"], "precision": train["precision"]},
        }
        given["preprocess"]["spacing"] = (start["spacing"],) * 3 if start["spacing"] else None
    else:
        base = finetune_config(checkpoint, **start)
    try:
        return base.replace(**given_options(given))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_summary(result: Finetuning) -> None:
    figures = result.figures
    table = Table(title="fine-tuning summary", show_header=False)
    per_class = figures["dice_per_class"] or []
    rows = {
        "steps": f"{figures['steps']} of {figures['total_steps']}",
        "encoder tensors": figures["encoder_tensors"],
        "last loss": figures["last_loss"],
        "best val Dice": figures["best_dice"],
        "last val Dice per class": ", ".join(f"{n} {d:.4f}" for n, d in zip(result.classes, per_class)),
        "best": figures["best"],
        "last": figures["last"],
    }
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
