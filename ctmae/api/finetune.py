"""``ctmae.finetune``: train a UNETR on labelled scans from a pretrained MAE encoder (or from scratch), writing a run
folder whose ``best.pt`` ``ctmae.segment`` uses."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctmae.api.common import SILENT, OptionError, Reporter
from ctmae.api.runs import last_checkpoint, open_run_dir, plan_workers, rank_reporter, training_callbacks

if TYPE_CHECKING:
    from ctmae.seg.config import SegConfig


@dataclass(frozen=True)
class Finetuning:
    """What ``finetune`` did: the run folder, its checkpoints and figures, and its warnings."""

    out: Path  # config.yaml, metrics.jsonl, train.log, checkpoints/
    best: Path  # checkpoints/best.pt: the best validation Dice, what ctmae.segment takes
    last: Path  # checkpoints/last.pt: what resume continues
    figures: dict[str, Any]  # steps, total_steps, last_loss, best_dice, last_dice, dice_per_class, encoder_tensors,
    # stopped (None, or why the run ended early), interrupted (the stop was Ctrl-C), ...
    classes: tuple[str, ...]  # classes 1..K learned (0 is background), named as the labels name them, else "class k"
    warnings: tuple[str, ...]  # images unlike the encoder's preprocessing, validation on the training case

    @property
    def stopped(self) -> str | None:
        """Why the run ended early (a stop signal), or None; ``stop_at`` is no early end."""
        return self.figures["stopped"]


def finetune_config(
    encoder: str | os.PathLike | None = None,
    *,
    from_scratch: bool = False,
    model: str = "base",
    spacing: float | None = None,
    feature_size: int = 16,
) -> SegConfig:
    """A fine-tuning config to start from (``ctmae.FinetuneConfig``; change it with ``.replace``).

    With ``encoder``, an MAE checkpoint of ``ctmae pretrain``: the UNETR's ViT sizes and the preprocessing (spacing,
    HU window, crop) are the encoder's, and fine-tuning starts from its weights unless ``from_scratch``. Without:
    random ViT weights of the ``model`` preset, at ``spacing`` (None: 1.5 mm).

    Args:
        encoder: the MAE checkpoint, or None.
        from_scratch: random ViT weights even with an ``encoder`` (the baseline, at the encoder's sizes).
        model: the ViT size preset without ``encoder``: tiny, small or base (UNETR needs 12 blocks).
        spacing: isotropic spacing in mm; with a pretrained encoder it must be the encoder's.
        feature_size: UNETR's convolutional width.

    Raises:
        OptionError: a preset UNETR cannot hold, a spacing the encoder was not trained with, bad sizes.
        ValueError: an encoder UNETR cannot hold (patch size, depth). CheckpointError: not an MAE checkpoint.
    """
    from ctmae.mae.checkpoint import load_checkpoint
    from ctmae.mae.config import MODEL_PRESETS
    from ctmae.preprocess.config import PreprocessConfig
    from ctmae.preprocess.contract import checkpoint_preprocessing, preprocessing_change
    from ctmae.seg.config import UNETR_DEPTH, SegConfig, SegNetConfig
    from ctmae.seg.network import net_config_from_mae

    if encoder is not None:
        trained = checkpoint_preprocessing(encoder) if spacing is not None and not from_scratch else None
        change = trained and preprocessing_change(trained, {"spacing": (spacing,) * 3}, ["spacing"])
        if change:  # a pretrained encoder's input contract is not an option
            raise OptionError(f"--spacing {spacing:g}: {change} ({encoder}); omit --spacing, or train --from-scratch")
        mae = load_checkpoint(encoder)["config"]
        try:
            net = net_config_from_mae(mae.model, feature_size, 2)
        except ValueError as e:
            raise ValueError(f"{encoder}: {e}") from None
        pre = PreprocessConfig(**{k: getattr(mae.preprocess, k) for k in ("spacing", "hu_window", "crop")})
    else:
        if model not in MODEL_PRESETS:
            raise OptionError(f"unknown --model {model!r}; choose one of {', '.join(MODEL_PRESETS)}")
        p = MODEL_PRESETS[model]
        if p["depth"] != UNETR_DEPTH:
            raise OptionError(
                f"the {model} preset has {p['depth']} blocks; UNETR needs a 12-block ViT (tiny, small, base)"
            )
        net = SegNetConfig(size=model, dim=p["dim"], heads=p["heads"], feature_size=feature_size)
        pre = PreprocessConfig(**({"spacing": (spacing,) * 3} if spacing else {}))
    try:
        return SegConfig(preprocess=pre, net=net, pretrained="" if from_scratch or encoder is None else str(encoder))
    except ValueError as e:
        raise OptionError(str(e)) from None


def resumed_config(out: str | os.PathLike) -> SegConfig | None:
    """The config of ``out/checkpoints/last.pt`` (None when there is none), with the loader workers left to plan."""
    from ctmae.seg.network import load_seg_checkpoint

    last = last_checkpoint(out)
    return load_seg_checkpoint(last)["config"].replace(data={"workers": None}) if last.is_file() else None


def finetune(
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: SegConfig | None = None,
    *,
    labels: Sequence[str | os.PathLike] = (),
    val_images: Sequence[str | os.PathLike] = (),
    val_labels: Sequence[str | os.PathLike] = (),
    val_fraction: float = 0.2,
    classes: str | None = None,
    label_names: str | os.PathLike | None = None,
    num_classes: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    threads: int | None = None,
    reporter: Reporter = SILENT,
) -> Finetuning:
    """Fine-tune a UNETR for segmentation and write the run into ``out``.

    Args:
        images: training images (paired with ``labels`` by file name), or one .csv/.json datalist, or one nnU-Net
            folder with imagesTr/ and labelsTr/.
        out: the run folder (created); it must be empty unless ``resume`` or ``overwrite``.
        config: the run's settings (``finetune_config``: from a pretrained encoder, or from scratch); None: the
            config of the run being resumed, else from scratch with the defaults. The classes are set here.
        labels: label volumes, named as their images.
        val_images, val_labels: validation cases instead of holding out ``val_fraction`` of the cases (seeded).
        classes: classes to learn, as ``liver=5,spleen`` (NAME=VALUE, NAME or VALUE), classes 1..K in this order,
            every other value background; None: every label value, as numbered.
        label_names: a JSON naming the label values, instead of a dataset.json / labels.json beside the labels.
        num_classes: classes with background (None: the largest label value + 1, or those ``classes`` chooses).
        resume: continue from ``out/checkpoints/last.pt`` (fresh if there is none yet).
        overwrite: replace ctmae's outputs in a non-empty ``out``.
        stop_at: checkpoint and stop after this step; ``resume`` continues.
        threads: CPU cores to keep busy (None: the CPU budget decides).
        reporter: hears the labels checked, the training steps, the run's news lines and warnings.

    Raises:
        OptionError: missing images, a folder that is not empty or writable, classes or a spacing this run cannot
            take. InputError: labels that do not fit their images or the classes.
    """
    from ctmae.api.classes import check_classes_spec, classes_to_learn
    from ctmae.mae.checkpoint import load_checkpoint
    from ctmae.preprocess.contract import checkpoint_preprocessing, preprocessing_change
    from ctmae.runtime.distributed import cleanup
    from ctmae.seg.classes import classes_of
    from ctmae.seg.config import SegConfig
    from ctmae.seg.data import split_cases
    from ctmae.seg.train import finetune as run_finetune

    if val_labels and not val_images:
        raise OptionError("--val-labels needs --val-images")
    if not 0.0 < val_fraction < 1.0:
        raise OptionError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    check_classes_spec(classes)
    cases = _cases(images, labels, "")
    val_cases = _cases(val_images, val_labels, "val-") if val_images else []
    out, last = Path(out), last_checkpoint(out)
    resuming = resume and last.is_file()
    cfg = config or (resumed_config(out) if resuming else None) or SegConfig()
    dist = open_run_dir(out, resume, overwrite, cfg.train.device)
    reporter = rank_reporter(reporter, dist)
    trained = checkpoint_preprocessing(last) if resuming else None
    change = trained and preprocessing_change(trained, cfg.preprocess, ["spacing"])
    if change:  # the run's encoder learned (or began to learn) at that spacing
        raise OptionError(
            f"--spacing {cfg.preprocess.spacing[0]:g}: {change} ({last}); omit --spacing, or train --from-scratch"
        )
    chosen = classes_to_learn(cases + val_cases, classes, label_names, num_classes, reporter)
    if not resuming:
        cfg = cfg.replace(data=chosen.config(), net={"num_classes": chosen.count})
    elif classes is not None and chosen.remap() != cfg.data.label_values:
        raise OptionError(f"--classes {classes}: the run in {out} learns other classes; resume without --classes")
    item_bytes = cfg.data.crops_per_volume * cfg.preprocess.crop**3 * 8  # one visit's crops: image and label
    cfg = cfg.replace(data={"workers": plan_workers(threads, cfg.train.device, cfg.data.workers, item_bytes, reporter)})
    warnings = []
    if cfg.pretrained:  # the encoder's input contract, from each image's header and a few slices
        from ctmae.preprocess.contract import preprocessing_of, source_warnings

        warnings += source_warnings(preprocessing_of(cfg.preprocess), [c.image for c in cases + val_cases])
    train_cases, held_out = (cases, val_cases) if val_cases else split_cases(cases, val_fraction, cfg.train.seed)
    if len(cases) == 1 and not val_cases:
        warnings.append("only one labelled case: validating on the training case (Dice is not held out)")
    for line in warnings:
        reporter.warn(line)
    weights = load_checkpoint(cfg.pretrained)["model"] if cfg.pretrained and not resuming else None

    def describe(info: dict[str, Any]) -> list[str]:
        origin = (
            f"encoder: {info['encoder_tensors']} tensors loaded from {cfg.pretrained}"
            if cfg.pretrained
            else "from scratch (random ViT weights)"
        )
        lines = [
            f"training on {info['device']} ({info['precision']}), {cfg.net.size} UNETR, "
            f"{len(train_cases)} training / {len(held_out)} validation case(s); {origin}"
        ]
        if cfg.data.label_values or cfg.data.class_names:
            lines.append(f"classes: {classes_of(cfg).text()}")
        return lines

    def status(info: dict[str, Any]) -> str:
        return "" if info["val_dice"] is None else f"val Dice {info['val_dice']:.4f}"

    started, stepped = training_callbacks("fine-tuning", out, resume, reporter, describe, status)
    figures = run_finetune(
        cfg, train_cases, held_out, out, mae_weights=weights, resume=resume, stop_at=stop_at, dist=dist,
        on_start=started, on_step=stepped,
    )  # fmt: skip
    cleanup(dist)
    names = tuple(classes_of(cfg).labels())
    return Finetuning(out, Path(figures["best"]), Path(figures["last"]), figures, names, tuple(warnings))


def _cases(images: Sequence, labels: Sequence, what: str) -> list:
    from ctmae.seg.data import find_cases

    if not images:
        raise OptionError(f"--{what}images is required (with --{what}labels, or one datalist / nnU-Net folder)")
    return find_cases([str(p) for p in images], [str(p) for p in labels])
