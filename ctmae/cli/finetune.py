"""``ctmae finetune-seg``: fine-tune a UNETR on labelled scans from a pretrained MAE encoder (or from scratch).
``--predict`` runs ``ctmae segment`` (``ctmae.cli.segment``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ctmae.cli.classes import ClassesOption, LabelNamesOption, check_classes_option, resolve_classes
from ctmae.cli.common import (
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
    run_command,
    use_resources,
)
from ctmae.cli.segment import segment_alias
from ctmae.io.checks import InputError
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import MODEL_PRESETS
from ctmae.preprocess.config import PreprocessConfig
from ctmae.runtime.distributed import DistInfo, cleanup
from ctmae.seg.config import UNETR_DEPTH, SegConfig, SegNetConfig

PathList = Optional[list[Path]]


def _net_from_preset(size: str, feature_size: int, num_classes: int) -> SegNetConfig:
    if size not in MODEL_PRESETS:
        raise UsageError(f"unknown --model {size!r}; choose one of {', '.join(MODEL_PRESETS)}")
    p = MODEL_PRESETS[size]
    if p["depth"] != UNETR_DEPTH:
        raise UsageError(f"the {size} preset has {p['depth']} blocks; UNETR needs a 12-block ViT (tiny, small, base)")
    return SegNetConfig(size=size, dim=p["dim"], heads=p["heads"], feature_size=feature_size, num_classes=num_classes)


def _cases(images: PathList, labels: PathList, what: str) -> list:
    from ctmae.seg.data import find_cases

    if not images:
        raise UsageError(f"--{what}images is required (with --{what}labels, or one datalist / nnU-Net folder)")
    return find_cases([str(p) for p in images], [str(p) for p in labels or []])


def _check(cases: list, num_classes: Optional[int]) -> set[int]:
    """Check every pair's geometry and values, with progress; returns the label values the cases hold."""
    from ctmae.seg.data import case_values

    present: set[int] = set()
    with progress_bar() as progress:
        task = progress.add_task("checking labels", total=len(cases), info="")
        for case in cases:
            values = case_values(case)
            if num_classes is not None and max(values) >= num_classes:
                raise InputError(
                    f"{case.label.files[0]}: holds class {max(values)}, but --num-classes is {num_classes}; choose "
                    f"the classes to learn with --classes (e.g. --classes liver=5), every other value background"
                )
            present |= values
            progress.advance(task)
    return present


def _classes(cases: list, spec: Optional[str], names_file: Optional[Path], num_classes: Optional[int]):
    """The classes to learn: chosen with --classes (checked against --num-classes and the labels' values), or the
    labels' own numbering up to --num-classes or the largest value; named where the labels' names say so."""
    from ctmae.seg.classes import check_present, numbered_classes

    chosen, names = resolve_classes(cases, spec, names_file)
    if chosen is not None and num_classes is not None and num_classes != chosen.count:
        raise UsageError(
            f"--num-classes {num_classes}, but --classes chooses {chosen.count - 1} class(es) ({chosen.count} with "
            f"background); drop --num-classes"
        )
    present = _check(cases, num_classes if chosen is None else None)
    if chosen is None:
        return numbered_classes(num_classes or max(2, max(present) + 1), names)
    check_present(chosen, present)
    return chosen


