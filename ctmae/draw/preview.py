"""reconstruct's preview.png: mid-slices of the input, the masked input, the reconstruction and the error, with titles.

Rows are the axial, coronal and sagittal mid-slices, shown radiologically (patient right on the left, anterior /
superior up) at true aspect: one millimetre is the same number of pixels in every panel, so each row is exactly as
tall as its slices and a thin-slab scan gets short coronal and sagittal rows instead of black bands. Columns are
input | masked | reconstruction | |error|: grey in a lung-and-soft-tissue window, hidden voxels tinted in the
masked column, and the error in the inferno colour map on a scale printed under it. Text comes from the bitmap font
in ``ctmae.draw.glyphs``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ctmae.draw.glyphs import LINE, draw_text, text_width, wrap
from ctmae.runtime.files import atomic_path

WINDOW = (-1000.0, 400.0)  # HU shown black..white: lung parenchyma and soft tissue both readable
PANEL = 320  # pixels along the longest millimetre extent of any slice
COLUMNS = ("input", "masked", "reconstruction", "|error|")
VIEWS = ("axial", "coronal", "sagittal")
SEP = 3  # pixels between panels
PAD = 8  # pixels around text
TEXT_SCALE = 2  # font pixels per glyph pixel
BACKGROUND = (40, 40, 40)  # bands and separators: never confused with black air in a panel
TEXT = (235, 235, 235)
HIDDEN = (40, 80, 150)  # hidden voxels in the masked column
# inferno (matplotlib's perceptual map) at 11 evenly spaced points, interpolated to 256 entries
_INFERNO = "000004 160b39 420a68 6a176e 932667 bc3754 dd513a f37819 fca50a f6d746 fcffa4"
_ANCHORS = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _INFERNO.split()], dtype=np.float64)
ERROR_LUT = (
    np.stack(
        [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
    )
    .round()
    .astype(np.uint8)
)  # (256, 3)


@dataclass(frozen=True)
class Layout:
    """Pixel geometry of a preview: panel sizes per view, where the body starts, and the full image size."""

    sizes: tuple[tuple[int, int], ...]  # (height, width) of each view's panels, in VIEWS order
    label_w: int  # the left column holding the view names
    cell_w: int  # width of each column of panels
    top: int  # first row of the panels (below the title and the column titles)
    legend_h: int  # band under the panels holding the scales

    @property
    def width(self) -> int:
        return self.label_w + len(COLUMNS) * (self.cell_w + SEP)

    @property
    def height(self) -> int:
        return self.top + sum(h for h, _ in self.sizes) + (len(self.sizes) - 1) * SEP + SEP + self.legend_h

    def row_top(self, view: int) -> int:
        return self.top + sum(h for h, _ in self.sizes[:view]) + view * SEP

    def column_left(self, column: int) -> int:
        return self.label_w + column * (self.cell_w + SEP)


def error_scale(error: np.ndarray) -> float:
    """The |error| (HU) shown at the top of the colour map: the first round number at or above 1.25 x the 95th
    percentile of the non-zero errors (a uniform error sits at most 4/5 up the map, a few outliers saturate), at
    least 10 HU."""
    nonzero = error[error > 0]
    if nonzero.size == 0:
        return 10.0
    target = 1.25 * float(np.percentile(nonzero, 95))
    for exponent in range(1, 6):
        for step in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
            if step * 10**exponent >= target:
                return step * 10**exponent
    return target


def write_preview(
    path: str | os.PathLike,
    volumes: Sequence[np.ndarray],
    hidden: np.ndarray,
    affine: np.ndarray,
    title: Sequence[str],
) -> float:
    """Render the preview (see the module docstring) and write it atomically as an RGB PNG.

    Args:
        path: the .png to write.
        volumes: input, masked, reconstruction and |error|, each (X, Y, Z) in HU on the source grid.
        hidden: (X, Y, Z) bool, the hidden voxels (mask.nii.gz).
        affine: the volumes' voxel-to-RAS affine.
        title: lines printed above the panels.

    Returns:
        The error scale used (HU at the top of the colour map).
    """
    image, _, scale = render_preview(volumes, hidden, affine, title)
    with atomic_path(path) as tmp:  # SimpleITK picks the PNG writer from the temporary name's suffix
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp))
    return scale


def render_preview(
    volumes: Sequence[np.ndarray], hidden: np.ndarray, affine: np.ndarray, title: Sequence[str]
) -> tuple[np.ndarray, Layout, float]:
    """The preview as an (H, W, 3) uint8 array, its layout, and the error scale in HU (arguments as for
    ``write_preview``)."""
    err_max = error_scale(volumes[3])
    slices = [_mid_slices(v, affine) for v in (*volumes, hidden.view(np.uint8))]  # [volume][view] -> (2D, mm)
    extents = [(s.shape[0] * mm[0], s.shape[1] * mm[1]) for s, mm in slices[0]]
    px_per_mm = min(PANEL / max(max(e) for e in extents), 1.0 / min(min(mm) for _, mm in slices[0]))
    sizes = tuple((max(1, round(h * px_per_mm)), max(1, round(w * px_per_mm))) for h, w in extents)
    line = LINE * TEXT_SCALE
    layout = Layout(
        sizes=sizes,
        label_w=text_width("sagittal", TEXT_SCALE) + 2 * PAD,
        cell_w=max(max(w for _, w in sizes), text_width("reconstruction", TEXT_SCALE) + 2 * PAD),
        top=0,
        legend_h=2 * PAD + 12 + line,
    )
    lines = [part for text in title for part in wrap(text, layout.width - 2 * PAD, TEXT_SCALE)]
    layout = dataclasses.replace(layout, top=PAD + len(lines) * line + PAD + line)
    image = np.empty((layout.height, layout.width, 3), np.uint8)
    image[:] = BACKGROUND
    for i, text in enumerate(lines):
        draw_text(image, text, PAD, PAD + i * line, TEXT, TEXT_SCALE)
    for c, name in enumerate(COLUMNS):
        x = layout.column_left(c) + (layout.cell_w - text_width(name, TEXT_SCALE)) // 2
        draw_text(image, name, x, layout.top - line, TEXT, TEXT_SCALE)
    for v, name in enumerate(VIEWS):
        draw_text(image, name, PAD, layout.row_top(v) + PAD, TEXT, TEXT_SCALE)
        hidden_px = _resize(slices[4][v][0], sizes[v])
        for c in range(len(COLUMNS)):
            panel = _colour(c, _resize(slices[c][v][0], sizes[v]), hidden_px, err_max)
            top, left = layout.row_top(v), layout.column_left(c) + (layout.cell_w - sizes[v][1]) // 2
            image[top : top + sizes[v][0], left : left + sizes[v][1]] = panel
    _legend(image, layout, err_max, bool(hidden.any()))
    return image, layout, err_max


def _mid_slices(volume: np.ndarray, affine: np.ndarray) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Axial, coronal and sagittal mid-slices in RAS, oriented for display, each with its (row, col) mm per pixel."""
    canonical = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    data = np.asanyarray(canonical.dataobj)  # (R, A, S) voxel axes; a flipped / transposed view, not a copy
    zooms = canonical.header.get_zooms()[:3]
    x, y, z = (n // 2 for n in data.shape)
    views = [
        (data[::-1, ::-1, z].T, (zooms[1], zooms[0])),  # axial: rows A->P, cols R->L
        (data[::-1, y, ::-1].T, (zooms[2], zooms[0])),  # coronal: rows S->I, cols R->L
        (data[x, ::-1, ::-1].T, (zooms[2], zooms[1])),  # sagittal: rows S->I, cols A->P
    ]
    return [(view.astype(np.float32), mm) for view, mm in views]


def _resize(view: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (rows, cols) slice to ``size`` pixels."""
    t = torch.from_numpy(np.ascontiguousarray(view))[None, None]  # (1, 1, rows, cols)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _colour(column: int, hu: np.ndarray, hidden: np.ndarray, err_max: float) -> np.ndarray:
    """One panel (h, w) -> (h, w, 3) uint8: grey window, hidden voxels tinted (masked column), or inferno |error|."""
    if column == len(COLUMNS) - 1:
        return ERROR_LUT[np.round(np.clip(hu / err_max, 0, 1) * 255).astype(np.intp)]
    lo, hi = WINDOW
    grey = np.clip((hu - lo) / (hi - lo), 0, 1)[..., None] * 255.0  # (h, w, 1)
    if column == 1:
        weight = np.clip(hidden, 0, 1)[..., None]
        grey = grey * (1 - weight) + weight * np.array(HIDDEN, dtype=np.float64)
    return np.round(np.broadcast_to(grey, (*hu.shape, 3))).astype(np.uint8)


def _legend(image: np.ndarray, layout: Layout, err_max: float, any_hidden: bool) -> None:
    """Scales under the panels: the grey window (input column), the hidden tint, the error colour bar in HU."""
    top = layout.height - layout.legend_h + PAD
    bar_w = layout.cell_w - 2 * PAD
    ramp = np.linspace(0, 1, bar_w)
    left = layout.column_left(0) + PAD
    image[top : top + 12, left : left + bar_w] = np.round(ramp * 255).astype(np.uint8)[None, :, None]
    _bar_labels(image, left, bar_w, top + 12 + 4, f"{WINDOW[0]:g}", f"{WINDOW[1]:g} HU")
    if any_hidden:
        left = layout.column_left(1) + PAD
        image[top : top + 12, left : left + 24] = HIDDEN
        draw_text(image, "hidden", left, top + 12 + 4, TEXT, TEXT_SCALE)
    left = layout.column_left(3) + PAD
    image[top : top + 12, left : left + bar_w] = ERROR_LUT[np.round(ramp * 255).astype(np.intp)][None]
    _bar_labels(image, left, bar_w, top + 12 + 4, "0", f"{err_max:g} HU")


def _bar_labels(image: np.ndarray, left: int, width: int, top: int, low: str, high: str) -> None:
    draw_text(image, low, left, top, TEXT, TEXT_SCALE)
    draw_text(image, high, left + width - text_width(high, TEXT_SCALE), top, TEXT, TEXT_SCALE)
