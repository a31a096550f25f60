"""Labelled cases for ``finetune-seg``: pairing images with labels, geometry checks, the validation split, and the
seeded stream of foreground-balanced training crops.

Four layouts pair images and labels: two lists of image files paired in the order given; two lists of
files/folders matched by file name (``case.nii.gz`` in both, an nnU-Net channel suffix ``_0000`` on the image
allowed); a CSV/JSON datalist with ``image`` and ``label`` columns/keys (MSD's ``dataset.json`` ``training`` list
included); and an nnU-Net folder holding ``imagesTr/`` and ``labelsTr/``.

The deterministic preprocessing runs once per case into the on-disk cache (``ctmae.preprocess.cache``): the image
through SimpleITK's resampling as for pretraining (the same entry), the label by nearest neighbour onto the image's
grid, cropped with the image's body box; what ``preprocess_transforms(cfg, label=True)`` gives. A later run over the
same cases preprocesses nothing. The cache keeps each label's own values; the classes a run learns
(``SegDataConfig.label_values``, ``ctmae.seg.classes``) are picked from them as the cases are read. Crops follow
``ctmae.preprocess.visit_order``'s schedule: visit ``v`` is epoch ``v // V``, slot ``v % V`` of that epoch's seeded
permutation, its random draws seeded by ``(seed, v)``; so any step's batch is a pure function of the seed and
``--resume`` is exact.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd
from torch.utils.data import Dataset

from ctmae.io.checks import IMAGE_SUFFIXES, InputError, condense_sitk_error
from ctmae.io.dicom import itk_warnings_off
from ctmae.io.discovery import VolumeSource, find_volumes, skipped_only
from ctmae.io.labels import class_counts
from ctmae.io.volume import CTReader, ras_affine
from ctmae.preprocess.cache import OLD_CACHE_NOTE, VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.visit_order import global_visit, visit_batches, visit_volume
from ctmae.seg.classes import SelectClassesd
from ctmae.seg.config import SegDataConfig

KEYS = ("image", "label")
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")  # nnU-Net's per-channel image suffix
SPACING_RTOL = 1e-3  # relative spacing difference tolerated between a label and its image
DIRECTION_ATOL = 1e-3  # absolute difference of direction cosines tolerated
ORIGIN_ATOL = 1e-2  # tolerated origin offset, in voxels


@dataclass(frozen=True)
class LabelledCase:
    """One image with its label volume; ``id`` is the shared name that paired them."""

    id: str
    image: VolumeSource
    label: VolumeSource

    def item(self) -> dict[str, list[str]]:
        """The transform input: ``{"image": files, "label": files}``."""
        return {"image": list(self.image.files), "label": list(self.label.files)}


def case_name(source: VolumeSource, image: bool) -> tuple[str, int]:
    """(pairing name, nnU-Net channel) of a volume: its id without the file suffix (a DICOM series: its folder),
    and for images without a ``_NNNN`` channel suffix."""
    name = source.id.split("#")[0] if source.is_dicom else source.id
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    name = name[: len(name) - len(suffix)]
    match = _CHANNEL_SUFFIX.search(name) if image else None
    return (name[: match.start()], int(match.group(1))) if match else (name, 0)


def _found(paths: Sequence[str | os.PathLike], what: str) -> list[VolumeSource]:
    # labels are read on purpose here; a note on files that are not scans (a README.md) is no problem
    sources, problems = find_volumes([os.fspath(p) for p in paths], skip_labels=False)
    problems = skipped_only(problems)
    if problems:
        raise InputError(f"{what}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if not sources:
        raise InputError(f"{what}: no volumes found in {', '.join(map(os.fspath, paths))}")
    return sources


def pair_by_name(images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike]) -> list[LabelledCase]:
    """Pair image and label volumes whose names match (``case_0000.nii.gz`` or ``case.nii.gz`` ↔ ``case.*``).

    Raises:
        InputError: a volume without a partner, two volumes with one name, or a multi-channel image.
    """
    by_name: dict[str, list[VolumeSource | None]] = {}
    for is_image, sources in ((True, _found(images, "images")), (False, _found(labels, "labels"))):
        for s in sources:
            name, channel = case_name(s, image=is_image)
            if channel:
                raise InputError(
                    f"{s.files[0]}: channel {channel:04d} of a multi-channel case; finetune-seg reads "
                    f"one CT channel (_0000) only"
                )
            slot = by_name.setdefault(name, [None, None])
            if slot[0 if is_image else 1] is not None:
                raise InputError(f"{s.files[0]}: two {'images' if is_image else 'labels'} are named {name!r}")
            slot[0 if is_image else 1] = s
    lonely_images = sorted(n for n, (i, lab) in by_name.items() if lab is None)
    lonely_labels = sorted(n for n, (i, lab) in by_name.items() if i is None)
    if lonely_images or lonely_labels:
        parts = [
            f"{len(names)} {what} without a matching {other} (e.g. {names[0]!r})"
            for names, what, other in ((lonely_images, "image(s)", "label"), (lonely_labels, "label(s)", "image"))
            if names
        ]
        raise InputError(f"unpaired volumes: {'; '.join(parts)}; images and labels pair by file name")
    return [LabelledCase(n, i, lab) for n, (i, lab) in sorted(by_name.items())]


def read_datalist(path: str | os.PathLike) -> list[LabelledCase]:
    """Cases from a CSV (``image``, ``label`` columns) or JSON datalist (a list of ``{"image", "label"}`` objects,
    or MSD's ``{"training": [...]}``); relative paths are relative to the list's folder."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("training") if isinstance(data, dict) else data
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise InputError(f"{path}: unreadable datalist ({type(e).__name__})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: datalist holds no cases (expected image,label rows or a list of objects)")
    cases = []
    for n, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        if not isinstance(row, dict) or not row.get("image") or not row.get("label"):
            raise InputError(f"{path}: entry {n} lacks an 'image' and a 'label'")
        pair = [_found([path.parent / str(row[k]).strip()], f"{path}: entry {n}") for k in KEYS]
        if len(pair[0]) != 1 or len(pair[1]) != 1:
            raise InputError(f"{path}: entry {n} names more than one volume")
        cases.append(LabelledCase(case_name(pair[0][0], image=False)[0], pair[0][0], pair[1][0]))
    return cases


def pair_in_order(images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike]) -> list[LabelledCase]:
    """Pair explicitly named image and label files one by one, in the order given (their names need not match).

    Raises:
        InputError: the lists differ in length, or a file is not a readable volume.
    """
    if len(images) != len(labels):
        raise InputError(
            f"{len(images)} image file(s) but {len(labels)} label file(s): image and label files named one by one "
            f"pair in the order given, so their counts must match (give folders to pair by file name)"
        )
    cases = []
    for image, label in zip(images, labels):
        (i,), (lab,) = _found([image], "images"), _found([label], "labels")  # a file is one volume
        cases.append(LabelledCase(case_name(i, image=False)[0], i, lab))
    return cases