def _warn(lines: list[str]) -> None:
    for line in lines:
        errors.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


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
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps [default: 1000]")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over all training crops, instead of --steps")] = None,
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
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|cuda [default: auto]")] = None,
    precision: Annotated[
        Optional[str], typer.Option(help="auto|bf16|fp16|fp32; auto = bf16 on GPU, fp32 on CPU")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help=WORKERS_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
    cache_dir: Annotated[
        Optional[Path], typer.Option(help="Preprocessing cache, as pretrain's and prepare's (default: ~/.cache/ctmae)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoints/last.pt (fresh if none yet).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace ctmae's outputs in a non-empty RUN_DIR.")
    ] = False,
    stop_at: Annotated[
        Optional[int], typer.Option(help="Checkpoint and stop after this step; --resume continues.")
    ] = None,
    predict: Annotated[
        Optional[Path], typer.Option(help="Segment ARGS with this fine-tuned checkpoint (best.pt): ctmae segment.")
    ] = None,
) -> None:
    """Fine-tune a UNETR for segmentation from a pretrained MAE encoder, or predict with one (--predict)."""

    def body() -> None:
        if predict is not None:  # ctmae segment, by another name
            return segment_alias(predict, args or [], out, device or "auto", threads)
        from ctmae.preprocess.contract import (
            checkpoint_preprocessing,
            preprocessing_change,
            preprocessing_of,
            source_warnings,
        )
        from ctmae.seg.data import split_cases
        from ctmae.seg.network import load_seg_checkpoint

        check_steps_or_epochs(steps, epochs)
        if out is None:
            raise UsageError("--out RUN_DIR is required")
        if len(args or []) > 1:
            raise UsageError(f"one CHECKPOINT expected, got {len(args)} paths (scans to segment go with --predict)")
        checkpoint = args[0] if args else None
        if checkpoint is None and not from_scratch:
            raise UsageError("give the pretrained CHECKPOINT, or --from-scratch to train from random weights")
        if val_labels and not val_images:
            raise UsageError("--val-labels needs --val-images")
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        check_classes_option(classes)
        cases = _cases(images, labels, "")
        val_cases = _cases(val_images, val_labels, "val-") if val_images else None
        dist = open_run_dir(out, resume, overwrite, device)
        last = out / "checkpoints" / "last.pt"
        fixed = last if resume and last.is_file() else None if from_scratch else checkpoint
        trained = checkpoint_preprocessing(fixed) if fixed is not None and spacing is not None else None
        change = trained and preprocessing_change(trained, {"spacing": (spacing,) * 3}, ["spacing"])
        if change:  # a pretrained encoder's input contract is not an option
            raise UsageError(f"--spacing {spacing:g}: {change} ({fixed}); omit --spacing, or train --from-scratch")
        chosen = _classes(cases + (val_cases or []), classes, label_names, num_classes)
        data_opts = dict(crops_per_volume=crops_per_volume, pos_fraction=pos_fraction, **chosen.config())
        pre_opts = {"crop": crop, "cache_dir": str(cache_dir) if cache_dir else None}
        train_opts = {
            "steps": steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "freeze_encoder": freeze_encoder,
            "layer_decay": layer_decay,
            "seed": seed,
            "device": device or "auto",
            "precision": precision or "auto",
            "val_every": val_every,
            "log_every": log_every,
        }
        if resume and last.is_file():
            mae, cfg = None, load_seg_checkpoint(last)["config"]
            if classes is not None and chosen.remap() != cfg.data.label_values:
                raise UsageError(
                    f"--classes {classes}: the run in {out} learns other classes; resume without --classes"
                )
            given = {"steps": steps, "device": device, "precision": precision}
            given_pre = {"cache_dir": str(cache_dir)} if cache_dir else {}
            cfg = cfg.replace(train={k: v for k, v in given.items() if v is not None}, preprocess=given_pre)
        else:
            net_opts = {"model": model, "feature_size": feature_size, "num_classes": chosen.count}
            sections = {"preprocess": pre_opts, "data": {**data_opts, "workers": workers}, "train": train_opts}
            mae, cfg = _new_config(checkpoint, from_scratch, spacing, net_opts, sections)
        voxels = cfg.data.crops_per_volume * cfg.preprocess.crop**3
        cfg = cfg.replace(data={"workers": use_resources(threads, cfg.train.device, workers, voxels * 8).workers})
        if cfg.pretrained:  # the encoder's input contract, from each image's header and a few slices
            _warn(source_warnings(preprocessing_of(cfg.preprocess), [c.image for c in cases + (val_cases or [])]))
        train_cases, held_out = (cases, val_cases) if val_cases else split_cases(cases, val_fraction, cfg.train.seed)
        if len(cases) == 1 and not val_cases:
            console.print(
                "only one labelled case: validating on the training case (Dice is not held out)",
                style="yellow",
                highlight=False,
            )
        weights = None if from_scratch or mae is None else mae["model"]
        _train(cfg, train_cases, held_out, out, weights, resume, stop_at, dist)
        cleanup(dist)

    run_command(body)


