"""Pretraining loop: seeded crops -> token masks on the device -> MAE loss -> AdamW step -> metrics, checkpoints.

Knows nothing of the CLI: ``pretrain`` takes a config, volumes and a run folder, reports through callbacks and
returns a plain dict of figures.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ctmae.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ctmae.config import RunConfig, save_yaml
from ctmae.data import crop_batches
from ctmae.distributed import DistInfo, any_rank, mean_over_ranks
from ctmae.inputs import VolumeSource
from ctmae.masking import TokenMask, corrupt, sample_mask
from ctmae.metrics_log import MetricsLog
from ctmae.model import MaskedAutoencoder3D
from ctmae.optim import build_optimizer, updater

DEFAULT_STEPS = 1000
MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run gives up
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before the time limit


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


def resolve_steps(cfg: RunConfig, num_volumes: int, global_batch: int) -> int:
    """Steps to train: ``train.steps``, else epochs over all crops (volumes x crops_per_volume), else the default."""
    t = cfg.train
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * num_volumes * cfg.data.crops_per_volume / global_batch))
    return DEFAULT_STEPS


def lr_factor(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` x total steps, then cosine decay to ``min_ratio`` of the peak."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for bf16/fp16 (resolved by ``resolve_precision``); nothing for fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop finishes its step, checkpoints and returns. Restores handlers on exit."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pretrain(
    cfg: RunConfig,
    sources: Sequence[VolumeSource],
    run_dir: Path,
    resume: bool = False,
    stop_at: int | None = None,
    dist: DistInfo = DistInfo(),
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
        dist: this process's rank under torchrun; ranks read disjoint volumes, rank 0 alone writes files.
        on_start: called once with ``{"start_step", "total_steps", "device", "precision", "global_batch"}``.
        on_step: called after each step with ``{"step", "loss", "lr"}`` (loss only on logged steps, else None).

    Returns:
        Figures of the run: steps, first/last logged loss, seconds, crops per second, checkpoint path,
        ``stopped`` (None, or why the run ended early: a signal, repeated non-finite losses) and ``model``, the
        trained MAE.
    """
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    global_batch = cfg.train.batch_size * dist.world
    total = resolve_steps(cfg, len(sources), global_batch)
    cfg = cfg.replace(train={"steps": total, "device": device.type, "precision": precision})
    t = cfg.train
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last) if resume and last.is_file() else None

    torch.manual_seed(t.seed)
    model = MaskedAutoencoder3D(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    min_ratio = t.min_lr / t.lr if t.lr else 0.0  # the lr is a pure function of the step: no scheduler state
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:  # sizes changed since the checkpoint (e.g. --model, --patch or --crop on --resume)
            raise CheckpointError(
                f"{last}: the checkpoint's model does not fit the requested sizes; resume without changing "
                f"--model, --patch or --crop, or start a new RUN_DIR"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = state["step"]
    net = model
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, start_step=start, enabled=dist.is_main)
    log.info(
        f"{'resuming at' if start else 'starting'} step {start} of {total} on {device.type} ({precision}), "
        f"{dist.world} process(es), global batch {global_batch}"
    )
    if on_start:
        on_start(
            {
                "start_step": start,
                "total_steps": total,
                "device": device.type,
                "precision": precision,
                "global_batch": global_batch,
            }
        )

    def checkpoint(step: int, periodic: bool) -> None:
        if not dist.is_main:
            return
        ckpt = {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "rng": rng_state(),
        }
        save_checkpoint(ckpt, last)
        if periodic:
            save_checkpoint(ckpt, run_dir / "checkpoints" / f"step_{step:07d}.pt")
        log.info(f"step {step}: checkpoint written to {last}")

    end = min(total, stop_at) if stop_at is not None else total
    batches = crop_batches(sources, cfg.data, t.seed, t.batch_size, start_step=start, rank=dist.rank, world=dist.world)
    autocast = autocast_for(precision, device)
    net.train()
    t0, window, window_steps, first_loss, bad_steps, skipped, stopped = time.perf_counter(), None, 0, None, 0, 0, None
    step = start
    with StopFlag() as flag, updater(model, optimizer, scaler, t.grad_clip, dist.world) as update:
        while step < end:
            images = next(batches).to(device, non_blocking=True)  # (B, 1, c, c, c)
            gen = torch.Generator(device).manual_seed(t.seed * 1_000_003 + step)  # masks repeat exactly on resume
            mask = _rank_slice(sample_mask(cfg.mask, global_batch, model.grid(images), gen, device), dist)
            with autocast:
                loss, _, _ = net(images, mask, inputs=corrupt(images, cfg.mask, gen))
            finite = (
                bool(torch.isfinite(loss).all())
                if dist.world == 1
                else not any_rank(not bool(torch.isfinite(loss).all()), dist, device)
            )
            lr = t.lr * lr_factor(step, total, t.warmup, min_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if finite:  # a non-finite loss skips the update: weights stay as they were
                update(loss)
                bad_steps = 0
                window = loss.detach() if window is None else window + loss.detach()  # summed on device: no sync
                window_steps += 1
            else:
                bad_steps, skipped = bad_steps + 1, skipped + 1
                log.info(f"step {step + 1}: non-finite loss, update skipped ({bad_steps} in a row)")
            step += 1
            if bad_steps >= MAX_BAD_STEPS:
                stopped = f"{MAX_BAD_STEPS} non-finite losses in a row, the last at step {step}"
                log.info(f"stopped: {stopped}; the last good checkpoint is kept")
                break
            logged = None
            if (step % t.log_every == 0 or step == end) and window_steps:
                logged = mean_over_ranks(window, dist).item() / window_steps
                first_loss = logged if first_loss is None else first_loss
                seconds = time.perf_counter() - t0
                log.metrics(
                    {
                        "step": step,
                        "loss": logged,
                        "lr": lr,
                        "seconds": round(seconds, 3),
                        "crops_per_s": round((step - start) * global_batch / seconds, 3),
                    }
                )
                window, window_steps = None, 0
            signalled = any_rank(flag.signal is not None, dist, device)
            if ((step % t.ckpt_every == 0 or step == end) and bad_steps == 0) or signalled:  # keep the last good
                checkpoint(step, periodic=step % t.ckpt_every == 0)
            if on_step:
                on_step({"step": step, "loss": logged, "lr": lr})
            if signalled:
                stopped = f"stop signal ({flag.signal or 'on another rank'}) after step {step}"
                log.info(f"stopped: {stopped}; resume with --resume")
                break
    log.close()
    seconds = time.perf_counter() - t0
    return {
        "start_step": start,
        "steps": step,
        "total_steps": total,
        "first_loss": first_loss,
        "last_loss": log.last_loss,
        "seconds": seconds,
        "crops_per_s": (step - start) * global_batch / seconds,
        "checkpoint": str(last),
        "device": device.type,
        "precision": precision,
        "skipped_steps": skipped,
        "stopped": stopped,
        "global_batch": global_batch,
        "model": model,
    }


def _rank_slice(mask: TokenMask, dist: DistInfo) -> TokenMask:
    """This rank's share of a mask drawn for the global batch, so masks do not depend on the number of ranks."""
    if dist.world == 1:
        return mask
    n = mask.mask.shape[0] // dist.world
    sl = slice(dist.rank * n, (dist.rank + 1) * n)
    return TokenMask(mask.ids_keep[sl], mask.ids_pred[sl], mask.mask[sl])
