"""Finding the volumes named on a command line: files, folders, DICOM series and lists, each with a private id.

Discovery reads headers only; ``ctmae.io.volume`` reads the voxels. DICOM series are split by SeriesInstanceUID and named by
their folder and a one-way hash of the UID, so ids carry no patient identifiers.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
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
_CSV_PATH_COLUMNS = ("path", "image")


@dataclass(frozen=True)
class VolumeSource:
    """One volume to read.

    Attributes:
        id: stable, privacy-safe name: the path relative to the inputs' common root, and for a DICOM series the
            folder plus "#" and a short hash of the SeriesInstanceUID.
        files: absolute paths: one image file, or a DICOM series' files sorted by slice position.
        is_dicom: whether `files` is a DICOM series.
        modality: the DICOM Modality tag ("CT", "MR", ...); empty for other formats, which do not record it.
    """

    id: str
    files: tuple[str, ...]
    is_dicom: bool
    modality: str = ""

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


def find_volumes(inputs: Sequence[str | os.PathLike]) -> tuple[list[VolumeSource], list[str]]:
    """Expand CLI INPUTS into volumes.

    Args:
        inputs: image files (.nii, .nii.gz, .nrrd, .mha, .mhd), folders (scanned recursively; DICOM files are split
            into series), DICOM series folders, and .txt / .csv lists of such paths.

    Returns:
        (sources, problems): sources deduplicated and sorted by id; problems are one-line messages, each naming the
        path, for inputs that were skipped.
    """
    found: list[_Found] = []
    problems: list[str] = []
    for item in inputs:
        _expand(os.fspath(item), found, problems, allow_lists=True)
    unique: dict[tuple[str, ...], _Found] = {}
    for f in found:
        unique.setdefault(tuple(os.path.realpath(p) for p in f.files), f)
    return sorted(_with_ids(list(unique.values())), key=lambda s: s.id), problems


def _expand(path: str, found: list[_Found], problems: list[str], allow_lists: bool) -> None:
    """Add the volumes one input names to `found`, or one line to `problems`."""
    lower = path.lower()
    if not os.path.exists(path):
        problems.append(f"{path}: does not exist")
    elif os.path.isdir(path):
        before = (len(found), len(problems))
        _scan_folder(path, found, problems)
        if before == (len(found), len(problems)):
            empty = not any(files for _, _, files in os.walk(path))
            problems.append(f"{path}: {'empty folder' if empty else 'folder with no readable volumes'}")
    elif lower.endswith(LIST_SUFFIXES):
        if allow_lists:
            _expand_list(path, found, problems)
        else:
            problems.append(f"{path}: a list inside a list; nested lists are not supported")
    elif lower.endswith(IMAGE_SUFFIXES):
        _add_image_file(path, found, problems)
    elif has_dicom_magic(path):
        problems.append(f"{path}: a single DICOM file; pass its folder to read the whole series")
    else:
        problems.append(f"{path}: not an image (expected .nii(.gz), .nrrd, .mha, .mhd, a folder or a .txt/.csv list)")


def _scan_folder(folder: str, found: list[_Found], problems: list[str]) -> None:
    """Add every image file and DICOM series under `folder`, in a deterministic order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        dicom_candidates = False
        for name in sorted(filenames):
            lower = name.lower()
            if name.startswith("."):
                continue
            if lower.endswith(IMAGE_SUFFIXES):
                _add_image_file(os.path.join(dirpath, name), found, problems)
            elif not lower.endswith(_SKIP_SUFFIXES):
                dicom_candidates = True
        if dicom_candidates:
            _add_dicom_folder(dirpath, found, problems)


def _add_image_file(path: str, found: list[_Found], problems: list[str]) -> None:
    """Add one image file after a cheap header check."""
    problem = _header_problem(path)
    if problem:
        problems.append(f"{path}: {problem}")
        return
    absolute = os.path.abspath(path)
    found.append(_Found((absolute,), False, os.path.dirname(absolute), absolute))


def _add_dicom_folder(folder: str, found: list[_Found], problems: list[str]) -> None:
    """Add the image series whose files lie directly in `folder`; report DICOM files that hold none."""
    series = series_in_folder(folder)
    if not series:
        if any(has_dicom_magic(str(p)) for p in Path(folder).iterdir() if p.is_file()):
            problems.append(f"{folder}: DICOM files here hold no image series")
        return
    for s in series:
        problem = _header_problem(s.files[0], slices=len(s.files))
        if problem:
            problems.append(f"{folder}#{s.uid_hash}: {problem}")
            continue
        found.append(
            _Found(s.files, True, os.path.dirname(s.folder), f"{s.folder}#{s.uid_hash}", series_modality(s.files[0]))
        )


def _expand_list(list_path: str, found: list[_Found], problems: list[str]) -> None:
    """Expand a .txt (one path a line) or .csv (first column, or the `path`/`image` column) list of inputs."""
    base = os.path.dirname(os.path.abspath(list_path))
    try:
        with open(list_path, newline="", encoding="utf-8") as f:
            if list_path.lower().endswith(".csv"):
                entries = _csv_entries(list(csv.reader(f)))
            else:
                entries = [(n, line.strip()) for n, line in enumerate(f, start=1)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.append(f"{list_path}: unreadable list ({type(e).__name__})")
        return
    entry_problems: list[str] = []
    for lineno, entry in entries:
        if not entry or entry.startswith("#"):
            continue
        path = entry if os.path.isabs(entry) else os.path.join(base, entry)
        _expand(path, found, entry_problems, allow_lists=False)
        problems.extend(f"{list_path}:{lineno}: {p}" for p in entry_problems)
        entry_problems.clear()


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
        VolumeSource(Path(os.path.relpath(f.name, root)).as_posix(), f.files, f.is_dicom, f.modality) for f in found
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
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError as e:
        return condense_sitk_error(e)
    size = list(reader.GetSize())
    if slices is not None and slices > 1 and len(size) == 3:
        size[2] = slices
    return shape_problem(tuple(size), reader.GetNumberOfComponents())


def ensure_not_inputs(paths: Sequence[str | os.PathLike], sources: Sequence[VolumeSource]) -> None:
    """Refuse output paths that are input files (compared after resolving links): ctmae never overwrites a scan.

    Raises:
        InputError: one line naming the clashing path.
    """
    inputs = {os.path.realpath(f) for s in sources for f in s.files}
    for path in paths:
        if os.path.realpath(path) in inputs:
            raise InputError(f"{path}: is one of the input scans; ctmae never overwrites inputs (choose another --out)")
