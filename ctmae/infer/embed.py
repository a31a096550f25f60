"""One embedding per scan from a pretrained encoder, streamed over many scans, resumable and byte-reproducible.

The encoder sees every patch (no masking). Crop-sized windows start on the patch grid and cover the whole
preprocessed volume (MONAI's sliding window; a token shared by overlapping windows gets the mean of their features),
giving a token map (D, gx, gy, gz) that is pooled to one vector. Each row also carries the scan's ``shift_score``
(``ctmae.mae.shift``: how far its encoder features lie from the training scans', relative to how far those lie from
each other; NaN when the checkpoint stores no reference of that kind, which one line says), and a scan above
``WARN_SCORE`` adds a warning line. The file formats are in ``embed_files``.

Resume: each embedded scan is appended as one JSON line to ``<out>.partial.jsonl`` (flushed and fsynced), and the
output file is written once at the end, atomically, holding the rows of the previous output, the journal and this
run, sorted by id; the journal is then deleted. A run killed at any point loses at most the scan in progress: the
next run with the same ``--out`` reads the output file and the journal and skips their ids. A stop signal (SIGTERM,
SIGUSR1, Ctrl-C, under the command's ``StopFlag``) ends the run between sliding windows or scans and writes the
output as at the end, with the rows finished so far.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader, Dataset

from ctmae.infer.embed_outputs import (
    Journal,
    Row,
    read_journal,
    read_output,
    require_pyarrow,
    token_name,
    write_output,
    write_tokens,
)
from ctmae.infer.sliding import (
    LoadedModel,
    pad_to_patches,
    patch_aligned_overlap,
    preprocess,
    source_geometry,
    token_affine,
)
from ctmae.io.checks import InputError
from ctmae.io.discovery import VolumeSource, find_volumes
from ctmae.mae.shift import has_reference, no_reference_note, shift_score, shift_warning
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.contract import image_warnings, preprocessing_of, with_input_probe
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.loader import VOLUME_STALL_S, iterate_workers
from ctmae.runtime.signals import Stopped, check_stop
from ctmae.runtime.windows import OnWindows, watch, window_count

POOLS = ("mean", "max")
FORMATS = (".npz", ".csv", ".parquet")


def check_options(out: str | os.PathLike, pool: str, tokens_dir: str | os.PathLike | None = None) -> None:
    """ValueError for an output suffix or pooling ctmae cannot do, or an output location it cannot write: checked
    before any scan is embedded."""
    if pool == "cls":
        raise ValueError(
            "--pool cls: this encoder has no CLS token (MAE-style ViT over patches only); use --pool mean or --pool max"
        )
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if Path(out).suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: --out must end in {', '.join(FORMATS)}")
    if Path(out).suffix.lower() == ".parquet":
        require_pyarrow()
    if Path(out).is_dir():
        raise ValueError(f"{out}: --out is a folder; give a file name in it (e.g. {Path(out) / 'embeddings.npz'})")
    _writable_folder(Path(out).parent, f"{out}: --out")
    if tokens_dir is not None:
        _writable_folder(Path(tokens_dir), f"{tokens_dir}: --tokens")


def _writable_folder(folder: Path, what: str) -> None:
    """ValueError unless ``folder`` is, or can be made as, a folder this process may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} cannot be written: no permission to write in {existing}")


def embed(
    loaded: LoadedModel,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    pool: str = "mean",
    tokens_dir: str | os.PathLike | None = None,
    batch_size: int = 2,
    on_start: Callable[[int], None] | None = None,
    on_scan: Callable[[str], None] | None = None,
    on_windows: OnWindows | None = None,
) -> dict[str, Any]:
    """Embed every volume among ``inputs`` not already in ``out`` and (re)write ``out``.

    Args:
        loaded: the checkpoint's model (``ctmae.infer.sliding.load_model``).
        inputs: files, folders, series folders or lists, as for ``ctmae.io.discovery.find_volumes``.
        out: .npz (arrays ids, embeddings, shapes, spacings, shift_scores), .csv (id, shape, spacing, shift_score,
            e0..eN) or .parquet (``ctmae.infer.embed_outputs``).
        pool: mean or max over the token map.
        tokens_dir: if given, also ``<name>.npy`` (D, gx, gy, gz) and ``<name>.json`` (RAS affine of token centres)
            per scan; a scan counts as done only when its token map exists too.
        batch_size: windows per forward pass.
        on_start: called once with the number of scans to embed in this run.
        on_scan: called after each of them with "embedded" or "skipped".
        on_windows: called after each batch of sliding windows with (windows done, windows of the scan).

    Returns:
        {"out", "embedded", "resumed", "rows", "skipped": one-line problems, "warnings": one-line departures
        from the checkpoint's preprocessing contract (``ctmae.preprocess.contract``), scans unlike the training scans
        (``ctmae.mae.shift``) and, once, a checkpoint that stores no shift reference, "stopped": None, or the stop
        signal that ended the run between windows or scans (the rows finished so far are written; the same command
        continues)}.
    """
    check_options(out, pool, tokens_dir)
    out = Path(out)
    journal = out.with_name(out.name + ".partial.jsonl")
    digest = _weights_digest(loaded)
    sources, problems = find_volumes(inputs)
    rows = {r.id: r for r in read_output(out)} if out.is_file() else {}
    rows.update({r.id: r for r in read_journal(journal, digest, pool)})
    tokens = Path(tokens_dir) if tokens_dir is not None else None
    todo = [s for s in sources if s.id not in rows or (tokens and not (tokens / f"{token_name(s.id)}.npy").is_file())]
    resumed = len(sources) - len(todo)
    if on_start:
        on_start(len(todo))

    embedded, stopped = 0, None
    warnings = [] if has_reference(loaded.shift_reference) or not todo else [no_reference_note("the checkpoint")]
    stream = _stream(todo, loaded.cfg.preprocess, loaded.cfg.data.workers or 0)
    with Journal(journal, digest, pool) as log:
        try:
            for item in stream:
                check_stop()
                if "problem" in item:
                    problems.append(item["problem"])
                    if on_scan:
                        on_scan("skipped")
                    continue
                row = _embed_one(loaded, item, pool, batch_size, tokens, on_windows)
                line = None if math.isnan(row.shift_score) else shift_warning(row.id, row.shift_score)
                warnings += item["warnings"] + ([line] if line else [])
                log.append(row)
                rows[row.id] = row
                embedded += 1
                if on_scan:
                    on_scan("embedded")
        except Stopped as e:  # between windows or scans: the rows finished so far are written below
            stopped = e.signal
        finally:
            stream.close()
    done = [rows[k] for k in sorted(rows)]
    if done:
        write_output(out, done)
    journal.unlink(missing_ok=True)
    return {
        "out": str(out),
        "embedded": embedded,
        "resumed": resumed,
        "rows": len(done),
        "skipped": problems,
        "warnings": warnings,
        "stopped": stopped,
    }


