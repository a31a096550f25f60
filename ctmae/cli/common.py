"""What every subcommand shares: the Typer app, the consoles, one-line errors with exit codes, progress bars."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ctmae.api.common import OptionError, Reporter
from ctmae.io.checks import InputError
from ctmae.io.discovery import Note
from ctmae.runtime.checkpoint import CheckpointError
from ctmae.runtime.loader import LoaderError, worker_failure
from ctmae.runtime.resources import Resources, plan_resources
from ctmae.runtime.signals import Stopped

INPUTS_HELP = (
    "Scans: NIfTI/NRRD/MHA files, DICOM series (a folder, or the files of one), multi-frame DICOM files, folders"
    " (searched recursively) or .txt/.csv lists."
)
THREADS_HELP = (
    "CPU cores this command may keep busy (default: its budget: the affinity mask, cgroup CPU quota, "
    "SLURM_CPUS_PER_TASK or CTMAE_THREADS, whichever is smallest)"
)
WORKERS_HELP = "Data loader processes (default: from the CPU budget, and as many as /dev/shm holds)"
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


# Help texts as users of other command lines read them: "CHECKPOINT INPUT" in the usage line (Typer >= 0.20 writes
# "{checkpoint} {input}"), and no "<bool>" type column for flags such as --resume or --help.
def _usage_name(self: typer.core.TyperArgument) -> str:
    name = (self.metavar or self.name or "").upper()
    name = name if self.required else f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


def _type_column(self: typer.core.TyperOption, ctx) -> str | None:
    return None if self.is_flag else _typer_display_type(self, ctx)


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name
if hasattr(typer.core.TyperOption, "display_type_rich"):
    _typer_display_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = _type_column
console = Console()
errors = Console(stderr=True)


@app.callback()
def _group() -> None:
    """Self-supervised masked pretraining on CT volumes (3D masked autoencoder): pretrain, then reconstruct, embed or
    fine-tune for segmentation."""


class UsageError(Exception):
    """Bad options or paths given by the user: exit code 2."""


def warn(line: str) -> None:
    """One yellow ``warning:`` line on stderr; the text is shown as it is, never read as rich markup."""
    errors.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


def note(line: str) -> None:
    """One yellow ``note:`` line on stderr: a fact that asks for nothing; shown as it is, never read as markup."""
    errors.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


def run_command(body: Callable[[], None]) -> None:
    """Run a command body: user-facing errors become one line and an exit code, never a traceback.

    Exit codes: 2 usage errors (and the API's ``OptionError``), 1 data/checkpoint errors and internal errors, 130
    interrupted; a stop signal that ended the work (``Stopped``) exits as ``end_stopped_work`` says.
    """
    try:
        body()
    except Stopped as e:
        end_stopped_work(e.signal, e.kept)
    except (UsageError, OptionError) as e:
        errors.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (InputError, CheckpointError, LoaderError, ValueError, OSError) as e:
        errors.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:  # a bug, not a user error: still one line, with a way to see more
        if worker_failure(e):  # a loader worker died (torch raises that wherever the process is): not a bug
            errors.print(f"[red]error:[/red] {escape(str(worker_failure(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        if os.environ.get("CTMAE_DEBUG"):
            raise
        errors.print(
            f"[red]internal error:[/red] {type(e).__name__}: {escape(str(e))} (set CTMAE_DEBUG=1 for more)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def use_resources(
    threads: int | None, device: str | None, workers: int | None, item_bytes: int = 0, show: bool = True
) -> Resources:
    """Plan this command's threads and loader workers (``ctmae.runtime.resources``) and print (``show``) the budget
    line and any note (workers cut to what /dev/shm holds)."""
    import torch

    cuda = device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())
    try:
        res = plan_resources(threads, "cuda" if cuda else "cpu", workers, item_bytes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if show:
        console.print(res.describe(), highlight=False, soft_wrap=True)
    for line in res.notes:
        note(line)
    return res


def check_steps_or_epochs(steps: int | None, epochs: float | None) -> None:
    """Refuse --steps with --epochs (UsageError): each sets the run's length, and one would silently win."""
    if steps is not None and epochs is not None:
        raise UsageError(
            f"--steps {steps} and --epochs {epochs:g} both set the run's length; give one of them "
            "(--epochs N: N passes over all crops)"
        )


def given_options(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Config sections of the options the user gave: those left at None are dropped (the config's value stays)."""
    return {name: {k: v for k, v in values.items() if v is not None} for name, values in sections.items()}


def end_stopped_run(result: dict) -> None:
    """After a run that stopped early: say why; Ctrl-C exits 130 (after its checkpoint), a stop signal exits 0,
    anything else that left steps undone exits 1."""
    if not result["stopped"]:
        return
    errors.print(f"[yellow]stopped early:[/yellow] {escape(result['stopped'])}", highlight=False, soft_wrap=True)
    if result["interrupted"]:
        errors.print(f"interrupted: checkpoint saved at step {result['steps']}; --resume continues", highlight=False)
        raise typer.Exit(130)
    if result["steps"] < result["total_steps"] and "signal" not in result["stopped"]:
        raise typer.Exit(1)


def end_stopped_work(signal_name: str, kept: str) -> None:
    """After a stop signal ended a command that is not a training run (predict, reconstruct, embed): one line naming
    the signal and what is kept; exit codes as ``end_stopped_run``: 130 after Ctrl-C, 0 after SIGTERM/SIGUSR1."""
    line = f"stop signal ({signal_name})" + (f"; {kept}" if kept else "")
    errors.print(f"[yellow]stopped early:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(130 if signal_name == "SIGINT" else 0)


def report_skipped(problems: list[str]) -> None:
    """One yellow line per skipped input, then any note (files that are not scans were ignored; nothing skipped)."""
    for line in sorted(problems, key=lambda line: isinstance(line, Note)):  # stable: the order stays otherwise
        tag = "note" if isinstance(line, Note) else "skipped"
        errors.print(f"[yellow]{tag}:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


def progress_bar() -> Progress:
    """A rich progress bar with a free-text ``info`` field (loss, rates)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def windows_bar(progress: Progress) -> Callable[[int, int], None]:
    """An ``on_windows(done, total)`` callback that shows the sliding windows of the scan in progress as a second
    bar of ``progress`` (long scans take minutes on a CPU)."""
    task = progress.add_task("  windows of the scan", total=None, info="", visible=False)
    last = [0]

    def update(done: int, total: int) -> None:
        if done <= last[0]:  # the next scan's first windows
            progress.reset(task, total=total, completed=done, visible=True)
        progress.update(task, completed=done, total=total, visible=True)
        last[0] = done

    return update


class ProgressReporter(Reporter):
    """The CLI's reporter (``ctmae.api.common.Reporter``): a bar over the work's units once it starts, a second bar
    below it over the windows of the scan in progress, and one line per unit done, warning and skipped input.

    Args:
        rate: a unit name (e.g. "scans") to show units per second beside the units' bar.
    """

    def __init__(self, rate: str = "") -> None:
        self.bars = progress_bar()
        self._rate = rate
        self._task: TaskID | None = None
        self._windows: Callable[[int, int], None] | None = None

    def __enter__(self) -> ProgressReporter:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def start(self, what: str, total: int | None, done: int = 0) -> None:
        # nothing to do (every input skipped, every scan already done) draws no bar: an empty 0/0 would stand
        # between the skip lines and the outcome
        self._task = None if total == 0 else self.bars.add_task(what, total=total, completed=done, info="")

    def advance(self, line: str = "") -> None:
        if self._task is not None:
            self.bars.advance(self._task)
            if self._rate:
                speed = self.bars.tasks[self._task].speed or 0.0
                self.bars.update(self._task, info=f"{speed:.2f} {self._rate}/s")
        if line:
            console.print(line, highlight=False, soft_wrap=True)

    def progress(self, done: int, status: str = "") -> None:
        if self._task is not None:
            self.bars.update(self._task, completed=done, **({"info": status} if status else {}))

    def say(self, line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    def note(self, line: str) -> None:
        note(line)

    def windows(self, done: int, total: int) -> None:
        if self._windows is None:  # made on first use, so that it is drawn below the units' bar
            self._windows = windows_bar(self.bars)
        self._windows(done, total)

    def warn(self, line: str) -> None:
        warn(line)

    def skipped(self, lines: Sequence[str]) -> None:
        report_skipped(list(lines))


def sample_data_dir() -> Path:
    """The bundled sample scans: $CTMAE_SAMPLE_DATA, the repository's sample_data/, or ./sample_data."""
    candidates = [
        os.environ.get("CTMAE_SAMPLE_DATA"),
        Path(__file__).resolve().parents[2] / "sample_data",
        Path.cwd() / "sample_data",
    ]
    for c in candidates:
        if c and (Path(c) / "ct").is_dir():
            return Path(c)
    raise UsageError("no INPUTS given and the bundled sample_data/ folder was not found; pass scans explicitly")


def quiet_other_ranks() -> None:
    """Under torchrun rank 0 alone talks: the other ranks do the same work and would repeat every line."""
    if int(os.environ.get("RANK", "0")):
        console.quiet = errors.quiet = True
