"""study.png: probe Dice against mask ratio, one line per corruption, and bars of the best probe Dice per corruption
beside the raw-intensity floor and the PSNR gain over the best fill. Drawn with the helpers of
``ctmae.apps.evaluate.chart`` and the bitmap font of ``ctmae.apps.glyphs``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctmae.apps.evaluate.chart import (  # the evaluate chart's drawing helpers (see the report: make them public)
    FILLS,
    INK,
    MARGIN,
    PALETTE,
    PANEL_H,
    PANEL_W,
    SCALE,
    TOP,
    WHITE,
    _axes,
    _bars,
    _line,
    _rect,
    _y,
)
from ctmae.apps.glyphs import draw_text, fit, text_width
from ctmae.runtime.files import atomic_path

KINDS = ("block", "random", "none", "noise")
DICE_TICKS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def write_chart(path: Path, study: dict[str, Any]) -> None:
    """Draw the study's figures and write them atomically as an RGB PNG."""
    image = render(study)
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp))


def _done(study: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in study["points"] if r["status"] == "done"]


def render(study: dict[str, Any]) -> np.ndarray:
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