def _new_config(
    checkpoint: Optional[Path], from_scratch: bool, spacing: Optional[float], net_opts: dict, sections: dict
) -> tuple[Optional[dict], SegConfig]:
    """(the MAE checkpoint's state or None, the fine-tuning config): preprocessing and ViT sizes from the checkpoint
    (or the preset for --from-scratch), then the options; the cache folder is this machine's."""
    from ctmae.seg.network import net_config_from_mae

    mae = None
    if checkpoint is not None:
        mae = load_checkpoint(checkpoint)
        try:
            net = net_config_from_mae(mae["config"].model, net_opts["feature_size"], net_opts["num_classes"])
        except ValueError as e:
            raise ValueError(f"{checkpoint}: {e}") from None
        base = PreprocessConfig(**{k: getattr(mae["config"].preprocess, k) for k in ("spacing", "hu_window", "crop")})
    else:
        net = _net_from_preset(net_opts["model"], net_opts["feature_size"], net_opts["num_classes"])
        base = PreprocessConfig(**({"spacing": (spacing,) * 3} if spacing else {}))
    try:
        cfg = SegConfig(preprocess=base, net=net, pretrained="" if from_scratch else str(checkpoint))
        given = {k: v for k, v in sections["preprocess"].items() if v is not None}
        return mae, cfg.replace(**{**sections, "preprocess": given})
    except ValueError as e:
        raise UsageError(str(e)) from None


def _train(
    cfg: SegConfig,
    train_cases: list,
    val_cases: list,
    out: Path,
    weights,
    resume: bool,
    stop_at: Optional[int],
    dist: DistInfo,
) -> None:
    from ctmae.seg.classes import classes_of
    from ctmae.seg.train import finetune

    with progress_bar() as progress:
        task = progress.add_task("fine-tuning", total=None, info="")

        def started(info: dict[str, Any]) -> None:
            progress.update(task, total=info["total_steps"], completed=info["start_step"])
            announce_start(out, resume, info["start_step"])
            origin = (
                f"encoder: {info['encoder_tensors']} tensors loaded from {cfg.pretrained}"
                if cfg.pretrained
                else "from scratch (random ViT weights)"
            )
            console.print(
                f"training on {info['device']} ({info['precision']}), {cfg.net.size} UNETR, "
                f"{len(train_cases)} training / {len(val_cases)} validation case(s); {origin}",
                highlight=False,
                soft_wrap=True,
            )
            if cfg.data.label_values or cfg.data.class_names:
                console.print(f"classes: {classes_of(cfg).text()}", highlight=False, soft_wrap=True)

        def stepped(info: dict[str, Any]) -> None:
            if info["val_dice"] is not None:
                progress.update(task, info=f"val Dice {info['val_dice']:.4f}")
            progress.update(task, completed=info["step"])

        result = finetune(
            cfg,
            train_cases,
            val_cases,
            out,
            mae_weights=weights,
            resume=resume,
            stop_at=stop_at,
            dist=dist,
            on_start=started,
            on_step=stepped,
        )
    table = Table(title="fine-tuning summary", show_header=False)
    per_class = result["dice_per_class"] or []
    rows = {
        "steps": f"{result['steps']} of {result['total_steps']}",
        "encoder tensors": result["encoder_tensors"],
        "last loss": result["last_loss"],
        "best val Dice": result["best_dice"],
        "last val Dice per class": ", ".join(f"{n} {d:.4f}" for n, d in zip(classes_of(cfg).labels(), per_class)),
        "best": result["best"],
        "last": result["last"],
    }
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    end_stopped_run(result)
