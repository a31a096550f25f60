"""Pretraining loop: seeded crops -> token masks on the device -> MAE loss -> AdamW step -> metrics, checkpoints.

Knows nothing of the CLI: ``pretrain`` takes a config, volumes and a run folder, reports through callbacks and
returns a plain dict of figures.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ctmae.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ctmae.config import RunConfig, save_yaml
from ctmae.data import crop_batches
from ctmae.io import VolumeSource
from ctmae.masking import corrupt, sample_mask
from ctmae.metrics_log import MetricsLog
from ctmae.model import MaskedAutoencoder3D

DEFAULT_STEPS = 1000


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU; half precision on CPU is refused (slow and unsupported by SDPA)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {name} needs a CUDA device; use fp32 on CPU")
    return name


def resolve_steps(cfg: RunConfig, num_volumes: int) -> int:
    """Steps to train: ``train.steps``, else epochs over all crops (volumes x crops_per_volume), else the default."""
    t = cfg.train
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * num_volumes * cfg.data.crops_per_volume / t.batch_size))
    return DEFAULT_STEPS


def lr_factor(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` x total steps, then cosine decay to ``min_ratio`` of the peak."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, embeddings and the mask token (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=False)


def pretrain(
    cfg: RunConfig,
    sources: Sequence[VolumeSource],
    run_dir: Path,
    resume: bool = False,
    stop_at: int | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the MAE and write ``run_dir``: config.yaml, metrics.jsonl, train.log, checkpoints/.

    Args:
        cfg: the run's settings (``train.steps`` may be None: resolved here and saved).
        sources: usable, already cached volumes (see ``ctmae.data.prepare_cache``).
        run_dir: output folder; ``checkpoints/last.pt`` there is continued when ``resume``.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (start fresh otherwise).
        stop_at: end this process after this step (checkpointing it), as a preempted job would; resume continues.
        on_start: called once with ``{"start_step", "total_steps", "device", "precision"}``.
        on_step: called after each step with ``{"step", "loss", "lr"}`` (loss only on logged steps, else None).

    Returns:
        Figures of the run: steps, first/last logged loss, seconds, crops per second, checkpoint path.
    """
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    total = resolve_steps(cfg, len(sources))
    cfg = cfg.replace(train={"steps": total, "device": device.type, "precision": precision})
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last) if resume and last.is_file() else None

    torch.manual_seed(cfg.train.seed)
    model = MaskedAutoencoder3D(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    t = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, t.warmup, t.min_lr / t.lr if t.lr else 0.0)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = state["step"]
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, start_step=start)
    log.info(f"{'resuming at' if start else 'starting'} step {start} of {total} on {device.type} ({precision})")
    if on_start:
        on_start({"start_step": start, "total_steps": total, "device": device.type, "precision": precision})

    end = min(total, stop_at) if stop_at is not None else total
    batches = crop_batches(sources, cfg.data, t.seed, t.batch_size, start_step=start)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16") else contextlib.nullcontext()
    )
    model.train()
    t0, window_loss, window_steps, first_loss, loss_value = time.perf_counter(), None, 0, None, None
    for step in range(start, end):
        images = next(batches).to(device, non_blocking=True)  # (B, 1, c, c, c)
        gen = torch.Generator(device).manual_seed(t.seed * 1_000_003 + step)  # masks repeat exactly on resume
        mask = sample_mask(cfg.mask, images.shape[0], model.grid(images), gen, device)
        with autocast:
            loss, _, _ = model(images, mask, inputs=corrupt(images, cfg.mask, gen))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()  # no host sync
        window_steps += 1
        done = step + 1
        loss_value = None
        if done % t.log_every == 0 or done == end:
            loss_value = window_loss.item() / window_steps
            first_loss = loss_value if first_loss is None else first_loss
            seconds = time.perf_counter() - t0
            log.metrics({"step": done, "loss": loss_value, "lr": lr, "seconds": round(seconds, 3),
                         "crops_per_s": round((done - start) * t.batch_size / seconds, 3)})
            window_loss, window_steps = None, 0
        if done % t.ckpt_every == 0 or done == end:
            state = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": done,
                     "rng": rng_state()}
            save_checkpoint(state, last)
            if done % t.ckpt_every == 0:
                save_checkpoint(state, run_dir / "checkpoints" / f"step_{done:07d}.pt")
            log.info(f"step {done}: checkpoint written to {last}")
        if on_step:
            on_step({"step": done, "loss": loss_value, "lr": lr})
    log.close()
    seconds = time.perf_counter() - t0
    return {"start_step": start, "steps": end, "total_steps": total, "first_loss": first_loss,
            "last_loss": log.last_loss, "seconds": seconds, "crops_per_s": (end - start) * t.batch_size / seconds,
            "checkpoint": str(last), "device": device.type, "precision": precision}
