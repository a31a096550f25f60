"""Finding the volumes named on a command line: files, folders, DICOM series and lists, each with a private id.

Discovery reads headers only; ``ctmae.io.volume`` reads the voxels. DICOM series are split by SeriesInstanceUID and
named by their folder and a one-way hash of the UID, so ids carry no patient identifiers. In a scanned folder, label
maps under a dataset's ``labelsTr/`` (``labelsTs/``, ``labels/``) folder are skipped by path, and files that are not
scans (notes, pictures, tables) are listed once.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from ctmae.io.checks import IMAGE_SUFFIXES, InputError, condense_sitk_error, shape_problem
from ctmae.io.dicom import has_dicom_magic, itk_warnings_off, series_in_folder, series_modality

LIST_SUFFIXES = (".txt", ".csv")
# Files in scanned folders that are never volumes (and never DICOM), so GDCM is not asked about them.
# fmt: off
_SKIP_SUFFIXES = (
    ".json", ".txt", ".md", ".csv", ".tsv", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".pdf",
    ".py", ".yaml", ".yml", ".xml", ".html", ".log", ".npy", ".npz", ".pt", ".pth", ".raw", ".zraw", ".zip", ".gz",
)
# fmt: on
_COMPANION_SUFFIXES = (".raw", ".zraw")  # a MetaImage header's voxel data: part of the .mhd, never listed as ignored
_CSV_PATH_COLUMNS = ("path", "image")
# A dataset root (nnU-Net, MSD, or plain images/ + labels/) holds one of these label folders next to an image folder.
LABEL_FOLDERS = ("labelsTr", "labelsTs", "labels")
IMAGE_FOLDERS = ("imagesTr", "imagesTs", "images")
_IGNORED_SHOWN = 5  # ignored files named in the note; the rest are counted


class Note(str):
    """A line from ``find_volumes`` that skips no volume (files that are not scans were ignored): report it, but
    do not count it as a skipped input."""


def files_label(files: Sequence[str | os.PathLike]) -> str:
    """How messages name a volume given by its files: the one file, or a DICOM series' folder."""
    return os.fspath(files[0]) if len(files) == 1 else os.path.dirname(os.fspath(files[0]))


def skipped_only(lines: Sequence[str]) -> list[str]:
    """The lines of ``find_volumes``' problems that skip an input (every line but a ``Note``)."""
    return [line for line in lines if not isinstance(line, Note)]


@dataclass(frozen=True)
class VolumeSource:
    """One volume to read.

    Attributes:
        id: stable, privacy-safe name: the path relative to the inputs' common root, and for a DICOM series the
            folder plus "#" and a short hash of the SeriesInstanceUID.
        files: absolute paths: one image file, or a DICOM series' files sorted by slice position.
        is_dicom: whether `files` is a DICOM series.
        modality: the DICOM Modality tag ("CT", "MR", ...); empty for other formats, which do not record it.
        shared_folder: a DICOM series whose folder holds other series too.
    """

    id: str
    files: tuple[str, ...]
    is_dicom: bool
    modality: str = ""
    shared_folder: bool = False

    @property
    def label(self) -> str:
        """How messages name this volume: its file (a multi-frame DICOM file too), or a DICOM series' folder (plus
        "#hash" of the series when the folder holds several)."""
        if not self.is_dicom or len(self.files) == 1:
            return self.files[0]
        folder = os.path.dirname(self.files[0])
        return f"{folder}#{self.id.rsplit('#', 1)[1]}" if self.shared_folder and "#" in self.id else folder

    def identity(self) -> str:
        """sha256 hex over (absolute path, size, mtime_ns) of every file; changes whenever a file does.

        Raises:
            InputError: a file has disappeared since it was found.
        """
        digest = hashlib.sha256()
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError:
                raise InputError(f"{path}: no longer exists") from None
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class _Found:
    """A volume found before ids are assigned; `anchor` is the folder its id is relative to."""

    files: tuple[str, ...]
    is_dicom: bool
    anchor: str
    name: str  # absolute path of the file, or of the series folder plus "#hash"
    modality: str = ""
    shared_folder: bool = False