def _embed_one(
    loaded: LoadedModel,
    item: dict[str, Any],
    pool: str,
    batch_size: int,
    tokens: Path | None,
    on_windows: OnWindows | None = None,
) -> Row:
    """One preprocessed scan's row (pooled embedding and shift score), and its token map written if asked."""
    token_map = token_features(loaded, item["image"], batch_size, on_windows)  # (D, gx, gy, gz)
    flat = token_map.flatten(1)  # (D, L)
    vector = (flat.mean(1) if pool == "mean" else flat.amax(1)).numpy().astype(np.float32)
    if tokens is not None:
        grid_affine = token_affine(item["affine"], loaded.cfg.model.patch)
        write_tokens(tokens, item["id"], token_map.numpy(), grid_affine)
    return Row(item["id"], vector, item["shape"], item["spacing"], scan_shift(loaded, item["image"]))


@torch.inference_mode()
def token_features(
    loaded: LoadedModel, volume: torch.Tensor, batch_size: int, on_windows: OnWindows | None = None
) -> torch.Tensor:
    """Encoder features of every token of a preprocessed volume (1, X, Y, Z) -> (D, gx, gy, gz) on the CPU.

    The volume is zero-padded at its far end to whole patches; token (a, b, c) covers voxels [a·p, (a+1)·p) etc.
    A stop signal raises ``Stopped`` between batches of windows; ``on_windows(done, total)`` hears the windows done.
    """
    model, p, crop = loaded.model, loaded.cfg.model.patch, loaded.cfg.model.img_size
    padded = pad_to_patches(volume, p).to(loaded.device)[None]  # (1, 1, Xp, Yp, Zp)
    g = crop // p

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        """(B, 1, c, c, c) -> (B, D, g, g, g): MONAI scales the output grid by g / c."""
        feats = model.encode(windows)  # (B, L, D)
        return feats.transpose(1, 2).reshape(windows.shape[0], -1, g, g, g)  # (B, D, L) -> (B, D, g, g, g)

    overlap = patch_aligned_overlap(crop, p)
    watched = watch(predictor, window_count(padded.shape[2:], (crop,) * 3, overlap), on_windows)
    out = sliding_window_inference(padded, (crop,) * 3, batch_size, watched, overlap=overlap, mode="constant")
    return out[0].float().cpu()


def scan_shift(loaded: LoadedModel, image: torch.Tensor) -> float:
    """The shift score (``ctmae.mae.shift``) of a preprocessed volume (1, X, Y, Z); NaN when the checkpoint stores
    no training-scan reference of that kind."""
    if not has_reference(loaded.shift_reference):
        return math.nan
    return shift_score(loaded.model, image[0], loaded.shift_reference)


class _Prepare(Dataset):
    """Preprocesses one volume per item (in DataLoader workers); a dict with the tensor and geometry, or a problem."""

    def __init__(self, sources: Sequence[VolumeSource], cfg: PreprocessConfig) -> None:
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


def _stream(
    sources: Sequence[VolumeSource], cfg: PreprocessConfig, workers: int
) -> Generator[dict[str, Any], None, None]:
    """Preprocessed volumes in order, one in the main process plus at most 2 per worker in flight (``workers``
    as the command planned them against /dev/shm); the workers leave stop signals to the main process, a wait for
    them ends on a stall (``ctmae.runtime.loader``), and they end when the generator is closed."""
    workers = min(workers, len(sources))
    loader = DataLoader(_Prepare(sources, cfg), batch_size=None, num_workers=workers, collate_fn=_keep)
    return iterate_workers(loader, stall_s=VOLUME_STALL_S)


def _weights_digest(loaded: LoadedModel) -> str:
    """Identifies the weights, so a journal from another checkpoint is not mixed in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
