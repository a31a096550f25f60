"""The charts of evaluate (report.png) and study (study.png), drawn with NumPy into RGB PNGs written by SimpleITK.

report.png: the three protocols side by side.
Left: few-shot Dice against the number of labelled cases, one line per encoder, error bars ± one sd over repeats.
Middle: frozen-probe Dice, one bar per encoder. Right: masked-voxel PSNR under block and random masks, a bar per
checkpoint next to the gaussian and mean fills. One colour per encoder in every panel, named in the legend below.
study.png: probe Dice against mask ratio, one line per corruption, and bars of the best probe Dice per corruption
beside the raw-intensity floor and the PSNR gain over the best fill.
Text comes from the bitmap font in ``ctmae.draw.glyphs`` (no plotting library among the dependencies).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctmae.draw.glyphs import draw_text, fit, text_width
from ctmae.runtime.files import atomic_path

# tab10's first colours: distinguishable, and readable for the common colour-vision deficiencies
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
]
FILLS = {"gaussian": (150, 150, 150), "mean": (205, 205, 205)}  # the trivial fills, in greys
WHITE, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
PANEL_W, PANEL_H, MARGIN, SCALE = 400, 300, 56, 2  # plot area and left margin in pixels; font scale
TOP = 48  # space for a panel's title


def write_report_chart(path: Path, report: dict[str, Any]) -> None:
    """Draw the report's figures and write them atomically as an RGB PNG."""
    image = render_report(report)
    with atomic_path(path) as tmp:  # SimpleITK picks the PNG writer from the temporary name's suffix
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp))


