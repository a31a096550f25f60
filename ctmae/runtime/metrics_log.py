"""A run's logs: ``metrics.jsonl`` (one JSON object per logged step), ``train.log``, TensorBoard if installed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends to the run folder's logs; lines survive a crash because each write is flushed."""

    def __init__(self, run_dir: Path, start_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled  # only rank 0 of a distributed run writes
        self.last_loss: float | None = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.is_file():  # on resume, rows after the checkpoint's step are redone: drop the stale ones
            rows = [
                r
                for r in path.read_text(encoding="utf-8").splitlines()
                if r.strip() and json.loads(r)["step"] <= start_step
            ]
            path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        self.metrics_file = open(path, "a", encoding="utf-8")
        self.log_file = open(run_dir / "train.log", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def metrics(self, row: dict[str, Any]) -> None:
        self.last_loss = row.get("loss", self.last_loss)
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def info(self, line: str) -> None:
        if not self.enabled:
            return
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.log_file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        self.log_file.close()
        if self.tb is not None:
            self.tb.close()
