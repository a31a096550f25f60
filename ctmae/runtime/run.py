"""The skeleton every training loop shares: device and precision, steps, resume, DDP, config.yaml, the run's logs,
the windowed loss, stop signals and the checkpoint that ends a stopped run.

A loop calls ``open_run`` once, restores its model and optimiser from ``run.state`` (a checkpoint to resume, or
None), wraps the model with ``run.wrap``, and then for each step asks ``run.stop_requested()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctmae.runtime.checkpoint import rng_state, set_rng_state
from ctmae.runtime.device import autocast_for, resolve_device, resolve_precision
from ctmae.runtime.distributed import DistInfo, any_rank, mean_over_ranks
from ctmae.runtime.files import sweep_temporaries
from ctmae.runtime.loader import LoaderStopped
from ctmae.runtime.lr_schedule import resolve_steps
from ctmae.runtime.metrics_log import MetricsLog
from ctmae.runtime.signals import StopFlag


@dataclass
class Run:
    """One training run's runtime state. ``cfg`` has ``train.steps``, ``device`` and ``precision`` resolved."""

    cfg: Any
    run_dir: Path
    dist: DistInfo
    device: torch.device
    precision: str
    total: int  # steps of the whole run
    end: int  # the step this process stops after (``stop_at``, else ``total``)
    state: dict[str, Any] | None  # the checkpoint resumed from
    log: MetricsLog = field(init=False)
    flag: StopFlag = field(default_factory=StopFlag)
    started: float = field(default_factory=time.perf_counter)
    _loss: torch.Tensor | None = None
    _loss_steps: int = 0

    @property
    def start(self) -> int:
        return int(self.state["step"]) if self.state else 0

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def autocast(self):
        return autocast_for(self.precision, self.device)

    def scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler (disabled otherwise), restored from the resumed checkpoint."""
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.state is not None:
            scaler.load_state_dict(self.state["scaler"])
        return scaler

    def restore_rng(self) -> None:
        if self.state is not None:
            set_rng_state(self.state["rng"])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun; the model itself in one process."""
        if self.dist.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def begin(self, description: str) -> None:
        """Write config.yaml (rank 0), open the logs, log the start line and remove what a killed write left."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save_yaml(self.run_dir / "config.yaml")
        self.log = MetricsLog(self.run_dir, start_step=self.start, enabled=self.dist.is_main)
        self.log.info(
            f"{'resuming at' if self.start else 'starting'} step {self.start} of {self.total} on {self.device.type} "
            f"({self.precision}), {self.dist.world} process(es); {description}"
        )
        if self.dist.is_main:  # a job killed while it wrote a checkpoint left its temporary file behind
            removed, size = sweep_temporaries(self.checkpoints)
            if removed:
                self.log.info(
                    f"removed {removed} unfinished checkpoint file(s) ({size / 2**20:.0f} MiB) in {self.checkpoints} "
                    f"left by a run killed while it wrote"
                )

    def start_info(self, **extra: Any) -> dict[str, Any]:
        """What a loop's ``on_start`` callback receives: where the run starts and ends, on what, plus ``extra``."""
        return {
            "start_step": self.start,
            "total_steps": self.total,
            "device": self.device.type,
            "precision": self.precision,
            **extra,
        }

    def add_loss(self, loss: torch.Tensor) -> None:
        """Sum a step's loss on the device (no host sync) until the next logged step."""
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        self._loss_steps += 1

    def log_loss(self, step: int, **extra: Any) -> float | None:
        """Log the mean loss over the steps since the last log (all ranks) when ``step`` is a logging step."""
        if not self._loss_steps or not (step % self.cfg.train.log_every == 0 or step == self.end):
            return None
        loss = mean_over_ranks(self._loss, self.dist).item() / self._loss_steps
        self.log.metrics({"step": step, "loss": loss, **extra, "seconds": round(time.perf_counter() - self.started, 3)})
        self._loss, self._loss_steps = None, 0
        return loss

    def next_batch(self, batches: Iterator[Any]) -> Any | None:
        """The loader's next batch, or None when a stop signal came while this process waited for it."""
        try:
            return next(batches)
        except LoaderStopped:
            return None

    def stop_requested(self) -> bool:
        """Whether a stop signal reached any rank (every rank agrees, so all checkpoint and stop together)."""
        return any_rank(self.flag.signal is not None, self.dist, self.device)

    def stopped_by_signal(self, step: int) -> str:
        reason = f"stop signal ({self.flag.signal or 'on another rank'}) after step {step}"
        self.log.info(f"stopped: {reason}; {self.checkpoints / 'last.pt'} written, resume with --resume")
        return reason

    def training_state(self, step: int, **parts: Any) -> dict[str, Any]:
        """The checkpoint dict every loop writes: config, step, RNG, plus the loop's parts (model, optimiser...)."""
        return {"config": self.cfg.to_dict(), "step": step, "rng": rng_state(), **parts}

    def figures(self, step: int) -> dict[str, Any]:
        """The figures every loop returns."""
        return {
            "start_step": self.start,
            "steps": step,
            "total_steps": self.total,
            "last_loss": self.log.last_loss,
            "seconds": time.perf_counter() - self.started,
            "device": self.device.type,
            "precision": self.precision,
            "interrupted": self.flag.interrupted,
        }


def open_run(
    cfg: Any,
    run_dir: Path,
    dist: DistInfo,
    num_volumes: int,
    crops_per_volume: int,
    load: Callable[[Path], dict[str, Any]],
    resume: bool,
    stop_at: int | None,
) -> Run:
    """Resolve device, precision and steps (the global batch counts every rank), and load the checkpoint to resume.

    Args:
        cfg: a run config (``ctmae.runtime.config.Sections``) with a ``train`` section.
        run_dir: the run folder; ``checkpoints/last.pt`` there is continued when ``resume``.
        dist: this process's rank under torchrun.
        num_volumes, crops_per_volume: what an epoch covers (for ``train.epochs``).
        load: reads a checkpoint of this run's kind (one-line ``CheckpointError`` for bad files).
        resume: continue from ``last.pt`` when it exists (start fresh otherwise).
        stop_at: end this process after this step (checkpointing it), as a preempted job would.
    """
    device = resolve_device(cfg.train.device, dist)
    precision = resolve_precision(cfg.train.precision, device)
    total = resolve_steps(cfg.train, num_volumes, crops_per_volume, cfg.train.batch_size * dist.world)
    cfg = cfg.replace(train={"steps": total, "device": device.type, "precision": precision})
    last = run_dir / "checkpoints" / "last.pt"
    state = load(last) if resume and last.is_file() else None
    end = min(total, stop_at) if stop_at is not None else total
    return Run(cfg, run_dir, dist, device, precision, total, end, state)
