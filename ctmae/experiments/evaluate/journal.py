"""The evaluation's journal: one JSON line per finished unit of work, so ``--resume`` skips what is done.

The first line records what the figures depend on (settings, checkpoint hashes, case split); a resumed evaluation
must match it. Each later line is one unit's result, flushed and fsynced as soon as the unit ends, so a killed
evaluation loses at most the unit in progress.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VERSION = 1


class ResumeMismatch(ValueError):
    """``--resume`` on a journal written with other settings, checkpoints or cases (a usage error)."""


class Journal:
    """Append-only JSON lines: a header, then ``{"unit": id, "result": {...}}`` per finished unit."""

    def __init__(self, path: Path, header: dict[str, Any], resume: bool) -> None:
        self.path, self.header = path, {"journal": VERSION, **header}
        self.done: dict[str, dict[str, Any]] = {}
        if resume and path.is_file():
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.header) + "\n", encoding="utf-8")

    def _read(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line a crash cut short: drop it, the unit is redone
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        lines = data.decode().splitlines()
        found = json.loads(lines[0]) if lines else {}
        if found != json.loads(json.dumps(self.header)):
            differs = sorted(k for k in set(found) | set(self.header) if found.get(k) != self.header.get(k))
            raise ResumeMismatch(
                f"{self.path}: this evaluation was started with other {', '.join(differs) or 'settings'}; "
                f"resume with the same checkpoints, cases and options, or pass --overwrite to start again"
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.done[record["unit"]] = record["result"]

    def record(self, unit: str, result: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"unit": unit, "result": result}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[unit] = result