def render_report(report: dict[str, Any]) -> np.ndarray:
    """The chart as an (H, W, 3) uint8 array."""
    subjects = report["subjects"]
    colour = {s["slug"]: PALETTE[i % len(PALETTE)] for i, s in enumerate(subjects)}
    legend = [(colour[s["slug"]], s["label"]) for s in subjects]
    if report["recon"]:
        legend += [(FILLS["gaussian"], "gaussian fill (recon)"), (FILLS["mean"], "mean fill (recon)")]
    cell_w = PANEL_W + MARGIN + 24
    legend_rows = math.ceil(len(legend) / 2)
    height = TOP + PANEL_H + 40 + legend_rows * 22 + 16
    image = np.full((height, 3 * cell_w + 16, 3), WHITE, np.uint8)
    panels = [
        ("few-shot Dice vs labelled cases", _fewshot),
        ("frozen probe Dice", _probe),
        ("masked PSNR dB: block | random", _recon),
    ]
    for i, (title, draw) in enumerate(panels):
        left = 16 + i * cell_w + MARGIN
        draw_text(image, fit(title, PANEL_W, SCALE), left, 12, INK, SCALE)
        draw(image, left, TOP, report, colour)
    top = TOP + PANEL_H + 40
    for i, (c, text) in enumerate(legend):
        x, y = 16 + MARGIN + (i % 2) * (cell_w + cell_w // 2), top + (i // 2) * 22
        _rect(image, x, y, x + 14, y + 14, c)
        draw_text(image, fit(text, cell_w + cell_w // 2 - 30, SCALE), x + 22, y, INK, SCALE)
    return image


def _axes(image: np.ndarray, left: int, top: int, y_max: float, ticks: list[float], empty: bool) -> None:
    """Grid lines and y tick labels for values 0..y_max; "no data" when the protocol did not run."""
    for t in ticks:
        y = _y(t, top, y_max)
        _rect(image, left, y, left + PANEL_W, y + 1, GRID)
        label = f"{t:g}"
        draw_text(image, label, left - text_width(label, SCALE) - 6, y - 7, INK, SCALE)
    _rect(image, left, top, left + 1, top + PANEL_H, INK)
    _rect(image, left, top + PANEL_H, left + PANEL_W, top + PANEL_H + 1, INK)
    if empty:
        draw_text(
            image, "not run", left + PANEL_W // 2 - text_width("not run", SCALE) // 2, top + PANEL_H // 2, INK, SCALE
        )


def _y(value: float, top: int, y_max: float) -> int:
    return top + PANEL_H - int(round(PANEL_H * min(max(value, 0.0), y_max) / y_max))


def _fewshot(image: np.ndarray, left: int, top: int, report: dict[str, Any], colour: dict) -> None:
    shots = report["settings"]["shots"]
    _axes(image, left, top, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], not report["fewshot"])
    xs = [left + int(PANEL_W * (i + 0.5) / len(shots)) for i in range(len(shots))]
    for k, x in zip(shots, xs):
        draw_text(image, f"k={k}", x - text_width(f"k={k}", SCALE) // 2, top + PANEL_H + 8, INK, SCALE)
    for n, (slug, by_k) in enumerate(report["fewshot"].items()):
        points = []
        for k, x in zip(shots, xs):
            e = by_k.get(str(k))
            if e is None:
                continue
            x += (n - len(report["fewshot"]) / 2) * 6  # a small offset keeps overlapping error bars apart
            y = _y(e["mean"], top, 1.0)
            if e["sd"]:
                lo, hi = _y(e["mean"] - e["sd"], top, 1.0), _y(e["mean"] + e["sd"], top, 1.0)
                _rect(image, int(x), hi, int(x) + 2, lo, colour[slug])
                _rect(image, int(x) - 5, hi, int(x) + 7, hi + 2, colour[slug])
                _rect(image, int(x) - 5, lo, int(x) + 7, lo + 2, colour[slug])
            _rect(image, int(x) - 4, y - 4, int(x) + 6, y + 6, colour[slug])
            points.append((int(x) + 1, y + 1))
        for a, b in zip(points, points[1:]):
            _line(image, a, b, colour[slug])


def _probe(image: np.ndarray, left: int, top: int, report: dict[str, Any], colour: dict) -> None:
    _axes(image, left, top, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], not report["probe"])
    names = {s["slug"]: s["label"] for s in report["subjects"]}
    bars = [(colour[slug], r["dice"]) for slug, r in report["probe"].items()]
    _bars(image, left, top, 0, PANEL_W, bars, 1.0, [names.get(slug, slug) for slug in report["probe"]])


def _recon(image: np.ndarray, left: int, top: int, report: dict[str, Any], colour: dict) -> None:
    values = [
        v
        for r in report["recon"].values()
        for kind in ("block", "random")
        for m in ("mae", "gaussian", "mean")
        if (v := r[kind][m]) is not None
    ]
    y_max = max(10.0, math.ceil(max(values, default=10.0) / 10.0) * 10.0)
    _axes(image, left, top, y_max, [y_max * i / 5 for i in range(6)], not report["recon"])
    for g, kind in enumerate(("block", "random")):
        bars = [(colour[slug], r[kind]["mae"]) for slug, r in report["recon"].items()]
        first = next(iter(report["recon"].values()), None)
        if first is not None:
            bars += [(FILLS[m], first[kind][m]) for m in ("gaussian", "mean")]
        _bars(image, left, top, g * PANEL_W // 2, PANEL_W // 2, bars, y_max)
        x = left + g * PANEL_W // 2 + PANEL_W // 4 - text_width(kind, SCALE) // 2
        draw_text(image, kind, x, top + PANEL_H + 8, INK, SCALE)


def _bars(
    image: np.ndarray, left: int, top: int, offset: int, width: int, bars: list, y_max: float, names: list | None = None
) -> None:
    """Bars (colour, value or None) spread evenly over ``width`` pixels, each with its value above it and, with
    ``names``, its name below the axis; a missing value leaves a gap, a zero is a 3-pixel bar (still visible)."""
    if not bars:
        return
    slot = width / len(bars)
    for i, (c, value) in enumerate(bars):
        x0 = left + offset + int(i * slot + slot * 0.15)
        x1 = left + offset + int((i + 1) * slot - slot * 0.15)
        if names:
            name = fit(names[i], x1 - x0 + int(slot * 0.3))
            draw_text(image, name, (x0 + x1 - text_width(name)) // 2, top + PANEL_H + 8, INK)
        if value is None:
            continue
        y = min(_y(value, top, y_max), top + PANEL_H - 3)
        _rect(image, x0, y, max(x1, x0 + 2), top + PANEL_H, c)
        text = f"{value:.2f}" if y_max <= 1 else f"{value:.1f}"
        draw_text(image, fit(text, x1 - x0 + int(slot * 0.3)), (x0 + x1 - text_width(text)) // 2, y - 10, INK)


def _rect(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
    """Fill [x0, x1) x [y0, y1), clipped to the image."""
    h, w = image.shape[:2]
    x0, x1, y0, y1 = max(0, min(x0, x1)), min(w, max(x0, x1)), max(0, min(y0, y1)), min(h, max(y0, y1))
    image[y0:y1, x0:x1] = colour


def _line(image: np.ndarray, a: tuple[int, int], b: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """A 3-pixel-wide straight line from a to b, stamped at every pixel step."""
    n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
    for t in np.linspace(0.0, 1.0, n + 1):
        x, y = int(round(a[0] + t * (b[0] - a[0]))), int(round(a[1] + t * (b[1] - a[1])))
        _rect(image, x - 1, y - 1, x + 2, y + 2, colour)


KINDS = ("block", "random", "none", "noise")
DICE_TICKS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def write_study_chart(path: Path, study: dict[str, Any]) -> None:
    """Draw the study's figures and write them atomically as an RGB PNG."""
    image = render_study(study)
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp))


def _done(study: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in study["points"] if r["status"] == "done"]


def render_study(study: dict[str, Any]) -> np.ndarray:
    """The chart as an (H, W, 3) uint8 array."""
    kinds = [k for k in KINDS if any(r["mask"] == k for r in study["points"])]
    kinds += sorted({r["mask"] for r in study["points"]} - set(kinds))
    colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kinds)}
    cell_w = PANEL_W + MARGIN + 24
    height = TOP + PANEL_H + 40 + math.ceil((len(kinds) + 1) / 3) * 22 + 16
    image = np.full((height, 3 * cell_w + 16, 3), WHITE, np.uint8)
    panels = [
        ("probe Dice vs mask ratio", _by_ratio),
        ("best probe Dice per corruption", _probe_bars),
        ("PSNR gain over fill dB", _gain_bars),
    ]
    for i, (title, draw) in enumerate(panels):
        left = 16 + i * cell_w + MARGIN
        draw_text(image, fit(title, PANEL_W, SCALE), left, 12, INK, SCALE)
        draw(image, left, TOP, study, kinds, colour)
    legend = [(colour[k], k) for k in kinds] + [(FILLS["gaussian"], "intensity floor")]
    top = TOP + PANEL_H + 40
    for i, (c, text) in enumerate(legend):
        x, y = 16 + MARGIN + (i % 3) * cell_w, top + (i // 3) * 22
        _rect(image, x, y, x + 14, y + 14, c)
        draw_text(image, fit(text, cell_w - 30, SCALE), x + 22, y, INK, SCALE)
    return image


def _by_ratio(image: np.ndarray, left: int, top: int, study: dict, kinds: list[str], colour: dict) -> None:
    rows = [r for r in _done(study) if r["figures"].get("probe_dice") is not None]
    _axes(image, left, top, 1.0, DICE_TICKS, not rows)
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    xs = {ratio: left + int(PANEL_W * (i + 0.5) / len(ratios)) for i, ratio in enumerate(ratios)}
    for ratio, x in xs.items():
        draw_text(image, f"{ratio:g}", x - text_width(f"{ratio:g}", SCALE) // 2, top + PANEL_H + 8, INK, SCALE)
    for kind in kinds:
        mine = [r for r in rows if r["mask"] == kind]
        if not mine:
            continue
        if all(r["ratio"] is None for r in mine):  # none / noise: no ratio, a flat line at their best Dice
            y = _y(max(r["figures"]["probe_dice"] for r in mine), top, 1.0)
            for x in range(left + 4, left + PANEL_W - 4, 16):  # dashed
                _rect(image, x, y - 1, x + 9, y + 2, colour[kind])
            continue
        best: dict[float, float] = {}
        for r in mine:
            best[r["ratio"]] = max(best.get(r["ratio"], -1.0), r["figures"]["probe_dice"])
        points = [(xs[ratio], _y(best[ratio], top, 1.0)) for ratio in sorted(best)]
        for x, y in points:
            _rect(image, x - 4, y - 4, x + 6, y + 6, colour[kind])
        for a, b in zip(points, points[1:]):
            _line(image, (a[0] + 1, a[1] + 1), (b[0] + 1, b[1] + 1), colour[kind])


def _probe_bars(image: np.ndarray, left: int, top: int, study: dict, kinds: list[str], colour: dict) -> None:
    best = study["ranking"]["best_probe_dice"]
    _axes(image, left, top, 1.0, DICE_TICKS, not best)
    floors = [r["figures"]["probe_floor"] for r in _done(study) if r["figures"].get("probe_floor") is not None]
    bars = [(colour[k], best.get(k)) for k in kinds]
    if floors:
        bars.append((FILLS["gaussian"], max(floors)))
    _bars(image, left, top, 0, PANEL_W, bars, 1.0)


def _gain_bars(image: np.ndarray, left: int, top: int, study: dict, kinds: list[str], colour: dict) -> None:
    """The best PSNR gain per corruption; a negative gain (the fill wins) is drawn at zero with its value."""
    gains: dict[str, float] = {}
    for r in _done(study):
        g = r["figures"].get("psnr_gain")
        if g is not None:
            gains[r["mask"]] = max(gains.get(r["mask"], -math.inf), g)
    y_max = max(2.0, math.ceil(max(gains.values(), default=2.0)))
    _axes(image, left, top, y_max, [y_max * i / 4 for i in range(5)], not gains)
    _bars(image, left, top, 0, PANEL_W, [(colour[k], gains.get(k)) for k in kinds], y_max)
