"""Fill context: a fill-residual model pretrained with ``model.fill_context`` learns to correct fills that read the
scan around each crop, and reconstruct then fills from the whole scan, so a window whose edge cuts through a hidden
block fills it from the visible voxels beyond the window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_DATA
from ctmae.infer.reconstruct import mask_config, reconstruct
from ctmae.infer.sliding import load_model
from ctmae.io.discovery import find_volumes
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import RunConfig
from ctmae.mae.train import pretrain
from ctmae.preprocess.build_cache import build_cache

SLAB = SAMPLE_DATA / "demo" / "heldout" / "lung1_upper.nii.gz"


def _pretrain(root: Path, context: int, steps: int, lr: float) -> Path:
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 8, "fill_sigma": 8.0, "fill_queries": True, "fill_context": context},
            "preprocess": {"crop": 32, "cache_dir": str(root / "cache")},
            "data": {"workers": 0, "zoom": 0.25, "contrast": 0.25},
            "train": {"steps": steps, "batch_size": 4, "lr": lr, "log_every": 1},
        }
    )
    sources, _ = find_volumes([str(SAMPLE_DATA / "demo" / "pretrain")])
    good, problems = build_cache(sources, cfg.preprocess)
    assert good and not problems, problems
    pretrain(cfg, good, root / f"run{context}")
    return root / f"run{context}" / "checkpoints" / "last.pt"


def test_pretraining_with_fill_context_trains_and_records_it(tmp_path):
    checkpoint = _pretrain(tmp_path, 16, steps=6, lr=1e-3)
    state = load_checkpoint(checkpoint)
    assert state["config"].model.fill_context == 16
    rows = (checkpoint.parents[1] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    losses = [json.loads(row)["loss"] for row in rows]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> dict[int, Path]:
    """Two fill-residual models before learning (the residual starts at zero: each is its own fill), without and
    with fill context."""
    root = tmp_path_factory.mktemp("fills")
    return {context: _pretrain(root, context, steps=1, lr=1e-12) for context in (0, 16)}


def test_a_model_pretrained_with_context_fills_hidden_blocks_from_the_whole_scan(untrained, tmp_path):
    """48 mm blocks in 48 mm windows: most windows hold no visible voxel near a hidden block's far side. The window
    model's fill stops at the window's edge; the context model's reaches across it, and scores as the gaussian fill
    of the whole scan does."""
    scores = {}
    for context, checkpoint in untrained.items():
        loaded = load_model(checkpoint, "cpu")
        mask = mask_config(loaded, "block", 0.75, 2)  # 2 cells of 16 voxels: 48 mm at 1.5 mm
        scores[context] = reconstruct(loaded, SLAB, tmp_path / str(context), mask, seed=1, mask_unit=16)
    window, whole = scores[0]["masked"]["psnr"], scores[16]["masked"]["psnr"]
    assert whole > window + 0.5, (window, whole)
    assert abs(scores[16]["fill"]["masked_minus_fill_db"]) < 0.5, scores[16]["fill"]
