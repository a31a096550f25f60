"""What ``pretrain`` and ``finetune`` share: the run folder's rules, the CPU plan, and the training loop's progress
told to the reporter."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctmae.api.common import SILENT, OptionError, Reporter
from ctmae.runtime.distributed import DistInfo, barrier, setup

RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "train.log", "checkpoints", "tensorboard")


def last_checkpoint(out: str | os.PathLike) -> Path:
    """``RUN_DIR/checkpoints/last.pt``: what ``resume`` continues."""
    return Path(out) / "checkpoints" / "last.pt"


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty RUN_DIR unless resuming or overwriting; ``overwrite`` removes only ctmae's own outputs."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: --out must be a folder, but a file is there")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise OptionError(
            f"{out}: folder is not empty; pass --resume to continue that run or --overwrite to replace it"
        )
    if overwrite and not resume and out.is_dir():
        for name in RUN_OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".ctmae-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OptionError(f"{out}: cannot write there ({e.strerror}){_write_hint(e)}") from None


def _write_hint(e: OSError) -> str:
    """How to fix an unwritable output folder; in a container, the usual cause is a uid that does not own it."""
    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ""
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return (
            f"; this container runs as uid {os.getuid()}: run it as the folder's owner "
            f"(docker run --user $(id -u):$(id -g) ...) or mount a folder that uid may write"
        )
    return f"; uid {os.getuid()} may not write there: choose another --out or fix the folder's permissions"


def open_run_dir(out: Path, resume: bool, overwrite: bool, device: str | None) -> DistInfo:
    """Join torchrun's process group (if any) and prepare RUN_DIR on rank 0, the only rank that writes."""
    dist = setup(device or "auto")
    if dist.is_main:
        prepare_run_dir(out, resume, overwrite)
    barrier(dist)
    return dist


def rank_reporter(reporter: Reporter, dist: DistInfo) -> Reporter:
    """Rank 0 alone talks under torchrun: the other ranks do the same work and would repeat every line."""
    return reporter if dist.is_main else SILENT


def plan_workers(threads: int | None, device: str, workers: int | None, item_bytes: int, reporter: Reporter) -> int:
    """Plan and apply this process's threads (``ctmae.runtime.resources``), tell the reporter the budget line and
    any note, and return the loader workers to use.

    Raises:
        OptionError: a bad ``threads`` or ``CTMAE_THREADS``.
    """
    import torch

    from ctmae.runtime.resources import plan_resources

    cuda = device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())
    try:
        res = plan_resources(threads, "cuda" if cuda else "cpu", workers, item_bytes)
    except ValueError as e:
        raise OptionError(str(e)) from None
    reporter.say(res.describe())
    for line in res.notes:
        reporter.note(line)
    return res.workers


def training_callbacks(
    what: str,
    out: Path,
    resume: bool,
    reporter: Reporter,
    describe: Callable[[dict[str, Any]], list[str]],
    status: Callable[[dict[str, Any]], str],
) -> tuple[Callable[[dict[str, Any]], None], Callable[[dict[str, Any]], None]]:
    """The training loop's ``on_start`` and ``on_step``, told to ``reporter``: the steps as progress from where the
    run starts, "resuming from step N" (or why a resume starts fresh), ``describe``'s lines, then each step with the
    ``status`` line the step's figures make (empty: unchanged)."""

    def started(info: dict[str, Any]) -> None:
        reporter.start(what, info["total_steps"], done=info["start_step"])
        if info["start_step"]:
            reporter.say(f"resuming from step {info['start_step']} ({last_checkpoint(out)})")
        elif resume:
            reporter.say(f"no checkpoint in {out}, starting fresh")
        for line in describe(info):
            reporter.say(line)

    def stepped(info: dict[str, Any]) -> None:
        reporter.progress(info["step"], status(info))

    return started, stepped
