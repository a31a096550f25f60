"""report.png's probe panel: every bar visible (a zero too), named below the axis, its value above it."""

from __future__ import annotations

import numpy as np

from ctmae.draw.charts import INK, MARGIN, PALETTE, PANEL_H, PANEL_W, TOP, render_report


def report(dice: list[float]) -> dict:
    subjects = [{"slug": f"s{i}", "label": f"encoder {i}"} for i in range(len(dice))]
    return {
        "subjects": subjects,
        "settings": {"shots": [1]},
        "fewshot": {},
        "recon": {},
        "probe": {s["slug"]: {"dice": d} for s, d in zip(subjects, dice)},
    }


def probe_panel(image: np.ndarray) -> np.ndarray:
    left = 16 + (PANEL_W + MARGIN + 24) + MARGIN  # the middle panel
    return image[:, left : left + PANEL_W]


def test_a_zero_dice_bar_is_visible_and_every_bar_is_named():
    panel = probe_panel(render_report(report([0.0, 0.5])))
    baseline = panel[TOP + PANEL_H - 2]  # the row just above the x axis
    for colour in PALETTE[:2]:
        assert (baseline == colour).all(axis=1).any(), colour  # both bars reach the axis, the zero one included
    below = panel[TOP + PANEL_H + 6 : TOP + PANEL_H + 20]
    halves = below[:, : PANEL_W // 2], below[:, PANEL_W // 2 :]
    assert all((half == INK).all(axis=2).any() for half in halves)  # a name under each bar
