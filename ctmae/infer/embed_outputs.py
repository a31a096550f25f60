"""What ``ctmae embed`` writes and reads back: the rows (.npz, .csv, .parquet), the resume journal and token maps.

Every output is written whole through ``ctmae.runtime.files.atomic_path`` (a full disk is one line naming the file)
and deterministically: the same rows give the same bytes. Outputs and journals written before a column existed
read back with that column's missing value (NaN for ``shift_score``), so an older run still resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctmae.runtime.files import atomic_path

JOURNAL_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry timestamp: the earliest a zip can hold, so bytes repeat


@dataclass(frozen=True)
class Row:
    """One scan's output.

    Attributes:
        id: the scan's privacy-safe id (``ctmae.io.discovery``).
        embedding: pooled encoder features (D,) float32.
        shape: the source scan's shape (X, Y, Z).
        spacing: the source scan's voxel spacing (mm).
        shift_score: how far the scan's encoder features lie from the training scans', relative to how far those
            lie from each other (``ctmae.mae.shift``); NaN when the checkpoint stores no reference of that kind or
            the output predates the column.
    """

    id: str
    embedding: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    shift_score: float = math.nan


def token_name(volume_id: str) -> str:
    """A file name for a scan's token map: readable, no path separators or '..', and unique per id (hash suffix)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", volume_id).replace("..", "_").strip("._-")[:80] or "scan"
    return f"{readable}-{hashlib.sha256(volume_id.encode()).hexdigest()[:10]}"


class Journal:
    """Append-only JSON lines: a header naming weights and pooling, then one row per line, each fsynced."""

    def __init__(self, path: Path, digest: str, pool: str) -> None:
        self.path, self.header = path, {"journal": JOURNAL_VERSION, "weights": digest, "pool": pool}
        self.file = None

    def __enter__(self) -> Journal:
        return self

    def append(self, row: Row) -> None:
        """Add one row (opening the journal, and writing its header, on the first)."""
        if self.file is None:  # opened on the first row, so a run with nothing to do leaves no journal
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0
            self.file = open(self.path, "a", encoding="utf-8")
            if fresh:
                self._write(self.header)
        self._write(
            {
                "id": row.id,
                "embedding": row.embedding.tolist(),
                "shape": list(row.shape),
                "spacing": list(row.spacing),
                "shift_score": row.shift_score,  # NaN is written as JSON's common NaN extension, which json reads
            }
        )

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a line a crash left unfinished, so the next append starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_journal(path: Path, digest: str, pool: str) -> list[Row]:
    """The rows of an unfinished run's journal; ValueError if it was written with other weights or pooling."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the last piece is empty, or a line a crash cut short
    if not complete:
        return []
    header = json.loads(complete[0])
    if header.get("weights") != digest or header.get("pool") != pool:
        raise ValueError(f"{path}: unfinished run with another checkpoint or --pool; delete it or choose another --out")
    return [
        Row(
            r["id"],
            np.asarray(r["embedding"], dtype=np.float32),
            tuple(r["shape"]),
            tuple(r["spacing"]),
            float(r.get("shift_score", math.nan)),  # journals from before the column
        )
        for r in map(json.loads, complete[1:])
    ]


def write_output(out: Path, rows: list[Row]) -> None:
    """Write all rows, whole or not at all (OutputError naming ``out``), the same bytes for the same rows."""
    writer = {".npz": _write_npz, ".csv": _write_csv, ".parquet": _write_parquet}[out.suffix.lower()]
    with atomic_path(out) as tmp:
        writer(tmp, rows)


def _write_npz(path: Path, rows: list[Row]) -> None:
    """Like ``np.savez``, but every zip entry carries the same fixed timestamp (savez stamps the current time)."""
    arrays = {
        "ids": np.array([r.id for r in rows], dtype=str),
        "embeddings": np.stack([r.embedding for r in rows]).astype(np.float32),  # (N, D)
        "shapes": np.array([r.shape for r in rows], dtype=np.int64),  # (N, 3)
        "spacings": np.array([r.spacing for r in rows], dtype=np.float64),  # (N, 3)
        "shift_scores": np.array([r.shift_score for r in rows], dtype=np.float64),  # (N,)
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), buffer.getvalue())


def _write_csv(path: Path, rows: list[Row]) -> None:
    """id, shape ("XxYxZ"), spacing ("sxxsyxsz", exact repr), shift_score (9 significant digits, empty for NaN),
    e0..eN (9 significant digits: float32 round-trips)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "shape", "spacing", "shift_score"] + [f"e{i}" for i in range(len(rows[0].embedding))])
        for r in rows:
            score = "" if math.isnan(r.shift_score) else f"{r.shift_score:.9g}"
            writer.writerow(
                [r.id, "x".join(map(str, r.shape)), "x".join(map(repr, r.spacing)), score]
                + [f"{v:.9g}" for v in r.embedding.tolist()]
            )


