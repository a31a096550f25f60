"""Does pretraining learn structure a fill cannot guess? A tiny model pretrained on volumes of tubes must beat the
best gaussian fill of the visible voxels on a tube volume it never saw, under block masks, as ``ctmae reconstruct``
reports it in metrics.json.

Straight tubes run through each volume along all three axes at random places. A block mask hides cubes of 16 voxels;
a tube that crosses a hidden cube enters and leaves it through visible voxels, so its course inside is fixed by
context, which a gaussian fill only smears. The fill is still a strong baseline here (most hidden voxels are plain
tissue, and a 1-voxel fill wins): the trained model beats it by a small margin, and the untrained one is far below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_volume
from ctmae.cli import app

runner = CliRunner()
ISO = (1.5, 1.5, 1.5)
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def tubes(seed: int, size: int = 64, count: int = 10, radius: float = 2.5) -> np.ndarray:
    """(size³) int16 HU: soft tissue (40 HU, noise 10) crossed by ``count`` straight +400 HU tubes, each along a
    random axis at a random place."""
    rng = np.random.default_rng(seed)
    image = 40.0 + rng.normal(0.0, 10.0, (size,) * 3)
    grid = np.arange(size)
    for _ in range(count):
        axis = int(rng.integers(3))
        a, b = rng.uniform(radius, size - radius, 2)
        u, v = np.meshgrid(grid, grid, indexing="ij")
        disc = (u - a) ** 2 + (v - b) ** 2 <= radius**2  # cross-section in the two other axes
        image[np.expand_dims(disc, axis).repeat(size, axis)] = 400.0
    return image.astype(np.int16)


@pytest.mark.slow
def test_pretrained_tiny_model_beats_the_fill_on_a_held_out_tube_volume(tmp_path: Path):
    for i in range(4):
        write_volume(tmp_path / "train" / f"tubes{i}.nii.gz", tubes(i), spacing=ISO, direction=IDENTITY)
    held_out = write_volume(tmp_path / "tubes_held_out.nii.gz", tubes(99), spacing=ISO, direction=IDENTITY)
    args = ["--model", "tiny", "--patch", "8", "--crop", "32", "--block", "2", "--predict-ratio", "0.75"]
    args += ["--steps", "1500", "--batch-size", "8", "--lr", "2e-3", "--workers", "0", "--device", "cpu"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    run = runner.invoke(app, ["pretrain", str(tmp_path / "train"), "--out", str(tmp_path / "run"), *args])
    assert run.exit_code == 0, run.output
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    out = tmp_path / "recon"
    result = runner.invoke(app, ["reconstruct", str(checkpoint), str(held_out), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    fill = metrics["fill"]
    assert "gaussian fill" in result.output
    # Measured on this 2-core CPU: +0.06 dB after 400 steps, +0.10 dB after 1500 (the issue asked for +0.5 dB on
    # real CT; BENCHMARKS.md records how far every recipe is from that). The margin is small but the run is seeded
    # and deterministic on the CPU, and an untrained model is far below the fill (next assertion).
    assert fill["masked_minus_fill_db"] > 0.0, (metrics["masked"]["psnr"], fill["psnr"], fill["sigma_voxels"])
    untrained = tmp_path / "untrained"
    args[args.index("--steps") + 1] = "1"
    assert runner.invoke(app, ["pretrain", str(tmp_path / "train"), "--out", str(untrained)] + args).exit_code == 0
    out = tmp_path / "recon_untrained"
    checkpoint = untrained / "checkpoints" / "last.pt"
    recon = runner.invoke(app, ["reconstruct", str(checkpoint), str(held_out), "--out", str(out), "--device", "cpu"])
    assert recon.exit_code == 0, recon.output
    before = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["fill"]["masked_minus_fill_db"]
    assert before < fill["masked_minus_fill_db"] - 3.0  # pretraining, not the architecture, closes the gap
