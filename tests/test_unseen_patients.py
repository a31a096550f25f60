"""What carries a model to a patient it never saw.

Fill context: a fill-residual model pretrained with ``model.fill_context`` learns to correct fills that read the scan
around each crop, and reconstruct then fills from the whole scan, so a window whose edge cuts through a hidden block
fills it from the visible voxels beyond the window. Test-time training (``reconstruct --adapt-steps``): a copy of the
model first learns on the scan's own visible voxels, and never on the voxels it is scored on."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import SAMPLE_DATA, assert_stopped_writing_nothing, stopped_by_sigterm
from ctmae.cli import app
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


def test_a_context_model_below_the_fill_points_to_test_time_training(untrained, tmp_path):
    """A fill-context model that loses to the gaussian fill on a scan (here the untrained one: its own sigma-8 fill)
    gets one note naming --adapt-steps; a model without fill context, which adaptation was not measured to lift,
    gets none."""
    outputs = {}
    for context, checkpoint in untrained.items():
        args = ["reconstruct", str(checkpoint), str(SLAB), "--out", str(tmp_path / str(context)), "--block", "2"]
        result = CliRunner().invoke(app, [*args, "--mask-unit", "16", "--seed", "1", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        margin = json.loads((tmp_path / str(context) / "metrics.json").read_text())["fill"]["masked_minus_fill_db"]
        assert margin < 0
        outputs[context] = " ".join(result.output.split())
    assert f"note: {SLAB}: " in outputs[16] and "--adapt-steps 500 first trains a copy" in outputs[16]
    assert "--adapt-steps" not in outputs[0]


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory) -> Path:
    """A context model after a few steps (test-time training steps at a tenth of its learning rate)."""
    return _pretrain(tmp_path_factory.mktemp("brief"), 16, steps=3, lr=1e-3)


@pytest.fixture(scope="module")
def iso_slab(tmp_path_factory) -> Path:
    """The held-out slab at the models' 1.5 mm, so preprocessing moves no voxel and a hidden voxel of the source is
    a hidden voxel of the model's grid."""
    image = sitk.ReadImage(str(SLAB))
    size = [round(n * s / 1.5) for n, s in zip(image.GetSize(), image.GetSpacing())]
    iso = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        (1.5,) * 3,
        image.GetDirection(),
        -1000.0,
        sitk.sitkInt16,
    )
    path = tmp_path_factory.mktemp("iso") / "slab.nii.gz"
    sitk.WriteImage(iso, str(path))
    return path


def _reconstruct(checkpoint: Path, scan: Path, out: Path, steps: int) -> dict:
    loaded = load_model(checkpoint, "cpu")
    return reconstruct(
        loaded, scan, out, mask_config(loaded, "block", 0.75, 2), seed=4, mask_unit=16, adapt_steps=steps
    )


def test_test_time_training_reads_the_whole_scans_fills_from_the_region_around_each_crop():
    """On a clinical-size scan the adaptation computes each crop's fills over the crop and the fills' reach around
    it, not the whole scan: the maps are the whole scan's, at the crop, whether the region meets the scan's edge or
    not (the fallback fill, for cells beyond every kernel, is the whole scan's mean)."""
    from ctmae.infer.adapt import _scan_fills
    from ctmae.mae.fill_context import cells_to_voxels, coarse_sums, fill_reach
    from ctmae.mae.model import build_model

    cfg = RunConfig.from_dict(
        {"model": {"size": "tiny", "patch": 8, "fill_sigma": 8.0, "fill_queries": True, "fill_context": 8}}
    )
    model, p, c = build_model(cfg.model), 8, cfg.model.img_size
    assert fill_reach(model.fill_sigmas, p) == 64  # sigma 16 voxels, 4 sigmas
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 232, 176, 208, generator=gen)  # (1, X, Y, Z), wider than a crop and twice the reach
    hidden = torch.rand(29, 22, 26, generator=gen) < 0.75  # a mask on the 8-voxel token grid
    visible = cells_to_voxels((~hidden).float(), p)[None, None]  # (1, 1, X, Y, Z)
    sums = coarse_sums(volume[None], visible, p)
    for at in ([96, 72, 88], [0, 0, 0], [232 - c, 176 - c, 208 - c], [8, 64, 80]):
        drawn = torch.rand((c // p) ** 3, generator=gen) < 0.75
        seen = visible.clone()
        box = tuple(slice(a, a + c) for a in at)
        seen[(0, 0, *box)] *= cells_to_voxels((~drawn).float().view((c // p,) * 3), p)
        whole = model.fill_context_maps(volume[None], seen)[
            (slice(None), slice(None), *(slice(a // 4, (a + c) // 4) for a in at))
        ]
        torch.testing.assert_close(_scan_fills(model, volume, visible, sums, at, drawn), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 7 s on 2 idle cores
def test_test_time_training_never_reads_the_voxels_it_is_scored_on(briefly_trained, iso_slab, tmp_path):
    """The same scan with its hidden voxels changed gives the very same reconstruction of them: neither the
    adaptation's inputs, its targets nor its fills read a hidden voxel. And adapting changes the model."""
    first = _reconstruct(briefly_trained, iso_slab, tmp_path / "a", steps=8)
    assert first["adapt_steps"] == 8
    image = nib.load(iso_slab)
    hidden = nib.load(tmp_path / "a" / "mask.nii.gz").get_fdata() > 0
    values = np.asarray(image.dataobj).astype(np.int16)
    soft = hidden & (values > -400) & (values < 400)  # brighter by 37 HU: the body's outline stays where it was
    assert soft.sum() > 10_000
    values[soft] += 37
    changed = tmp_path / "changed.nii.gz"
    nib.save(nib.Nifti1Image(values, image.affine, image.header), changed)
    _reconstruct(briefly_trained, changed, tmp_path / "b", steps=8)
    a, b = (nib.load(tmp_path / d / "reconstruction.nii.gz").get_fdata() for d in ("a", "b"))
    np.testing.assert_allclose(a[hidden], b[hidden], atol=1e-2)
    _reconstruct(briefly_trained, iso_slab, tmp_path / "c", steps=0)
    plain = nib.load(tmp_path / "c" / "reconstruction.nii.gz").get_fdata()
    assert np.abs(plain[hidden] - a[hidden]).max() > 1.0  # HU: the adapted copy predicts otherwise


def test_adapt_steps_show_their_progress_and_a_stop_signal_there_writes_nothing(briefly_trained, tmp_path, monkeypatch):
    args = ["reconstruct", str(briefly_trained), str(SLAB), "--device", "cpu", "--adapt-steps", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "test-time training on the scan" in result.output

    # a cluster's stop at the second step of the adaptation
    result = stopped_by_sigterm(
        monkeypatch, "progress", 2, lambda: CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p")])
    )
    assert_stopped_writing_nothing(result, tmp_path / "p")


def test_adapt_steps_without_hidden_tokens_are_refused_in_one_line(briefly_trained, tmp_path):
    args = ["reconstruct", str(briefly_trained), str(SLAB), "--out", str(tmp_path / "o"), "--adapt-steps", "3"]
    result = CliRunner().invoke(app, [*args, "--mask", "none"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "--adapt-steps 3" in result.output
