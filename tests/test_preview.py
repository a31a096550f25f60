"""Preview titles keep every word: long lines wrap instead of losing their start (the mask kind)."""

from __future__ import annotations

import numpy as np

from ctmae.draw.glyphs import text_width, wrap
from ctmae.draw.preview import render_preview

TITLE = [
    "/a/very/long/folder/of/runs/exp-with-a-long-name/checkpoints/step_0001400.pt (step 1400)",
    "block mask, 75% hidden in blocks of 2 patches, seed 0 | masked PSNR 15.80 dB, SSIM 0.512, +0.73 dB vs fill",
]


def test_wrap_keeps_every_word_within_the_width():
    lines = wrap(TITLE[1], 300, 2)
    assert " ".join(lines) == TITLE[1]  # nothing dropped: the mask kind comes first and stays
    assert all(text_width(line, 2) <= 300 for line in lines) and len(lines) > 1
    path = wrap(TITLE[0], 300, 2)[0]
    assert path.startswith("...") and path.endswith("step_0001400.pt")  # a path too long for a line keeps its file


def test_a_long_title_makes_the_preview_taller_not_cut():
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 100, (24, 24, 24)).astype(np.float32)
    volumes, hidden = [volume] * 4, np.zeros(volume.shape, bool)
    short, short_layout, _ = render_preview(volumes, hidden, np.eye(4), ["run"])
    long, long_layout, _ = render_preview(volumes, hidden, np.eye(4), TITLE)
    assert (
        long.shape[1] == short.shape[1]
        and long.shape[0] > short.shape[0] + 2 * (long_layout.top - short_layout.top) // 3
    )
    assert long_layout.top > short_layout.top
