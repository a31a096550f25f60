"""Pretraining loop: seeded crops -> token masks on the device -> MAE loss -> AdamW step -> metrics, checkpoints.

Knows nothing of the CLI: ``pretrain`` takes a config, volumes and a run folder, reports through callbacks and
returns a plain dict of figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ctmae.io.discovery import VolumeSource
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.mae.crops import crop_batches
from ctmae.mae.fill_context import pool_factor, visible_voxels
from ctmae.mae.masking import TokenMask, corrupt, sample_mask
from ctmae.mae.model import MaskedAutoencoder3D, build_model
from ctmae.mae.shift import training_reference
from ctmae.runtime.checkpoint import CheckpointError, save_checkpoint
from ctmae.runtime.distributed import DistInfo, any_rank
from ctmae.runtime.lr_schedule import lr_factor
from ctmae.runtime.optim import build_optimizer, updater
from ctmae.runtime.run import Run, open_run

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run gives up


def pretrain(
    cfg: RunConfig,
    sources: Sequence[VolumeSource],
    run_dir: Path,
    resume: bool = False,
    stop_at: int | None = None,
    dist: DistInfo = DistInfo(),
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    monitor: Callable[[int, MaskedAutoencoder3D, Any], None] | None = None,
) -> dict[str, Any]:
    """Train the MAE and write ``run_dir``: config.yaml, metrics.jsonl, train.log, checkpoints/.

    Args:
        cfg: the run's settings (``train.steps`` may be None: resolved here and saved).
        sources: usable, already cached volumes (see ``ctmae.preprocess.build_cache.build_cache``).
        run_dir: output folder; ``checkpoints/last.pt`` there is continued when ``resume``.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (start fresh otherwise).
        stop_at: end this process after this step (checkpointing it), as a preempted job would; resume continues.
        dist: this process's rank under torchrun; ranks read disjoint volumes, rank 0 alone writes files.
        on_start: called once with ``{"start_step", "total_steps", "device", "precision", "global_batch"}``.
        on_step: called after each step with ``{"step", "loss", "lr", "crops_per_s"}`` (loss only on logged steps,
            else None; crops/s of all ranks since the run started, as the summary reports it).
        monitor: called on rank 0 after each step (unless stopping) with ``(step, model, run.log)``; it picks its own
            steps to probe or preview the model (``ctmae.experiments.monitor.TrainingMonitor``).

    Returns:
        Figures of the run: steps, first/last logged loss, seconds, crops per second, checkpoint path,
        ``stopped`` (None, or why the run ended early: a signal, repeated non-finite losses), ``interrupted``
        (the stop was a Ctrl-C) and ``model``, the trained MAE.
    """
    run = open_run(cfg, run_dir, dist, len(sources), cfg.data.crops_per_volume, load_checkpoint, resume, stop_at)
    cfg, t, global_batch = run.cfg, run.cfg.train, run.cfg.train.batch_size * dist.world
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(run.device)
    optimizer = build_optimizer(model, t)
    scaler = run.scaler()
    if run.state is not None:
        _restore(model, optimizer, run)
    net = run.wrap(model)
    run.begin(f"global batch {global_batch}")
    if on_start:
        on_start(run.start_info(global_batch=global_batch))

    def checkpoint(step: int) -> None:
        if not dist.is_main:
            return
        state = run.training_state(
            step, model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict()
        )
        state["shift_reference"] = training_reference(model, sources, cfg.preprocess)  # ctmae.mae.shift
        save_checkpoint(state, run.checkpoints / "last.pt")
        if step % t.ckpt_every == 0:
            save_checkpoint(state, run.checkpoints / f"step_{step:07d}.pt")
        run.log.info(f"step {step}: checkpoint written to {run.checkpoints / 'last.pt'}")

    shard = (run.start, dist.rank, dist.world, cfg.model.fill_context)  # where this rank's crops continue, and how
    batches = crop_batches(sources, cfg.preprocess, cfg.data, t.seed, t.batch_size, *shard)
    min_ratio = t.min_lr / t.lr if t.lr else 0.0  # the lr is a pure function of the step: no scheduler state
    net.train()
    step, losses, bad_steps, skipped, stopped = run.start, [], 0, 0, None
    with run.flag, updater(model, optimizer, scaler, t.grad_clip, dist.world) as update:
        while step < run.end:
            lr = t.lr * lr_factor(step, run.total, t.warmup, min_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = run.next_batch(batches)
            if images is None:  # a stop signal while waiting for data: the last finished step is the checkpoint
                checkpoint(step)
                stopped = run.stopped_by_signal(step)
                break
            loss = _loss(net, model, images, cfg, step, global_batch, run)
            if _finite(loss, run):  # a non-finite loss skips the update: weights stay as they were
                update(loss)
                run.add_loss(loss)
                bad_steps = 0
            else:
                bad_steps, skipped = bad_steps + 1, skipped + 1
                run.log.info(f"step {step + 1}: non-finite loss, update skipped ({bad_steps} in a row)")
            step += 1
            if bad_steps >= MAX_BAD_STEPS:
                stopped = f"{MAX_BAD_STEPS} non-finite losses in a row, the last at step {step}"
                run.log.info(f"stopped: {stopped}; the last good checkpoint is kept")
                break
            rate = (step - run.start) * global_batch / (time.perf_counter() - run.started)
            logged = run.log_loss(step, lr=lr, crops_per_s=round(rate, 3))
            losses += [] if logged is None else [logged]
            signalled = run.stop_requested()
            if ((step % t.ckpt_every == 0 or step == run.end) and bad_steps == 0) or signalled:  # keep the last good
                checkpoint(step)
            if monitor is not None and dist.is_main and not signalled:
                monitor(step, model, run.log)
            if on_step:
                on_step({"step": step, "loss": logged, "lr": lr, "crops_per_s": rate})
            if signalled:
                stopped = run.stopped_by_signal(step)
                break
    batches.close()  # shuts the loader's workers down before the process exits
    run.log.close()
    figures = run.figures(step)
    return {
        **figures,
        "first_loss": losses[0] if len(losses) > 1 else None,  # with one logged row there is no first vs last
        "crops_per_s": (step - run.start) * global_batch / figures["seconds"],
        "checkpoint": str(run.checkpoints / "last.pt"),
        "skipped_steps": skipped,
        "stopped": stopped,
        "global_batch": global_batch,
        "model": model,
    }


def _restore(model: MaskedAutoencoder3D, optimizer: torch.optim.Optimizer, run: Run) -> None:
    """Load the resumed checkpoint's weights, optimiser and RNG state; sizes that changed are one line."""
    try:
        model.load_state_dict(run.state["model"])
    except RuntimeError:  # sizes changed since the checkpoint (e.g. --model, --patch or --crop on --resume)
        raise CheckpointError(
            f"{run.checkpoints / 'last.pt'}: the checkpoint's model does not fit the requested sizes; resume "
            f"without changing --model, --patch or --crop, or start a new RUN_DIR"
        ) from None
    optimizer.load_state_dict(run.state["optimizer"])
    run.restore_rng()


