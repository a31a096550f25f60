"""Segmentation fine-tuning loop: cached labelled cases -> balanced crops -> UNETR -> DiceCE -> AdamW step ->
sliding-window validation Dice -> ``best.pt`` / ``last.pt``.

Knows nothing of the CLI: ``finetune`` takes a config, cases and a run folder, reports through callbacks and returns
a plain dict of figures. ``evaluate`` is the validation alone, for benchmarks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.data import CacheDataset
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from ctmae.checkpoint import rng_state, set_rng_state
from ctmae.distributed import DistInfo, any_rank, mean_over_ranks
from ctmae.engine import StopFlag, autocast_for, lr_factor, resolve_device, resolve_precision
from ctmae.metrics_log import MetricsLog
from ctmae.optim import backward_and_step
from ctmae.seg_config import SegConfig
from ctmae.seg_data import LabelledCase, cache_cases, crop_batches
from ctmae.segmenter import build_unetr, load_encoder, load_seg_checkpoint, param_groups, save_seg_checkpoint

DEFAULT_STEPS = 1000
SW_BATCH = 4  # sliding windows per forward pass
SW_OVERLAP = 0.25


def resolve_steps(cfg: SegConfig, num_cases: int) -> int:
    """``train.steps``, else epochs over all crops (cases x crops_per_volume), else DEFAULT_STEPS."""
    t = cfg.train
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * num_cases * cfg.data.crops_per_volume / t.batch_size))
    return DEFAULT_STEPS


def sliding_window(cfg: SegConfig) -> SlidingWindowInferer:
    """Whole-volume inference in crop-sized windows, Gaussian-weighted where they overlap."""
    return SlidingWindowInferer(
        roi_size=(cfg.data.crop,) * 3, sw_batch_size=SW_BATCH, overlap=SW_OVERLAP, mode="gaussian"
    )


@torch.no_grad()
def evaluate(
    unetr: nn.Module, cached: CacheDataset, cfg: SegConfig, device: torch.device, precision: str = "fp32"
) -> list[float]:
    """Dice per foreground class (1..C-1) over whole preprocessed volumes, by sliding-window inference.

    A class absent from both a label and its prediction counts as Dice 1 for that case.
    """
    was_training = unetr.training
    unetr.eval()
    inferer, classes = sliding_window(cfg), cfg.net.num_classes
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    for i in range(len(cached)):
        case = cached[i]
        with autocast_for(precision, device):
            logits = inferer(case["image"].as_tensor()[None].to(device), unetr)  # (1, C, X, Y, Z)
        pred = one_hot(logits.float().argmax(1, keepdim=True), classes)
        metric(pred, one_hot(case["label"].as_tensor()[None].to(device).round().long(), classes))
    unetr.train(was_training)
    return [float(d) for d in metric.aggregate().cpu()]


def build_segmenter(cfg: SegConfig, mae_weights: dict[str, torch.Tensor] | None) -> tuple[nn.Module, int]:
    """The UNETR seeded by ``train.seed``, its ViT from ``mae_weights`` when given; returns (net, tensors loaded).

    The decoder's initial weights depend on the seed only, so pretrained and from-scratch runs differ in the ViT.
    """
    torch.manual_seed(cfg.train.seed)
    unetr = build_unetr(cfg.net, cfg.data.crop)
    loaded = load_encoder(unetr, mae_weights) if mae_weights is not None else 0
    if cfg.train.freeze_encoder:
        unetr.vit.requires_grad_(False)
    return unetr, loaded


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
        train_cases, val_cases: checked labelled cases (``ctmae.seg_data.check_case``); they may overlap.
        run_dir: output folder; ``checkpoints/last.pt`` there is continued when ``resume``.
        mae_weights: an MAE checkpoint's ``model`` state for the ViT; None trains from scratch.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (start fresh otherwise).
        stop_at: end this process after this step (checkpointing it); resume continues.
        dist: this process's rank under torchrun: ranks read disjoint crops, every rank validates (the same result),
            rank 0 alone writes files. SIGTERM/SIGUSR1 on any rank: finish the step, write last.pt, stop.
        on_start: called once with ``{"start_step", "total_steps", "device", "precision", "encoder_tensors"}``.
        on_step: called after each step with ``{"step", "loss", "lr", "val_dice"}`` (None when not computed).

    Returns:
        Figures of the run: steps, last loss, best and last mean validation Dice (and per class), seconds, paths,
        ``stopped`` (None, or the stop signal that ended the run early).
    """
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    total = resolve_steps(cfg, len(train_cases))
    cfg = cfg.replace(train={"steps": total, "device": device.type, "precision": precision})
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    state = load_seg_checkpoint(ckpt_dir / "last.pt") if resume and (ckpt_dir / "last.pt").is_file() else None

    unetr, loaded = build_segmenter(cfg, mae_weights if state is None else None)
    unetr.to(device)
    optimizer = torch.optim.AdamW(param_groups(unetr, t.lr, t.weight_decay, t.layer_decay), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, t.warmup, t.min_lr / t.lr if t.lr else 0.0)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start, best, val_dice = 0, -1.0, None
    if state is not None:
        unetr.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, best, loaded = state["step"], state["best_dice"], state["encoder_tensors"]
    net = unetr
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            unetr, device_ids=[device.index] if device.type == "cuda" else None
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = MetricsLog(run_dir, start_step=start, enabled=dist.is_main)
    origin = f"encoder from {cfg.pretrained} ({loaded} tensors)" if cfg.pretrained else "from scratch"
    log.info(
        f"{'resuming at' if start else 'starting'} step {start} of {total} on {device.type} ({precision}), "
        f"{origin}; {len(train_cases)} training and {len(val_cases)} validation case(s)"
    )
    if {c.id for c in val_cases} & {c.id for c in train_cases}:
        log.info("validation cases are also training cases (a single labelled case): Dice is not held out")
    if on_start:
        on_start(
            {
                "start_step": start,
                "total_steps": total,
                "device": device.type,
                "precision": precision,
                "encoder_tensors": loaded,
            }
        )

    train_data, val_data = cache_cases(train_cases, cfg.data), cache_cases(val_cases, cfg.data)
    batches = crop_batches(
        train_data, cfg.data, t.seed, t.batch_size, start_step=start, rank=dist.rank, world=dist.world
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    autocast = autocast_for(precision, device)
    end = min(total, stop_at) if stop_at is not None else total
    net.train()
    t0, window_loss, window_steps, loss_value, per_class = time.perf_counter(), None, 0, None, None
    stopped, done = None, start
    with StopFlag() as flag:  # SIGTERM/SIGUSR1: finish the step, write last.pt, stop
        for step in range(start, end):
            images, labels = (x.to(device, non_blocking=True) for x in next(batches))  # (B, 1, c, c, c) each
            with autocast:
                logits = net(images)  # (B, C, c, c, c)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            backward_and_step(loss, optimizer, scaler, unetr, t.grad_clip)
            lr = max(g["lr"] for g in optimizer.param_groups)
            scheduler.step()
            window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()  # no host sync
            window_steps += 1
            done, loss_value, val_dice = step + 1, None, None
            if done % t.log_every == 0 or done == end:
                loss_value = mean_over_ranks(window_loss, dist).item() / window_steps
                log.metrics({"step": done, "loss": loss_value, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)})
                window_loss, window_steps = None, 0
            signalled = any_rank(flag.signal is not None, dist, device)
            if done % t.val_every == 0 or done == end or signalled:
                if not signalled:
                    per_class = evaluate(unetr, val_data, cfg, device, precision)
                    val_dice = sum(per_class) / len(per_class)
                    log.metrics(
                        {"step": done, "val_dice": val_dice, **{f"val_dice_{c}": d for c, d in enumerate(per_class, 1)}}
                    )
                ckpt = {
                    "config": cfg.to_dict(),
                    "model": unetr.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": done,
                    "rng": rng_state(),
                    "val_dice": val_dice,
                    "best_dice": best if val_dice is None else max(best, val_dice),
                    "encoder_tensors": loaded,
                }
                if dist.is_main and val_dice is not None and val_dice > best:
                    save_seg_checkpoint(ckpt, ckpt_dir / "best.pt")
                    log.info(
                        f"step {done}: validation Dice {val_dice:.4f}, new best, written to {ckpt_dir / 'best.pt'}"
                    )
                best = ckpt["best_dice"]
                if dist.is_main:
                    save_seg_checkpoint(ckpt, ckpt_dir / "last.pt")
            if on_step:
                on_step({"step": done, "loss": loss_value, "lr": lr, "val_dice": val_dice})
            if signalled:
                stopped = f"stop signal ({flag.signal or 'on another rank'}) after step {done}"
                log.info(f"stopped: {stopped}; last.pt written, resume with --resume")
                break
    log.close()
    return {
        "start_step": start,
        "steps": done,
        "stopped": stopped,
        "total_steps": total,
        "last_loss": log.last_loss,
        "best_dice": best,
        "last_dice": None if per_class is None else sum(per_class) / len(per_class),
        "dice_per_class": per_class,
        "seconds": time.perf_counter() - t0,
        "encoder_tensors": loaded,
        "best": str(ckpt_dir / "best.pt"),
        "last": str(ckpt_dir / "last.pt"),
        "device": device.type,
        "precision": precision,
    }
