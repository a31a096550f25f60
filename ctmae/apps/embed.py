"""One embedding per scan from a pretrained encoder, streamed over many scans, resumable and byte-reproducible.

The encoder sees every patch (no masking). Crop-sized windows start on the patch grid and cover the whole
preprocessed volume (MONAI's sliding window; a token shared by overlapping windows gets the mean of their features),
giving a token map (D, gx, gy, gz) that is pooled to one vector.

Resume: each embedded scan is appended as one JSON line to ``<out>.partial.jsonl`` (flushed and fsynced), and the
output file is written once at the end, atomically, holding the rows of the previous output, the journal and this
run, sorted by id; the journal is then deleted. A run killed at any point loses at most the scan in progress: the
next run with the same ``--out`` reads the output file and the journal and skips their ids.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader, Dataset

from ctmae.apps.contract import image_warnings, preprocessing_of, with_input_probe
from ctmae.apps.inference import (
    LoadedModel,
    pad_to_patches,
    patch_aligned_overlap,
    preprocess,
    source_geometry,
    token_affine,
)
from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource, find_volumes
from ctmae.mae.config import DataConfig
from ctmae.preprocess.transforms import preprocess_transforms

POOLS = ("mean", "max")
FORMATS = (".npz", ".csv", ".parquet")
JOURNAL_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry timestamp: the earliest a zip can hold, so bytes repeat


@dataclass(frozen=True)
class Row:
    """One scan's output: privacy-safe id, pooled embedding (D,) float32, source shape (X, Y, Z) and spacing (mm)."""

    id: str
    embedding: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def check_options(out: str | os.PathLike, pool: str) -> None:
    """ValueError for an output suffix or pooling ctmae cannot do."""
    if pool == "cls":
        raise ValueError(
            "--pool cls: this encoder has no CLS token (MAE-style ViT over patches only); use --pool mean or --pool max"
        )
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if Path(out).suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: --out must end in {', '.join(FORMATS)}")
    if Path(out).suffix.lower() == ".parquet":
        _pyarrow()


