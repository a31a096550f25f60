"""Segmentation fine-tuning loop: cached labelled cases -> balanced crops -> UNETR -> DiceCE -> AdamW step ->
sliding-window validation Dice -> ``best.pt`` / ``last.pt``.

Knows nothing of the CLI: ``finetune`` takes a config, cases and a run folder, reports through callbacks and returns
a plain dict of figures. ``evaluate`` is the validation alone, for benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from ctmae.runtime.device import autocast_for
from ctmae.runtime.distributed import DistInfo
from ctmae.runtime.lr_schedule import lr_factor
from ctmae.runtime.optim import backward_and_step
from ctmae.runtime.run import Run, open_run
from ctmae.runtime.signals import Stopped
from ctmae.runtime.windows import OnWindows, watch, window_count
from ctmae.seg.config import SegConfig
from ctmae.seg.data import LabelledCase, cache_cases, crop_batches
from ctmae.seg.network import build_unetr, copy_encoder, load_seg_checkpoint, param_groups, save_seg_checkpoint

SW_BATCH = 4  # sliding windows per forward pass on a GPU; one on a CPU, where a window takes seconds and a stop
SW_OVERLAP = 0.25  # signal is checked between forward passes


def sliding_window(cfg: SegConfig, device: torch.device) -> SlidingWindowInferer:
    """Whole-volume inference in crop-sized windows, Gaussian-weighted where they overlap."""
    batch = SW_BATCH if device.type == "cuda" else 1
    return SlidingWindowInferer(
        roi_size=(cfg.preprocess.crop,) * 3, sw_batch_size=batch, overlap=SW_OVERLAP, mode="gaussian"
    )


def segment_logits(
    unetr: nn.Module,
    image: torch.Tensor,
    cfg: SegConfig,
    device: torch.device,
    precision: str,
    on_windows: OnWindows | None = None,
) -> torch.Tensor:
    """Sliding-window logits of one preprocessed volume (1, X, Y, Z) -> (1, C, X, Y, Z) on ``device``.

    Raises ``Stopped`` between windows when a stop signal came (``ctmae.runtime.windows``); ``on_windows(done, total)``
    hears the windows done.
    """
    inferer = sliding_window(cfg, device)
    total = window_count(image.shape[1:], inferer.roi_size, SW_OVERLAP)
    with autocast_for(precision, device):
        return inferer(image[None].to(device), watch(unetr, total, on_windows))  # (1, C, X, Y, Z)


@torch.no_grad()
def evaluate(
    unetr: nn.Module, cached: Sequence[dict], cfg: SegConfig, device: torch.device, precision: str = "fp32"
) -> list[float]:
    """Dice per foreground class (1..C-1) over whole preprocessed volumes, by sliding-window inference.

    A class absent from both a label and its prediction counts as Dice 1 for that case. A stop signal raises
    ``Stopped`` between windows (``segment_logits``).
    """
    was_training = unetr.training
    unetr.eval()
    classes = cfg.net.num_classes
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    try:
        for i in range(len(cached)):
            case = cached[i]
            logits = segment_logits(unetr, case["image"].as_tensor(), cfg, device, precision)  # (1, C, X, Y, Z)
            pred = one_hot(logits.float().argmax(1, keepdim=True), classes)
            metric(pred, one_hot(case["label"].as_tensor()[None].to(device).round().long(), classes))
    finally:
        unetr.train(was_training)
    return [float(d) for d in metric.aggregate().cpu()]


def build_segmenter(cfg: SegConfig, mae_weights: dict[str, torch.Tensor] | None) -> tuple[nn.Module, int]:
    """The UNETR seeded by ``train.seed``, its ViT from ``mae_weights`` when given; returns (net, tensors loaded).

    The decoder's initial weights depend on the seed only, so pretrained and from-scratch runs differ in the ViT.
    """
    torch.manual_seed(cfg.train.seed)
    unetr = build_unetr(cfg.net, cfg.preprocess.crop)
    loaded = copy_encoder(unetr, mae_weights) if mae_weights is not None else 0
    if cfg.train.freeze_encoder:
        unetr.vit.requires_grad_(False)
    return unetr, loaded


@dataclass
class _SegTraining:
    """The UNETR, its optimiser, schedule and scaler, restored from the resumed checkpoint; writes checkpoints."""

    unetr: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loaded: int  # encoder tensors taken from the MAE checkpoint
    best: float = -1.0  # best validation Dice so far

    @staticmethod
    def build(run: Run, mae_weights: dict[str, torch.Tensor] | None) -> _SegTraining:
        cfg, t = run.cfg, run.cfg.train
        unetr, loaded = build_segmenter(cfg, mae_weights if run.state is None else None)
        unetr.to(run.device)
        optimizer = torch.optim.AdamW(param_groups(unetr, t.lr, t.weight_decay, t.layer_decay), lr=t.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, run.total, t.warmup, t.min_lr / t.lr if t.lr else 0.0)
        )
        parts = _SegTraining(unetr, optimizer, scheduler, run.scaler(), loaded)
        if run.state is not None:
            unetr.load_state_dict(run.state["model"])
            optimizer.load_state_dict(run.state["optimizer"])
            scheduler.load_state_dict(run.state["scheduler"])
            run.restore_rng()
            parts.best, parts.loaded = run.state["best_dice"], run.state["encoder_tensors"]
        return parts

    def save(self, run: Run, step: int, val_dice: float | None) -> None:
        """Write last.pt (rank 0), and best.pt when ``val_dice`` beats the best so far."""
        state = run.training_state(
            step,
            model=self.unetr.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            val_dice=val_dice,
            best_dice=self.best if val_dice is None else max(self.best, val_dice),
            encoder_tensors=self.loaded,
        )
        best = run.checkpoints / "best.pt"
        if run.dist.is_main and val_dice is not None and val_dice > self.best:
            save_seg_checkpoint(state, best)
            run.log.info(f"step {step}: validation Dice {val_dice:.4f}, new best, written to {best}")
        self.best = state["best_dice"]
        if run.dist.is_main:
            save_seg_checkpoint(state, run.checkpoints / "last.pt")


def _validate(run: Run, unetr: nn.Module, val_data: Sequence[dict], step: int) -> list[float] | None:
    """Validation Dice per class after ``step``, logged; None when a stop signal cut it short (the step's checkpoint
    is then written without a Dice)."""
    run.log.info(f"step {step}: validating on {len(val_data)} case(s)")
    try:
        per_class = evaluate(unetr, val_data, run.cfg, run.device, run.precision)
    except Stopped as e:
        run.log.info(f"step {step}: validation stopped by {e.signal}, not scored")
        return None
    val_dice = sum(per_class) / len(per_class)
    run.log.metrics({"step": step, "val_dice": val_dice, **{f"val_dice_{c}": d for c, d in enumerate(per_class, 1)}})
    return per_class


def finetune(
    cfg: SegConfig,
    train_cases: Sequence[LabelledCase],
    val_cases: Sequence[LabelledCase],
    run_dir: Path,
    mae_weights: dict[str, torch.Tensor] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    dist: DistInfo = DistInfo(),
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a UNETR and write ``run_dir``: config.yaml, metrics.jsonl, train.log, checkpoints/{last,best}.pt.

    Args:
        cfg: the run's settings (``train.steps`` may be None: resolved here and saved).
        train_cases, val_cases: checked labelled cases (``ctmae.seg.data.check_case``); they may overlap.
        run_dir: output folder; ``checkpoints/last.pt`` there is continued when ``resume``.
        mae_weights: an MAE checkpoint's ``model`` state for the ViT; None trains from scratch.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (start fresh otherwise).
        stop_at: end this process after this step (checkpointing it); resume continues.
        dist: this process's rank under torchrun: ranks read disjoint crops, every rank validates (the same result),
            rank 0 alone writes files. SIGTERM/SIGUSR1/Ctrl-C on any rank: finish the step, write last.pt, stop.
        on_start: called once with ``{"start_step", "total_steps", "device", "precision", "encoder_tensors"}``.
        on_step: called after each step with ``{"step", "loss", "lr", "val_dice"}`` (None when not computed).

    Returns:
        Figures of the run: steps, last loss, best and last mean validation Dice (and per class), seconds, paths,
        ``stopped`` (None, or the stop signal that ended the run early) and ``interrupted`` (it was Ctrl-C).
    """
    run = open_run(
        cfg, run_dir, dist, len(train_cases), cfg.data.crops_per_volume, load_seg_checkpoint, resume, stop_at
    )
    cfg, t = run.cfg, run.cfg.train
    parts = _SegTraining.build(run, mae_weights)
    unetr, optimizer, scheduler, scaler, loaded = (
        parts.unetr,
        parts.optimizer,
        parts.scheduler,
        parts.scaler,
        parts.loaded,
    )
    net = run.wrap(unetr)
    origin = f"encoder from {cfg.pretrained} ({loaded} tensors)" if cfg.pretrained else "from scratch"
    run.begin(f"{origin}; {len(train_cases)} training and {len(val_cases)} validation case(s)")
    if {c.id for c in val_cases} & {c.id for c in train_cases}:
        run.log.info("validation cases are also training cases (a single labelled case): Dice is not held out")
    if on_start:
        on_start(run.start_info(encoder_tensors=loaded))

    train_data, val_data = (
        cache_cases(c, cfg.preprocess, cfg.data.label_values, on_note=run.log.info) for c in (train_cases, val_cases)
    )
    batches = crop_batches(
        train_data,
        cfg.data,
        cfg.preprocess.crop,
        t.seed,
        t.batch_size,
        start_step=run.start,
        rank=dist.rank,
        world=dist.world,
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    step, per_class, stopped = run.start, None, None
    with run.flag:  # SIGTERM/SIGUSR1/Ctrl-C: finish the step, write last.pt, stop
        while step < run.end:
            batch = run.next_batch(batches)
            if batch is None:  # a stop signal while waiting for data: the last finished step is the checkpoint
                parts.save(run, step, None)
                stopped = run.stopped_by_signal(step)
                break
            images, labels = (x.to(run.device, non_blocking=True) for x in batch)  # (B, 1, c, c, c) each
            with run.autocast():
                logits = net(images)  # (B, C, c, c, c)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            backward_and_step(loss, optimizer, scaler, unetr, t.grad_clip)
            lr = max(g["lr"] for g in optimizer.param_groups)
            scheduler.step()
            run.add_loss(loss)
            step += 1
            loss_value, val_dice = run.log_loss(step, lr=lr), None
            signalled = run.stop_requested()
            if step % t.val_every == 0 or step == run.end or signalled:
                if not signalled:
                    scored = _validate(run, unetr, val_data, step)
                    per_class = scored or per_class
                    val_dice = None if scored is None else sum(scored) / len(scored)
                    signalled = run.stop_requested()  # every rank agrees whether a signal cut a validation short
                parts.save(run, step, val_dice)
            if on_step:
                on_step({"step": step, "loss": loss_value, "lr": lr, "val_dice": val_dice})
            if signalled:
                stopped = run.stopped_by_signal(step)
                break
    batches.close()
    run.log.close()
    return {
        **run.figures(step),
        "stopped": stopped,
        "best_dice": parts.best,
        "last_dice": None if per_class is None else sum(per_class) / len(per_class),
        "dice_per_class": per_class,
        "encoder_tensors": loaded,
        "best": str(run.checkpoints / "best.pt"),
        "last": str(run.checkpoints / "last.pt"),
    }