def _write_parquet(path: Path, rows: list[Row]) -> None:
    pa, pq = require_pyarrow()
    table = pa.table(
        {
            "id": pa.array([r.id for r in rows], pa.string()),
            "embedding": pa.array([r.embedding.tolist() for r in rows], pa.list_(pa.float32(), len(rows[0].embedding))),
            "shape": pa.array([list(r.shape) for r in rows], pa.list_(pa.int64(), 3)),
            "spacing": pa.array([list(r.spacing) for r in rows], pa.list_(pa.float64(), 3)),
            "shift_score": pa.array([r.shift_score for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, path)


def read_output(out: Path) -> list[Row]:
    """The rows of an earlier output file (for resume); ValueError naming the file if it cannot be read."""
    try:
        suffix = out.suffix.lower()
        if suffix == ".npz":
            return _read_npz(out)
        if suffix == ".csv":
            return _read_csv(out)
        return _read_parquet(out)
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{out}: existing output is not readable for resuming ({e}); move it away or choose another --out"
        ) from None


def _read_npz(path: Path) -> list[Row]:
    with np.load(path, allow_pickle=False) as z:
        n = len(z["ids"])
        scores = z["shift_scores"] if "shift_scores" in z.files else np.full(n, math.nan)  # older outputs: none
        return [
            Row(str(i), e, tuple(int(v) for v in s), tuple(float(x) for x in sp), float(score))
            for i, e, s, sp, score in zip(z["ids"], z["embeddings"], z["shapes"], z["spacings"], scores, strict=True)
        ]


def _read_csv(path: Path) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as f:
        header, *records = list(csv.reader(f))
    first = 4 if header[3:4] == ["shift_score"] else 3  # older outputs have no shift_score column
    return [
        Row(
            r[0],
            np.array([float(v) for v in r[first:]], dtype=np.float32),
            tuple(int(n) for n in r[1].split("x")),
            tuple(float(x) for x in r[2].split("x")),
            float(r[3]) if first == 4 and r[3] else math.nan,
        )
        for r in records
    ]


def _read_parquet(path: Path) -> list[Row]:
    _, pq = require_pyarrow()
    table = pq.read_table(path).to_pydict()
    scores = table.get("shift_score") or [None] * len(table["id"])  # older outputs: no column
    return [
        Row(i, np.asarray(e, dtype=np.float32), tuple(s), tuple(sp), math.nan if score is None else float(score))
        for i, e, s, sp, score in zip(table["id"], table["embedding"], table["shape"], table["spacing"], scores)
    ]


def require_pyarrow():
    """(pyarrow, pyarrow.parquet); ValueError naming the extra to install when pyarrow is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing .parquet needs pyarrow: pip install 'ctmae[parquet]'") from None
    return pa, pq


def write_tokens(folder: Path, volume_id: str, token_map: np.ndarray, affine: np.ndarray) -> None:
    """``<name>.npy`` (D, gx, gy, gz) float32 and ``<name>.json`` (id, shape, RAS affine of token centres), each
    written whole; the .npy last, since its presence marks the scan done."""
    name = token_name(volume_id)
    meta = {
        "id": volume_id,
        "shape": list(token_map.shape),
        "affine": affine.tolist(),
        "affine_maps": "token index (a, b, c, 1) -> RAS mm of the centre of the patch it encodes",
    }
    with atomic_path(folder / f"{name}.json") as tmp:
        tmp.write_bytes(json.dumps(meta, indent=2).encode() + b"\n")
    with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, token_map.astype(np.float32, copy=False))