def _loss(
    net: torch.nn.Module,
    model: MaskedAutoencoder3D,
    images: torch.Tensor,
    cfg: RunConfig,
    step: int,
    global_batch: int,
    run: Run,
) -> torch.Tensor:
    """One step's masked-reconstruction loss on this rank's crops (B, 1, c, c, c), or (B, 1, e, e, e) with
    ``model.fill_context`` (``_with_context``)."""
    images = images.to(run.device, non_blocking=True)
    gen = torch.Generator(run.device).manual_seed(cfg.train.seed * 1_000_003 + step)  # masks repeat on resume
    if cfg.model.fill_context:
        images, inputs, mask, maps = _with_context(model, images, cfg, global_batch, gen, run)
    else:
        mask = _rank_slice(sample_mask(cfg.mask, global_batch, model.grid(images), gen, run.device), run.dist)
        inputs, maps = corrupt(images, cfg.mask, gen), None
    with run.autocast():
        loss, _, _ = net(images, mask, inputs=inputs, maps=maps)
    return loss


def _with_context(
    model: MaskedAutoencoder3D, around: torch.Tensor, cfg: RunConfig, global_batch: int, gen: torch.Generator, run: Run
) -> tuple[torch.Tensor, torch.Tensor, TokenMask, torch.Tensor]:
    """Crops, encoder inputs, token mask and fills from crops with ``model.fill_context`` voxels of the scan around
    them (B, 1, e, e, e), NaN beyond the scan: the context is hidden in blocks like the crop (its own mask, drawn on
    its token grid, the crop's mask inside), and the fills read its visible voxels, as reconstruct's fills read the
    whole scan. Returns the crops (B, 1, c, c, c), their inputs, their mask and their fill maps (``model.decode``)."""
    m, c, p = cfg.model.fill_context, cfg.model.img_size, cfg.model.patch
    known = torch.isfinite(around).to(around.dtype)  # (B, 1, e, e, e): 0 beyond the scan
    around = torch.nan_to_num(around)
    centre = (slice(None), slice(None), *[slice(m, m + c)] * 3)
    mask = _rank_slice(sample_mask(cfg.mask, global_batch, model.grid(around[centre]), gen, run.device), run.dist)
    inputs = corrupt(around, cfg.mask, gen)
    big = tuple(n // p for n in around.shape[2:])
    ring = _rank_slice(sample_mask(cfg.mask, global_batch, big, gen, run.device), run.dist)
    visible = visible_voxels(ring.ids_keep, big, p, around)  # (B, 1, e, e, e) 0/1
    visible[centre] = visible_voxels(mask.ids_keep, model.grid(around[centre]), p, around)
    f = pool_factor(p)
    maps = model.fill_context_maps(inputs, visible * known)  # (B, 2S, e/f, e/f, e/f)
    return around[centre], inputs[centre], mask, maps[(slice(None), slice(None), *[slice(m // f, (m + c) // f)] * 3)]


def _finite(loss: torch.Tensor, run: Run) -> bool:
    """Whether the loss is finite on every rank (a rank alone may not skip: DDP's gradients must match)."""
    finite = bool(torch.isfinite(loss).all())
    return finite if run.dist.world == 1 else not any_rank(not finite, run.dist, run.device)


def _rank_slice(mask: TokenMask, dist: DistInfo) -> TokenMask:
    """This rank's share of a mask drawn for the global batch, so masks do not depend on the number of ranks."""
    if dist.world == 1:
        return mask
    n = mask.mask.shape[0] // dist.world
    sl = slice(dist.rank * n, (dist.rank + 1) * n)
    return TokenMask(mask.ids_keep[sl], mask.ids_pred[sl], mask.mask[sl])