def _image_file(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) and os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def find_cases(images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike] = ()) -> list[LabelledCase]:
    """Labelled cases in any of the four layouts: ``images`` + ``labels`` all image files, paired in order; else
    paired by name; or ``images`` alone as one datalist (.csv/.json) or one nnU-Net folder with ``imagesTr/`` and
    ``labelsTr/``.

    Raises:
        InputError: lists of files of different lengths, unpaired volumes, unreadable lists, or a layout that is none
            of these.
    """
    if labels:
        if all(_image_file(p) for p in (*images, *labels)):
            return pair_in_order(images, labels)
        return pair_by_name(images, labels)
    if len(images) == 1:
        one = Path(images[0])
        if one.is_file() and one.suffix.lower() in (".csv", ".json"):
            return read_datalist(one)
        if (one / "imagesTr").is_dir() and (one / "labelsTr").is_dir():
            return pair_by_name([one / "imagesTr"], [one / "labelsTr"])
    raise InputError(
        "labels missing: give --labels, or one .csv/.json datalist (image,label), or one nnU-Net "
        "folder holding imagesTr/ and labelsTr/"
    )


def check_case(case: LabelledCase, num_classes: int | None = None) -> int:
    """Check that the label lies on its image's grid and holds class indices; returns the largest class.

    Raises:
        InputError: as ``case_values``, or a class >= ``num_classes``.
    """
    top = max(case_values(case))
    if num_classes is not None and top >= num_classes:
        raise InputError(f"{case.label.files[0]}: holds class {top}, but --num-classes is {num_classes}")
    return top


def case_values(case: LabelledCase) -> set[int]:
    """Check that the label lies on its image's grid and holds class indices; returns the values it holds.

    The image's geometry comes from its header (a DICOM series is read whole); the label's voxels are read once, in
    their stored type, and checked slab by slab.

    Raises:
        InputError: one line naming the pair and what differs (shape, spacing, direction, origin), or the label and
            its values (not whole numbers 0..255).
    """
    image_shape, image_affine = _geometry(case.image)
    label = CTReader().read(list(case.label.files))  # a SimpleITK image in the stored pixel type
    label_shape, label_affine = tuple(label.GetSize()), ras_affine(label)
    where = f"pair {case.id!r} ({case.image.files[0]} / {case.label.files[0]})"
    if image_shape != label_shape:
        raise InputError(f"{where}: label shape {label_shape} differs from image shape {image_shape}")
    spacing = [np.linalg.norm(a[:3, :3], axis=0) for a in (image_affine, label_affine)]
    if not np.allclose(spacing[0], spacing[1], rtol=SPACING_RTOL, atol=0):
        raise InputError(
            f"{where}: label spacing {np.round(spacing[1], 4).tolist()} differs from image spacing "
            f"{np.round(spacing[0], 4).tolist()}"
        )
    if not np.allclose(image_affine[:3, :3] / spacing[0], label_affine[:3, :3] / spacing[1], atol=DIRECTION_ATOL):
        raise InputError(f"{where}: label direction (orientation) differs from the image's")
    if np.abs(image_affine[:3, 3] - label_affine[:3, 3]).max() > ORIGIN_ATOL * spacing[0].min():
        raise InputError(
            f"{where}: label origin {np.round(label_affine[:3, 3], 3).tolist()} differs from image "
            f"origin {np.round(image_affine[:3, 3], 3).tolist()}"
        )
    return set(np.flatnonzero(class_counts(label, case.label.label)).tolist())