def embed(
    loaded: LoadedModel,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    pool: str = "mean",
    tokens_dir: str | os.PathLike | None = None,
    batch_size: int = 2,
    on_start: Callable[[int], None] | None = None,
    on_scan: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Embed every volume among ``inputs`` not already in ``out`` and (re)write ``out``.

    Args:
        loaded: the checkpoint's model (``ctmae.apps.inference.load_model``).
        inputs: files, folders, series folders or lists, as for ``ctmae.io.discovery.find_volumes``.
        out: .npz (arrays ids, embeddings, shapes, spacings), .csv (id, shape, spacing, e0..eN) or .parquet.
        pool: mean or max over the token map.
        tokens_dir: if given, also ``<name>.npy`` (D, gx, gy, gz) and ``<name>.json`` (RAS affine of token centres)
            per scan; a scan counts as done only when its token map exists too.
        batch_size: windows per forward pass.
        on_start: called once with the number of scans to embed in this run.
        on_scan: called after each of them with "embedded" or "skipped".

    Returns:
        {"out", "embedded", "resumed", "rows", "skipped": one-line problems, "warnings": one-line departures
        from the checkpoint's preprocessing contract (``ctmae.apps.contract``)}.
    """
    check_options(out, pool)
    out = Path(out)
    journal = out.with_name(out.name + ".partial.jsonl")
    digest = _weights_digest(loaded)
    sources, problems = find_volumes(inputs)
    rows = {r.id: r for r in _read_output(out)} if out.is_file() else {}
    rows.update({r.id: r for r in _read_journal(journal, digest, pool)})
    tokens = Path(tokens_dir) if tokens_dir is not None else None
    todo = [s for s in sources if s.id not in rows or (tokens and not (tokens / f"{token_name(s.id)}.npy").is_file())]
    resumed = len(sources) - len(todo)
    if on_start:
        on_start(len(todo))

    embedded, warnings = 0, []
    with _Journal(journal, digest, pool) as log:
        for item in _stream(todo, loaded.cfg.data):
            if "problem" in item:
                problems.append(item["problem"])
                if on_scan:
                    on_scan("skipped")
                continue
            warnings += item["warnings"]
            token_map = token_features(loaded, item["image"], batch_size)  # (D, gx, gy, gz)
            flat = token_map.flatten(1)  # (D, L)
            vector = (flat.mean(1) if pool == "mean" else flat.amax(1)).numpy().astype(np.float32)
            if tokens is not None:
                grid_affine = token_affine(item["affine"], loaded.cfg.model.patch)
                _write_tokens(tokens, item["id"], token_map.numpy(), grid_affine)
            row = Row(item["id"], vector, item["shape"], item["spacing"])
            log.append(row)
            rows[row.id] = row
            embedded += 1
            if on_scan:
                on_scan("embedded")
    done = [rows[k] for k in sorted(rows)]
    if done:
        _write_output(out, done)
    journal.unlink(missing_ok=True)
    return {
        "out": str(out),
        "embedded": embedded,
        "resumed": resumed,
        "rows": len(done),
        "skipped": problems,
        "warnings": warnings,
    }


@torch.inference_mode()
def token_features(loaded: LoadedModel, volume: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Encoder features of every token of a preprocessed volume (1, X, Y, Z) -> (D, gx, gy, gz) on the CPU.

    The volume is zero-padded at its far end to whole patches; token (a, b, c) covers voxels [a·p, (a+1)·p) etc.
    """
    model, p, crop = loaded.model, loaded.cfg.model.patch, loaded.cfg.model.img_size
    padded = pad_to_patches(volume, p).to(loaded.device)[None]  # (1, 1, Xp, Yp, Zp)
    g = crop // p

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        """(B, 1, c, c, c) -> (B, D, g, g, g): MONAI scales the output grid by g / c."""
        feats = model.encode(windows)  # (B, L, D)
        return feats.transpose(1, 2).reshape(windows.shape[0], -1, g, g, g)  # (B, D, L) -> (B, D, g, g, g)

    out = sliding_window_inference(
        padded, (crop,) * 3, batch_size, predictor, overlap=patch_aligned_overlap(crop, p), mode="constant"
    )
    return out[0].float().cpu()


def token_name(volume_id: str) -> str:
    """A file name for a scan's token map: readable, no path separators or '..', and unique per id (hash suffix)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", volume_id).replace("..", "_").strip("._-")[:80] or "scan"
    return f"{readable}-{hashlib.sha256(volume_id.encode()).hexdigest()[:10]}"


class _Prepare(Dataset):
    """Preprocesses one volume per item (in DataLoader workers); a dict with the tensor and geometry, or a problem."""

    def __init__(self, sources: Sequence[VolumeSource], cfg: DataConfig) -> None:
        self.sources, self.cfg = list(sources), cfg
        self.transform = None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        source = self.sources[i]
        self.transform = self.transform or with_input_probe(preprocess_transforms(self.cfg))
        try:
            image = preprocess(source, self.transform)
        except InputError as e:
            return {"id": source.id, "problem": str(e)}
        shape, spacing = source_geometry(image)
        return {
            "id": source.id,
            "image": image.as_tensor(),
            "affine": np.asarray(image.affine, dtype=np.float64),
            "shape": shape,
            "spacing": spacing,
            "warnings": image_warnings(preprocessing_of(self.cfg), image, source),  # the encoder's input contract
        }


def _keep(item: dict[str, Any]) -> dict[str, Any]:
    return item  # DataLoader's default conversion would turn the numpy affine into a tensor


def _stream(sources: Sequence[VolumeSource], cfg: DataConfig):
    """Preprocessed volumes in order, one in the main process plus at most 2 per worker in flight."""
    workers = min(cfg.workers, len(sources))
    return DataLoader(_Prepare(sources, cfg), batch_size=None, num_workers=workers, collate_fn=_keep)


def _weights_digest(loaded: LoadedModel) -> str:
    """Identifies the weights, so a journal from another checkpoint is not mixed in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Journal:
    """Append-only JSON lines: a header naming weights and pooling, then one row per line, each fsynced."""

    def __init__(self, path: Path, digest: str, pool: str) -> None:
        self.path, self.header = path, {"journal": JOURNAL_VERSION, "weights": digest, "pool": pool}
        self.file = None

    def __enter__(self) -> _Journal:
        return self

    def append(self, row: Row) -> None:
        if self.file is None:  # opened on the first row, so a run with nothing to do leaves no journal
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0
            self.file = open(self.path, "a", encoding="utf-8")
            if fresh:
                self._write(self.header)
        self._write(
            {"id": row.id, "embedding": row.embedding.tolist(), "shape": list(row.shape), "spacing": list(row.spacing)}
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


def _read_journal(path: Path, digest: str, pool: str) -> list[Row]:
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
        Row(r["id"], np.asarray(r["embedding"], dtype=np.float32), tuple(r["shape"]), tuple(r["spacing"]))
        for r in map(json.loads, complete[1:])
    ]


def _write_output(out: Path, rows: list[Row]) -> None:
    """Write all rows atomically (temporary file in the same folder, then rename), deterministically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        {".npz": _write_npz, ".csv": _write_csv, ".parquet": _write_parquet}[out.suffix.lower()](tmp, rows)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_npz(path: Path, rows: list[Row]) -> None:
    """Like ``np.savez``, but every zip entry carries the same fixed timestamp (savez stamps the current time)."""
    arrays = {
        "ids": np.array([r.id for r in rows], dtype=str),
        "embeddings": np.stack([r.embedding for r in rows]).astype(np.float32),  # (N, D)
        "shapes": np.array([r.shape for r in rows], dtype=np.int64),  # (N, 3)
        "spacings": np.array([r.spacing for r in rows], dtype=np.float64),  # (N, 3)
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), buffer.getvalue())


def _write_csv(path: Path, rows: list[Row]) -> None:
    """id, shape ("XxYxZ"), spacing ("sxxsyxsz", exact repr), e0..eN (9 significant digits: float32 round-trips)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "shape", "spacing"] + [f"e{i}" for i in range(len(rows[0].embedding))])
        for r in rows:
            writer.writerow(
                [r.id, "x".join(map(str, r.shape)), "x".join(map(repr, r.spacing))]
                + [f"{v:.9g}" for v in r.embedding.tolist()]
            )


