"""The preprocessing contract of a pretrained encoder: what its inputs must look like, and one-line warnings for
inputs that do not.

An encoder learned from CT in Hounsfield units, resampled to one spacing; it has never seen an MR scan, an image
already scaled to 0..1 or 0..255, or a scan many times coarser or finer than its training grid. Its export
(``config.json``), its checkpoint's config and the commands that use it (reconstruct, embed, finetune-seg) all check
their inputs against the same stored ``preprocessing`` section, and warn (they do not refuse: the user may know
better). Changing that preprocessing on a pretrained encoder (a resumed run's spacing, a fine-tune's spacing) is
refused instead: ``preprocessing_change`` names the first difference.

Voxels are summarised once, where a command already holds them (``InputProbed`` in the preprocessing chain), or from
the header and a few evenly spaced slices (``read_summary``) where it does not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from ctmae.io.dicom import itk_warnings_off
from ctmae.io.discovery import VolumeSource, find_volumes
from ctmae.io.labels import label_map_problem
from ctmae.preprocess.config import BODY_HU, PreprocessConfig, lift_flat_layout
from ctmae.preprocess.transforms import LoadCTd
from ctmae.runtime.config import update_section

SPACING_FACTOR = 4.0  # warn when an axis is over 4x coarser or finer than trained (5 mm slices vs 1.5 mm pass)
AIR_HU = -200.0  # every CT of a body holds air (about -1000 HU) around it or in it; nothing below this is not HU CT
SAMPLE_SLICES = 8  # slices read by read_summary
SAMPLE_VOXELS = 1 << 18  # voxels summarised from an array in memory (a strided subsample)
SUMMARY_KEY = "ctmae_input_summary"  # where InputProbed leaves its summary in the image's meta


@dataclass(frozen=True)
class InputSummary:
    """What the contract looks at: voxel spacing along RAS x, y, z (mm), value range of a voxel sample, modality.

    ``low`` is the 0.5th percentile of the sample: a few stray values (e.g. MR reconstruction noise below 0) do not
    hide the absence of air.
    """

    spacing: tuple[float, float, float]
    min: float
    max: float
    low: float
    modality: str = ""
    label_map: str | None = None  # why the sample looks like a label map (``ctmae.io.labels``): the command refuses it


def preprocessing_of(pre: PreprocessConfig) -> dict[str, Any]:
    """The portable ``preprocessing`` section of a run's ``PreprocessConfig`` (the cache folder left out).

    This is what config.json stores and what every check below reads; keys name MONAI's transforms' arguments.
    """
    lo, hi = (float(v) for v in pre.hu_window)
    return {
        "orientation": "RAS",
        "spacing": [float(s) for s in pre.spacing],
        "interpolation": "bilinear",
        "hu_window": [lo, hi],
        "scaled_to": [0.0, 1.0],
        "clip": True,
        "body_threshold_hu": BODY_HU,
        "body_threshold": pre.body_threshold,
        "crop": int(pre.crop),
        "pad_value": 0.0,
    }


def input_warnings(preprocessing: dict[str, Any], summary: InputSummary, name: str) -> list[str]:
    """One line per way the input departs from what the encoder was trained on (empty when it fits).

    Args:
        preprocessing: the stored section (``preprocessing_of``, or config.json's).
        summary: the input's spacing, value range and modality.
        name: how the lines name the input (a privacy-safe volume id).
    """
    lines = []
    if summary.label_map:  # not a scan at all: the command refuses it in one line, nothing to add
        return lines
    if summary.modality and summary.modality.upper() != "CT":
        lines.append(f"{name}: DICOM modality {summary.modality}, not CT; the encoder was pretrained on CT in HU")
    spacing_line = _spacing_warning(preprocessing["spacing"], summary.spacing)
    if spacing_line:
        lines.append(f"{name}: {spacing_line}")
    values = f"values {summary.min:g}..{summary.max:g}"
    if summary.min >= 0.0 and summary.max <= 1.0:
        lines.append(f"{name}: {values}: looks already scaled to 0..1, not HU; pass the scan in HU (ctmae windows it)")
    elif summary.min >= 0.0 and summary.max <= 255.0:
        lines.append(f"{name}: {values}: looks like an 8-bit 0..255 image, not HU; pass the scan in HU")
    elif summary.low > AIR_HU:
        lines.append(
            f"{name}: {values} and no air (nothing below {AIR_HU:g}): looks like MR or an image not in HU; "
            f"the encoder was pretrained on CT in HU"
        )
    return lines


def _spacing_warning(trained: Sequence[float], spacing: Sequence[float]) -> str | None:
    ratios = np.asarray(spacing, dtype=np.float64) / np.asarray(trained, dtype=np.float64)  # (3,) per RAS axis
    shown = "x".join(f"{s:.3g}" for s in spacing)
    target = "x".join(f"{s:g}" for s in trained)
    if ratios.max() > SPACING_FACTOR:
        return f"voxel spacing {shown} mm is {ratios.max():.1f}x coarser than the training spacing {target} mm"
    if ratios.min() < 1.0 / SPACING_FACTOR:
        return f"voxel spacing {shown} mm is {1.0 / ratios.min():.1f}x finer than the training spacing {target} mm"
    return None


def summarize(array: np.ndarray | torch.Tensor, affine: np.ndarray, modality: str = "") -> InputSummary:
    """Summarise a volume in memory, (X, Y, Z) voxels as read and its 4x4 affine, from a strided subsample."""
    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    step = max(1, round((values.size / SAMPLE_VOXELS) ** (1 / 3)))
    sample = values[::step, ::step, ::step]  # (X/s, Y/s, Z/s): a view, no copy
    return _summary(sample, ras_spacing(affine), modality)


def _summary(sample: np.ndarray, spacing: tuple[float, float, float], modality: str) -> InputSummary:
    """The summary of a voxel sample (X, Y, K): a subsample of the volume, or some of its slices."""
    label_map = label_map_problem(sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(sample).T)))  # (K, Y, X)
    sample = np.asarray(sample, dtype=np.float32).ravel()
    return InputSummary(
        label_map=label_map,
        spacing=spacing,
        min=float(sample.min()),
        max=float(sample.max()),
        low=float(np.percentile(sample, 0.5)),
        modality=modality,
    )


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing along RAS x, y, z: each voxel axis' length, placed on the world axis it runs closest to."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    lengths = np.linalg.norm(columns, axis=0)
    axes = np.argmax(np.abs(columns), axis=0)
    if sorted(axes.tolist()) != [0, 1, 2]:  # two voxel axes nearest one world axis (45° obliques): keep voxel order
        return tuple(float(s) for s in lengths)
    out = np.zeros(3)
    out[axes] = lengths
    return tuple(float(s) for s in out)


class InputProbed(MapTransform):
    """Summarise the image as read (before resampling or windowing) into ``meta[SUMMARY_KEY]``; a no-op otherwise.

    Placed right after ``LoadCTd`` by ``with_input_probe``, so the contract sees the voxels the command reads anyway.
    """

    def __init__(self) -> None:
        super().__init__(["image"])

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = d["image"]
        if isinstance(image, MetaTensor):
            image.meta[SUMMARY_KEY] = dataclasses.asdict(summarize(image.as_tensor(), np.asarray(image.affine)))
        return d


def with_input_probe(transform: Compose) -> Compose:
    """``transform`` (a ``preprocess_transforms`` chain) with ``InputProbed`` right after its loader."""
    steps = list(transform.transforms)
    at = next((i + 1 for i, t in enumerate(steps) if isinstance(t, LoadCTd)), 0)
    return Compose([*steps[:at], InputProbed(), *steps[at:]])


def image_warnings(preprocessing: dict[str, Any], image: MetaTensor, source: VolumeSource) -> list[str]:
    """The contract's lines for a volume preprocessed by a ``with_input_probe`` chain (none without a summary)."""
    found = image.meta.get(SUMMARY_KEY)
    if not found:
        return []
    summary = InputSummary(**{**found, "spacing": tuple(found["spacing"]), "modality": source.modality})
    return input_warnings(preprocessing, summary, source.id)


def source_warnings(preprocessing: dict[str, Any], sources: Sequence[VolumeSource]) -> list[str]:
    """The contract's lines for volumes not yet read, from their headers and a few slices each (``read_summary``).

    A volume that cannot be read gives no line here: the command that reads it reports it.
    """
    lines = []
    for source in sources:
        summary = read_summary(source)
        if summary is not None:
            lines += input_warnings(preprocessing, summary, source.id)
    return lines


def path_warnings(preprocessing: dict[str, Any], path: str | os.PathLike) -> list[str]:
    """``source_warnings`` for the one volume a path names (a file or series folder); none if it names no single
    readable volume (the command reports that)."""
    sources, _ = find_volumes([path])
    return source_warnings(preprocessing, sources) if len(sources) == 1 else []


def read_summary(source: VolumeSource) -> InputSummary | None:
    """Summarise a volume from its header and ``SAMPLE_SLICES`` evenly spaced slices; None if unreadable.

    DICOM: the chosen slice files and the first and last headers. NIfTI: nibabel reads the chosen slices in one
    forward pass over the (decompressed) stream. Other formats (NRRD, MetaImage) are read whole by SimpleITK.
    """
    try:
        with itk_warnings_off():
            if source.is_dicom:
                return _dicom_summary(source)
            path = source.files[0]
            if path.lower().endswith((".nii", ".nii.gz")):
                image = nib.load(path, keep_file_open=True)
                if len(image.shape) < 3:
                    return None
                ks = _evenly(image.shape[2])
                sample = np.stack([np.asarray(image.dataobj[:, :, k]) for k in ks], axis=-1)  # (X, Y, K)
                return _summary(sample, ras_spacing(image.affine), "")
            image = sitk.ReadImage(path)
            array = sitk.GetArrayViewFromImage(image).T  # (Z, Y, X) -> (X, Y, Z)
            return summarize(array, _lps_affine(image.GetDirection(), image.GetSpacing()))
    except Exception:  # unreadable here means unreadable for the command too, which names the problem
        return None


def _dicom_summary(source: VolumeSource) -> InputSummary:
    files = source.files
    reader = sitk.ImageFileReader()
    ends = []
    for path in (files[0], files[-1]):
        reader.SetFileName(path)
        reader.ReadImageInformation()
        ends.append((np.asarray(reader.GetOrigin()), reader.GetDirection(), reader.GetSpacing()))
    (first, direction, spacing), (last, _, _) = ends
    normal = np.asarray(direction).reshape(3, 3)[:, 2]
    gap = abs(float((last - first) @ normal)) / (len(files) - 1) if len(files) > 1 else spacing[2]
    slices = [sitk.GetArrayFromImage(sitk.ReadImage(files[k])) for k in _evenly(len(files))]  # each (1, Y, X)
    affine = _lps_affine(direction, (spacing[0], spacing[1], gap))
    return _summary(np.concatenate(slices), ras_spacing(affine), source.modality)


def _evenly(count: int) -> list[int]:
    return sorted(set(np.linspace(0, count - 1, min(SAMPLE_SLICES, count)).round().astype(int).tolist()))


def _lps_affine(direction: Sequence[float], spacing: Sequence[float]) -> np.ndarray:
    """A 4x4 affine whose columns are the voxel axes (LPS; the spacing check needs only their lengths and axes)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    return affine


def preprocessing_change(
    trained: Any, asked: Any, keys: Sequence[str] = ("spacing", "hu_window", "crop")
) -> str | None:
    """The first preprocessing setting ``asked`` changes from the pretrained encoder's ``trained``, as one phrase.

    Args:
        trained, asked: ``spacing``, ``hu_window`` and ``crop`` as attributes (a ``PreprocessConfig``) or keys (a
            ``preprocessing`` section); ``asked`` needs only the keys compared.
        keys: the settings compared.
    """
    for key in keys:
        old, new = (x[key] if isinstance(x, dict) else getattr(x, key) for x in (trained, asked))
        if np.any(np.asarray(old, dtype=np.float64) != np.asarray(new, dtype=np.float64)):
            shown = f"{_shown(key, new)} differs from the {_shown(key, old)}"
            return f"preprocess.{key} {shown} the encoder was pretrained with"
    return None


def _shown(key: str, value: Any) -> str:
    if key == "hu_window":
        return f"{float(value[0]):g}..{float(value[1]):g} HU"
    if key == "spacing":
        return "x".join(f"{float(v):g}" for v in value) + " mm"
    return str(value)


def checkpoint_preprocessing(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``preprocessing`` section of a ctmae checkpoint's config (either layout), read without loading the
    tensors into memory (``mmap``); None for anything else (the command's own loading then names the problem)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        section = lift_flat_layout(state["config"])["preprocess"]
        return preprocessing_of(update_section(PreprocessConfig(cache_dir=""), section, "preprocess"))
    except Exception:
        return None
