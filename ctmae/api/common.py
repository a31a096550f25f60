"""What the API functions share: the reporter that hears their progress and warnings, and the error for arguments
that cannot work.

An API function prints nothing. A caller who wants to follow the work passes a ``Reporter``; the default one does
nothing, and everything it would have heard is also in the function's result (warnings, skipped inputs).
"""

from __future__ import annotations

from collections.abc import Sequence


class OptionError(ValueError):
    """An argument that cannot work with this checkpoint or these inputs (the CLI: a usage error, exit code 2)."""


class Reporter:
    """Hears an API function's progress and warnings as they happen; every method does nothing unless overridden.

    The CLI's reporter draws progress bars and prints warnings (``ctmae.cli.common.ProgressReporter``); a notebook
    may subclass this one, or pass none.
    """

    def start(self, what: str, total: int | None, done: int = 0) -> None:
        """Work of ``total`` units (scans, volumes, steps; None: not known yet) named ``what`` begins, ``done`` of
        them already done (a resumed training run)."""

    def advance(self, line: str = "") -> None:
        """One unit of the work is done; ``line`` says what it produced (empty: nothing worth a line)."""

    def progress(self, done: int, status: str = "") -> None:
        """``done`` units of the work are done so far; ``status`` is a short state (loss, crops/s; empty: as
        before). Training reports its steps this way."""

    def say(self, line: str) -> None:
        """A line of news: what a run found, where it starts, what it trains on."""

    def note(self, line: str) -> None:
        """A one-line note that asks for nothing: a duplicate scan used once, loader workers cut to fit memory."""

    def windows(self, done: int, total: int) -> None:
        """``done`` of the ``total`` sliding windows of the scan in progress are done (long scans take minutes)."""

    def warn(self, line: str) -> None:
        """A one-line warning: an input unlike the checkpoint's training data, a setting that may not do well."""

    def skipped(self, lines: Sequence[str]) -> None:
        """Inputs left out, one line each (``ctmae.io.discovery.Note`` lines skip no input: files not scans)."""


SILENT = Reporter()