def _write_parquet(path: Path, rows: list[Row]) -> None:
    pa, pq = _pyarrow()
    table = pa.table(
        {
            "id": pa.array([r.id for r in rows], pa.string()),
            "embedding": pa.array([r.embedding.tolist() for r in rows], pa.list_(pa.float32(), len(rows[0].embedding))),
            "shape": pa.array([list(r.shape) for r in rows], pa.list_(pa.int64(), 3)),
            "spacing": pa.array([list(r.spacing) for r in rows], pa.list_(pa.float64(), 3)),
        }
    )
    pq.write_table(table, path)


def _read_output(out: Path) -> list[Row]:
    """The rows of an earlier output file (for resume); ValueError naming the file if it cannot be read."""
    try:
        suffix = out.suffix.lower()
        if suffix == ".npz":
            with np.load(out, allow_pickle=False) as z:
                return [
                    Row(str(i), e, tuple(int(n) for n in s), tuple(float(x) for x in sp))
                    for i, e, s, sp in zip(z["ids"], z["embeddings"], z["shapes"], z["spacings"])
                ]
        if suffix == ".csv":
            with open(out, newline="", encoding="utf-8") as f:
                records = list(csv.reader(f))[1:]
            return [
                Row(
                    r[0],
                    np.array([float(v) for v in r[3:]], dtype=np.float32),
                    tuple(int(n) for n in r[1].split("x")),
                    tuple(float(x) for x in r[2].split("x")),
                )
                for r in records
            ]
        _, pq = _pyarrow()
        table = pq.read_table(out).to_pydict()
        return [
            Row(i, np.asarray(e, dtype=np.float32), tuple(s), tuple(sp))
            for i, e, s, sp in zip(table["id"], table["embedding"], table["shape"], table["spacing"])
        ]
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{out}: existing output is not readable for resuming ({e}); move it away or choose another --out"
        ) from None


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing .parquet needs pyarrow: pip install 'ctmae[parquet]'") from None
    return pa, pq


def _write_tokens(folder: Path, volume_id: str, token_map: np.ndarray, affine: np.ndarray) -> None:
    """``<name>.npy`` (D, gx, gy, gz) float32 and ``<name>.json`` (id, shape, RAS affine of token centres)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = token_name(volume_id)
    meta = {
        "id": volume_id,
        "shape": list(token_map.shape),
        "affine": affine.tolist(),
        "affine_maps": "token index (a, b, c, 1) -> RAS mm of the centre of the patch it encodes",
    }
    for suffix, write in (
        (".json", lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n")),
        (".npy", lambda f: np.save(f, token_map.astype(np.float32, copy=False))),
    ):
        tmp = folder / f".{name}{suffix}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, folder / f"{name}{suffix}")
