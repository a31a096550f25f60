"""Prediction with a fine-tuned segmenter: one label volume per input, in that input's original geometry.

Each input goes through the same invertible preprocessing as training (RAS, resampling, HU window, foreground crop,
padding); the argmax label is brought back by ``monai.transforms.Invertd`` with nearest-neighbour interpolation, so
the written label has the source's shape and affine exactly and holds class indices only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from ctmae.io.checks import IMAGE_SUFFIXES, InputError, ensure_not_inputs
from ctmae.io.discovery import VolumeSource
from ctmae.io.volume import write_nifti
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.device import resolve_device, resolve_precision
from ctmae.runtime.files import atomic_write_json
from ctmae.runtime.signals import check_stop
from ctmae.runtime.windows import OnWindows
from ctmae.seg.classes import ClassMap, classes_of
from ctmae.seg.config import SegConfig
from ctmae.seg.network import load_seg_checkpoint, segmenter_from_checkpoint
from ctmae.seg.train import segment_logits


def output_name(source_id: str, taken: set[str]) -> str:
    """A file name inside the output folder for a volume id: path separators and odd characters become ``_``, no
    leading dot, never ``..``; a numeric suffix keeps names unique among ``taken`` (which is updated)."""
    name = source_id.split("#")[0] if "#" in source_id else source_id
    name = next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__")).lstrip(".") or "volume"
    stem, n = name, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return f"{name}.nii.gz"


def sidecar_path(label_path: Path) -> Path:
    """The JSON beside a written label file that names its classes: ``case.nii.gz`` -> ``case.json``."""
    return label_path.with_name(label_path.name.removesuffix(".nii.gz") + ".json")


def write_sidecar(label_path: Path, classes: ClassMap, checkpoint: str) -> Path:
    """Write the names of a predicted label's values beside it, in the MSD form a names file takes
    (``{"labels": {"0": "background", "1": "liver"}}``), with the label value each class came from."""
    body = {
        "labels": {"0": "background", **{str(k): name for k, name in enumerate(classes.labels(), 1)}},
        "classes": classes.describe(),
        "checkpoint": os.path.basename(checkpoint),
    }
    path = sidecar_path(label_path)
    atomic_write_json(path, body)
    return path


def predict(
    checkpoint: str | os.PathLike,
    sources: Sequence[VolumeSource],
    out_dir: Path,
    device: str = "auto",
    on_volume: Callable[[dict[str, Any]], None] | None = None,
    on_windows: OnWindows | None = None,
) -> list[Path]:
    """Segment each source with a ``finetune-seg`` checkpoint; writes ``out_dir/<name>.nii.gz`` per source and
    ``<name>.json`` beside it, naming its values (``write_sidecar``).

    Args:
        checkpoint: ``best.pt`` or ``last.pt`` of a fine-tuning run.
        sources: volumes from ``ctmae.io.discovery.find_volumes``.
        out_dir: output folder (created).
        device: auto|cpu|cuda.
        on_volume: called after each volume with ``{"source", "path", "voxels_per_class", "class_names"}``
            (background first).
        on_windows: called after each batch of sliding windows with (windows done, windows of this volume).

    Returns:
        The written label files, in the order of ``sources``.

    Raises:
        CheckpointError: the checkpoint is unusable. InputError: a volume cannot be read. Stopped: a stop signal
        came (checked between windows); the label files written so far are whole, the volume in progress has none.
    """
    state = load_seg_checkpoint(checkpoint)
    cfg: SegConfig = state["config"]
    torch_device = resolve_device(device)
    precision = resolve_precision("auto", torch_device)
    unetr = segmenter_from_checkpoint(state).to(torch_device).eval()
    preprocess = preprocess_transforms(cfg.preprocess)
    invert = Invertd("pred", transform=preprocess, orig_keys="image", nearest_interp=True)
    written, taken = [], set()
    for source in sources:
        check_stop()
        try:
            data = preprocess({"image": list(source.files)})
        except InputError:
            raise
        except Exception as e:  # MONAI wraps reader errors; report the root cause as one line
            while e.__cause__ is not None:
                e = e.__cause__
            raise (
                e
                if isinstance(e, InputError)
                else InputError(f"{source.files[0]}: could not preprocess: {str(e).splitlines()[0]}")
            ) from None
        image: MetaTensor = data["image"]
        with torch.no_grad():  # (1, X', Y', Z') -> (1, C, X', Y', Z')
            logits = segment_logits(unetr, image.as_tensor(), cfg, torch_device, precision, on_windows)
        labels = logits.float().argmax(1).cpu().to(torch.float32)  # (1, X', Y', Z') on the preprocessed grid
        data["pred"] = MetaTensor(labels, meta=image.meta)
        restored = invert(data)["pred"]  # (1, X, Y, Z) on the source grid
        array = np.rint(restored.numpy()[0]).astype(np.uint8 if cfg.net.num_classes <= 256 else np.int32)
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        path = out_dir / output_name(source.id, taken)
        ensure_not_inputs([path], (f for s in sources for f in s.files))
        write_nifti(array, affine, path)
        write_sidecar(path, classes_of(cfg), os.fspath(checkpoint))
        written.append(path)
        if on_volume:
            on_volume(
                {
                    "source": source,
                    "path": path,
                    "voxels_per_class": np.bincount(array.ravel(), minlength=cfg.net.num_classes).tolist(),
                    "class_names": ["background", *classes_of(cfg).labels()],
                }
            )
    return written
