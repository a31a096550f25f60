"""Few-shot fine-tuning: ``finetune-seg`` on k labelled cases, pretrained and from scratch with identical
everything else, scored by Dice on the fixed test cases.

A run fine-tunes MONAI's UNETR (``ctmae.seg.train.finetune``) with the seed of its repeat, so a pretrained run and
its from-scratch twin share the decoder's initial weights, the crops and the schedule and differ only in the ViT's
starting weights. The run validates once, after its last step, on the test cases: nothing in training depends on
that figure (no early stopping; ``best.pt`` is not used), and it is the last model's Dice per class, averaged over
the test cases. With several test cases the last checkpoint is also scored case by case
(``ctmae.seg.train.evaluate``) for the per-case table.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ctmae.experiments.evaluate.cases import Prepared
from ctmae.experiments.evaluate.settings import EvalSettings
from ctmae.mae.config import RunConfig
from ctmae.preprocess.config import PreprocessConfig
from ctmae.runtime.device import resolve_device
from ctmae.seg.classes import ClassMap
from ctmae.seg.config import SegConfig, SegDataConfig
from ctmae.seg.data import LabelledCase
from ctmae.seg.network import load_seg_checkpoint, net_config_from_mae, segmenter_from_checkpoint
from ctmae.seg.train import evaluate, finetune


def seg_config(mae: RunConfig, settings: EvalSettings, classes: ClassMap, repeat: int, pretrained: str) -> SegConfig:
    """The fine-tuning settings of one run; ValueError when the encoder cannot fit MONAI's UNETR.

    Args:
        mae: the checkpoint's config (sizes, spacing, HU window); a from-scratch run uses its twin's.
        settings: steps, learning rate, batch size, crop, feature size, device.
        classes: the classes (their count, label values and names, recorded in the run's config).
        repeat: the run's seed.
        pretrained: the checkpoint path ("" from scratch), recorded in the run's config.
    """
    net = net_config_from_mae(mae.model, settings.feature_size, classes.count)
    crop = settings.crop or mae.model.img_size
    pre = PreprocessConfig(spacing=mae.preprocess.spacing, hu_window=mae.preprocess.hu_window, crop=crop)
    data = SegDataConfig(**classes.config())
    return SegConfig(preprocess=pre, data=data, net=net, pretrained=pretrained).replace(
        train={
            "steps": settings.steps,
            "lr": settings.lr,
            "batch_size": settings.batch_size,
            "seed": repeat,
            "device": settings.device,
            "val_every": settings.steps,  # one validation, after the last step
            "log_every": max(1, settings.steps // 50),
        }
    )


def run_fewshot(
    cfg: SegConfig,
    train: Sequence[LabelledCase],
    test: Sequence[LabelledCase],
    prepared: Callable[[], Sequence[Prepared]],
    run_dir: Path,
    mae_weights: dict[str, torch.Tensor] | None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune one few-shot run in ``run_dir`` (continuing its ``last.pt`` if there is one) and score it.

    Args:
        prepared: the test cases preprocessed as ``cfg.preprocess`` says, asked for only when there are several.

    Returns:
        ``{"dice", "dice_per_class", "per_case", "train_cases", "seconds"}``, or ``{"stopped", "interrupted"}``
        when a stop signal ended the run early (its last.pt is kept for ``--resume``).
    """
    result = finetune(
        cfg,
        train,
        test,
        run_dir,
        mae_weights=mae_weights,
        resume=True,
        on_step=(lambda info: on_step(info["step"])) if on_step else None,
    )
    if result["stopped"]:
        return {"stopped": result["stopped"], "interrupted": result["interrupted"]}
    per_class = result["dice_per_class"]  # the last step's validation: mean over the test cases
    if len(test) == 1:
        per_case = {test[0].id: per_class}
    else:
        state = load_seg_checkpoint(run_dir / "checkpoints" / "last.pt")
        device = resolve_device(cfg.train.device)
        unetr = segmenter_from_checkpoint(state).to(device)
        precision = state["config"].train.precision
        per_case = {case.id: evaluate(unetr, [case.item()], cfg, device, precision) for case in prepared()}
    return {
        "dice": sum(per_class) / len(per_class),
        "dice_per_class": per_class,
        "per_case": per_case,
        "train_cases": [c.id for c in train],
        "seconds": result["seconds"],
    }


def drop_checkpoints(run_dir: Path) -> None:
    """Remove a finished run's checkpoints (hundreds of MB for a base UNETR); its logs and config stay."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