@dataclass
class _Search:
    """What one ``find_volumes`` call has gathered so far."""

    skip_labels: bool
    found: list[_Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files in scanned folders that are not scans, as given
    slices: list[str] = field(default_factory=list)  # DICOM slice files named one by one, read as their series


def find_volumes(inputs: Sequence[str | os.PathLike], skip_labels: bool = True) -> tuple[list[VolumeSource], list[str]]:
    """Expand CLI INPUTS into volumes.

    Args:
        inputs: image files (.nii, .nii.gz, .nrrd, .mha, .mhd), folders (scanned recursively; DICOM files are split
            into series), DICOM series folders, multi-frame DICOM files, and .txt / .csv lists of such paths.
        skip_labels: in scanned folders, skip the volumes under a ``labelsTr``, ``labelsTs`` or ``labels`` folder
            of a dataset root (a folder that also holds ``imagesTr``, ``imagesTs`` or ``images``), one problem line
            each. False where labels are read on purpose (finetune-seg).

    Returns:
        (sources, problems): sources deduplicated and sorted by id; problems are one-line messages, each naming the
        absolute path, for inputs that were skipped, and last, when scanned folders held files that are not scans, one
        ``Note`` naming them ("ignored 2 files: a.png, b.txt"); ``skipped_only`` drops it.
    """
    search = _Search(skip_labels)
    for item in inputs:  # absolute: every message names a file the same way, whichever check refuses it
        _expand(os.path.abspath(os.fspath(item)), search, allow_lists=True)
    _add_named_slices(search)
    unique: dict[tuple[str, ...], _Found] = {}
    for f in search.found:
        unique.setdefault(tuple(os.path.realpath(p) for p in f.files), f)
    problems = search.problems + ([Note(f"ignored {_listing(search.ignored)}")] if search.ignored else [])
    return sorted(_with_ids(list(unique.values())), key=lambda s: s.id), problems


def _listing(paths: Sequence[str]) -> str:
    """The count and the names, as in "2 files: a.png, b.txt"; at most ``_IGNORED_SHOWN`` names."""
    shown = ", ".join(paths[:_IGNORED_SHOWN])
    more = f" and {len(paths) - _IGNORED_SHOWN} more" if len(paths) > _IGNORED_SHOWN else ""
    return f"{len(paths)} file{'s' if len(paths) > 1 else ''}: {shown}{more}"


def _expand(path: str, search: _Search, allow_lists: bool) -> None:
    """Add the volumes one input names to the search, or one line to its problems."""
    lower = path.lower()
    problems = search.problems
    if not os.path.exists(path):
        problems.append(f"{path}: does not exist")
    elif os.path.isdir(path):
        before = (len(search.found), len(problems), len(search.ignored))
        _scan_folder(path, search)
        if before[:2] == (len(search.found), len(problems)):
            empty = not any(files for _, _, files in os.walk(path))
            ignored = search.ignored[before[2] :]  # named in this line rather than in the note
            del search.ignored[before[2] :]
            reason = "empty folder" if empty else "folder with no readable volumes"
            problems.append(f"{path}: {reason}" + (f" (ignored {_listing(ignored)})" if ignored else ""))
    elif lower.endswith(LIST_SUFFIXES):
        if allow_lists:
            _expand_list(path, search)
        else:
            problems.append(f"{path}: a list inside a list; nested lists are not supported")
    elif lower.endswith(IMAGE_SUFFIXES):
        _add_image_file(path, search.found, problems)
    elif has_dicom_magic(path):
        _add_dicom_file(path, search)
    else:
        problems.append(f"{path}: not an image (expected .nii(.gz), .nrrd, .mha, .mhd, a folder or a .txt/.csv list)")


def _scan_folder(folder: str, search: _Search) -> None:
    """Add every image file and DICOM series under `folder`, in a deterministic order; note files that are not
    scans, and skip label folders of a dataset root (when the search skips labels)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        hidden = any(part.startswith(".") for part in Path(os.path.relpath(dirpath, folder)).parts)
        labels = _label_folder(dirpath, folder) if search.skip_labels else None
        others = []
        for name in sorted(filenames):
            lower, path = name.lower(), os.path.join(dirpath, name)
            if name.startswith(".") or lower.endswith(_COMPANION_SUFFIXES):
                continue
            if lower.endswith(IMAGE_SUFFIXES):
                if labels:
                    search.problems.append(f"{path}: a label map ({labels}), not a scan")
                else:
                    _add_image_file(path, search.found, search.problems)
            elif lower.endswith(_SKIP_SUFFIXES):
                search.ignored += [] if hidden else [path]
            else:
                others.append(name)
        if others and labels:
            search.problems.append(f"{dirpath}: label maps ({labels}), not scans; its DICOM files were not read")
        elif others:
            in_series = _add_dicom_folder(dirpath, search.found, search.problems)
            for name in others:
                path = os.path.join(dirpath, name)
                # without any series, DICOM files were reported as holding none; the rest are not DICOM at all
                if not hidden and name not in in_series and (in_series or not has_dicom_magic(path)):
                    search.ignored.append(path)


def _label_folder(dirpath: str, top: str) -> str | None:
    """Where `dirpath` (at or below the scanned folder `top`) lies inside a dataset root's label folder, as
    "under labelsTr/ next to imagesTr/", or None."""
    path, stop = os.path.abspath(dirpath), os.path.dirname(os.path.abspath(top))
    while path not in (stop, os.path.dirname(path)):
        parent = os.path.dirname(path)
        if os.path.basename(path) in LABEL_FOLDERS:
            images = next((d for d in IMAGE_FOLDERS if os.path.isdir(os.path.join(parent, d))), None)
            if images:
                return f"under {os.path.basename(path)}/ next to {images}/"
        path = parent
    return None


def _add_image_file(path: str, found: list[_Found], problems: list[str]) -> None:
    """Add one image file after a cheap header check."""
    problem = _header_problem(path)
    if problem:
        problems.append(f"{path}: {problem}")
        return
    absolute = os.path.abspath(path)
    found.append(_Found((absolute,), False, os.path.dirname(absolute), absolute))


def _add_dicom_file(path: str, search: _Search) -> None:
    """A DICOM file named on its own: a multi-frame file (an enhanced CT export: the whole volume in one file) is
    read as a series of that one file, as when its folder is scanned; a slice waits for ``_add_named_slices``."""
    header = _header(path)
    if isinstance(header, str):
        search.problems.append(f"{path}: {header}")
        return
    size, components = header
    if len(size) < 3 or size[2] < 2:
        search.slices.append(path)
        return
    problem = shape_problem(size, components)
    if problem:
        search.problems.append(f"{path}: {problem}")
        return
    found = _Found((path,), True, os.path.dirname(path), path, series_modality(path))
    search.found.append(found)


def _add_named_slices(search: _Search) -> None:
    """DICOM slices named one by one (``ctmae pretrain series/*.dcm``) are read as the series they belong to, each
    series from the files of it that were named; a series named by one slice alone is refused with the way to read
    it whole."""
    folders: dict[str, set[str]] = {}
    for path in search.slices:
        folders.setdefault(os.path.dirname(path), set()).add(path)
    for folder, named in folders.items():
        _add_dicom_folder(folder, search.found, search.problems, named)


def _add_dicom_folder(folder: str, found: list[_Found], problems: list[str], named: set[str] | None = None) -> set[str]:
    """Add the image series whose files lie directly in `folder`, or only those of its files in `named`; report
    DICOM files that hold none.

    Returns:
        The names of the files that belong to an image series (empty when there is none).
    """
    series = series_in_folder(folder)
    if not series:
        if any(has_dicom_magic(str(p)) for p in Path(folder).iterdir() if p.is_file()):
            problems.append(f"{folder}: DICOM files here hold no image series")
        return set()
    for s in series:
        files = s.files if named is None else tuple(f for f in s.files if f in named)
        if not files:
            continue
        if len(files) == 1 and named is not None:
            problems.append(f"{files[0]}: a single DICOM file; pass its folder to read the whole series")
            continue
        problem = _header_problem(files[0], slices=len(files))
        if problem:
            where = f"{folder}#{s.uid_hash}" if len(series) > 1 else folder
            problems.append(f"{where}: {problem}")
            continue
        name, modality = f"{s.folder}#{s.uid_hash}", series_modality(files[0])
        found.append(_Found(files, True, os.path.dirname(s.folder), name, modality, len(series) > 1))
    return {os.path.basename(f) for s in series for f in s.files}


def _expand_list(list_path: str, search: _Search) -> None:
    """Expand a .txt (one path a line) or .csv (first column, or the `path`/`image` column) list of inputs."""
    base = os.path.dirname(os.path.abspath(list_path))
    try:
        with open(list_path, newline="", encoding="utf-8") as f:
            if list_path.lower().endswith(".csv"):
                entries = _csv_entries(list(csv.reader(f)))
            else:
                entries = [(n, line.strip()) for n, line in enumerate(f, start=1)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        search.problems.append(f"{list_path}: unreadable list ({type(e).__name__})")
        return
    problems = search.problems
    for lineno, entry in entries:
        if not entry or entry.startswith("#"):
            continue
        path = entry if os.path.isabs(entry) else os.path.join(base, entry)
        search.problems = []
        _expand(path, search, allow_lists=False)
        problems.extend(f"{list_path}:{lineno}: {p}" for p in search.problems)
    search.problems = problems


def _csv_entries(rows: list[list[str]]) -> list[tuple[int, str]]:
    """(line number, path) pairs from CSV rows; a header naming a `path` or `image` column selects that column."""
    column, first = 0, 0
    if rows:
        header = [cell.strip().lower() for cell in rows[0]]
        for name in _CSV_PATH_COLUMNS:
            if name in header:
                column, first = header.index(name), 1
                break
    return [(n + 1, row[column].strip() if len(row) > column else "") for n, row in enumerate(rows) if n >= first]


def _with_ids(found: list[_Found]) -> list[VolumeSource]:
    """Name each volume by its path relative to the deepest folder holding all anchors (POSIX style everywhere)."""
    if not found:
        return []
    root = os.path.commonpath([f.anchor for f in found])
    return [
        VolumeSource(Path(os.path.relpath(f.name, root)).as_posix(), f.files, f.is_dicom, f.modality, f.shared_folder)
        for f in found
    ]


def check_modality(sources: Sequence[VolumeSource], required: str | None) -> tuple[list[VolumeSource], list[str]]:
    """Sort out DICOM series of another modality than CT.

    Args:
        sources: found volumes.
        required: a modality every DICOM series must have (e.g. "CT"): others are dropped and reported. None: all
            are kept and non-CT series get a warning line.

    Returns:
        (kept sources, one line per dropped or suspicious series).
    """
    kept, lines = [], []
    for s in sources:
        other = s.modality and s.modality.upper() != (required or "CT").upper()
        if other and required:
            lines.append(f"{s.id}: modality {s.modality}, not {required}")
            continue
        if other:
            lines.append(f"{s.id}: modality {s.modality}, not CT; HU windowing assumes CT (--modality CT skips it)")
        kept.append(s)
    return kept, lines


def _header_problem(path: str, slices: int | None = None) -> str | None:
    """A short reason why `path`'s header rules it out, or None; reads only the header.

    Args:
        path: an image file, or the first file of a DICOM series.
        slices: the series' file count, which replaces the single file's slice count.
    """
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    header = _header(path)
    if isinstance(header, str):
        return header
    size, components = header
    if slices is not None and slices > 1 and len(size) == 3:
        size = (*size[:2], slices)
    return shape_problem(size, components)


def _header(path: str) -> tuple[tuple[int, ...], int] | str:
    """(size, components per voxel) from `path`'s header alone, or why it cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError as e:
        return condense_sitk_error(e)
    return tuple(reader.GetSize()), reader.GetNumberOfComponents()