def split_cases(
    cases: Sequence[LabelledCase], val_fraction: float, seed: int
) -> tuple[list[LabelledCase], list[LabelledCase]]:
    """(train, validation): a seeded share of the cases, at least one and never all; a single case is both."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(cases) == 1:
        return list(cases), list(cases)
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def _geometry(source: VolumeSource) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape (X, Y, Z), RAS affine 4x4) of a volume: from an image file's header, or a DICOM series read whole."""
    if source.is_dicom:
        image = CTReader().read(list(source.files))
        return tuple(image.GetSize()), ras_affine(image)
    header = sitk.ImageFileReader()
    header.SetFileName(source.files[0])
    try:
        with itk_warnings_off():
            header.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{source.label}: {condense_sitk_error(e)}") from None
    return tuple(header.GetSize()), ras_affine(header)  # the header has an image's geometry getters


class CachedCases(Sequence):
    """Labelled cases in the on-disk cache. Item ``i`` is ``{"image", "label"}``: MetaTensors (1, X, Y, Z) float32
    with the grid's RAS affine, the image in 0..1 and the label holding class indices, read from the cache at each
    access (nothing is held in memory, and DataLoader workers receive only paths).

    The cache holds each label's own values; ``label_values`` (chosen classes) become classes 1..K as they are read,
    every other value background, so one cache entry serves any choice of classes."""

    def __init__(self, cache: VolumeCache, cases: Sequence[LabelledCase], label_values: Sequence[int] = ()) -> None:
        self.cache, self.cases = cache, list(cases)
        self.select = SelectClassesd(["label"], label_values)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, MetaTensor]:
        case = self.cases[i]
        return self.select(self.cache.load_case(case.image, case.label))


def cache_cases(
    cases: Sequence[LabelledCase],
    pre: PreprocessConfig,
    label_values: Sequence[int] = (),
    on_case: Callable[[], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> CachedCases:
    """Preprocess each case into the on-disk cache unless cached; returns them, read from there on access.

    Args:
        cases: checked labelled cases.
        pre: spacing, HU window and crop (the padding): the entries' key, as pretraining's; and the cache folder.
        label_values: the chosen classes (``SegDataConfig.label_values``), applied as the labels are read.
        on_case: called once per case made ready (progress).
        on_note: called once with ``OLD_CACHE_NOTE`` when entries of an older ctmae are being rebuilt.

    Raises:
        InputError: an image or label is unusable (one line naming it).
        OutputError: the cache could not be written (e.g. a full disk).
    """
    cache = VolumeCache(pre)
    for case in cases:
        cache.label_entry(case.image, case.label)  # builds the image's entry too
        if cache.stale and on_note:
            on_note(OLD_CACHE_NOTE)
            on_note = None
        if on_case:
            on_case()
    return CachedCases(cache, cases, tuple(label_values))


def random_transforms(cfg: SegDataConfig, crop: int) -> Compose:
    """Foreground-balanced crops and flips along each axis, one random draw shared by image and label."""
    pos = cfg.pos_fraction
    return Compose(
        [
            RandCropByPosNegLabeld(
                KEYS,
                label_key="label",
                spatial_size=(crop,) * 3,
                pos=pos,
                neg=1.0 - pos,
                num_samples=cfg.crops_per_volume,
                image_key="image",
                image_threshold=0.0,
            ),
            *[RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)],
        ]
    )


class CaseVisits(Dataset):
    """Item ``v`` is visit ``v`` of the seeded schedule: (images (N, 1, c, c, c), labels (N, 1, c, c, c))."""

    def __init__(
        self, cached: CachedCases, cfg: SegDataConfig, crop: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.cached, self.cfg, self.crop, self.seed, self.rank, self.world = cached, cfg, crop, seed, rank, world

    def __len__(self) -> int:
        return 2**62  # endless; the sampler decides which visits are read

    def __getitem__(self, local_visit: int) -> tuple[torch.Tensor, torch.Tensor]:
        visit = global_visit(local_visit, self.rank, self.world)
        case = self.cached[visit_volume(len(self.cached), self.seed, visit)]
        draw = random_transforms(self.cfg, self.crop)
        draw.set_random_state(seed=(self.seed * 1_000_003 + visit) % 2**32)
        crops = draw({k: case[k] for k in KEYS})
        return tuple(torch.stack([c[k].as_tensor() for c in crops]) for k in KEYS)  # 2 x (N, 1, c, c, c)


def crop_batches(
    cached: CachedCases,
    cfg: SegDataConfig,
    crop: int,
    seed: int,
    batch_size: int,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) batches (B, 1, c, c, c), continuing exactly where step ``start_step`` would be;
    ``rank`` of ``world`` processes reads its own share of the visits (``ctmae.preprocess.visit_order``)."""
    visits = CaseVisits(cached, cfg, crop, seed, rank, world)
    yield from visit_batches(visits, cfg.crops_per_volume, batch_size, start_step, cfg.workers)
