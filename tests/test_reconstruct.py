"""``ctmae reconstruct``: outputs on the source grid, mask ratio, visible voxels kept, whole-volume coverage, errors,
metrics that the written files reproduce, and a preview laid out at true aspect with titles and an error scale."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import SAMPLE_DATA, assert_stopped_writing_nothing, stopped_by_sigterm, write_dicom_series, write_volume
from ctmae.cli import app
from ctmae.draw.preview import BACKGROUND, COLUMNS, ERROR_LUT, SEP, TEXT, WINDOW, render_preview
from ctmae.infer.reconstruct import OUTPUTS
from ctmae.io.discovery import find_volumes
from ctmae.io.volume import read_volume
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.config import MaskConfig
from ctmae.mae.fills import SIGMAS
from ctmae.mae.masking import num_masked
from ctmae.mae.model import Decoder, build_model
from ctmae.runtime.checkpoint import save_checkpoint

runner = CliRunner()
LUNG = SAMPLE_DATA / "ct" / "lung1.nii.gz"


def _run(*args: str) -> object:
    return runner.invoke(app, ["reconstruct", *map(str, args)])


def _load(folder: Path, name: str) -> np.ndarray:
    return np.asarray(nib.load(folder / name).dataobj)


@pytest.fixture(scope="module")
def sample_run(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recon") / "lung1"
    result = _run(tiny_checkpoint, LUNG, "--out", out, "--mask-ratio", "0.6", "--seed", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_outputs_have_the_source_geometry(sample_run):
    array, affine = read_volume(find_volumes([LUNG])[0][0])
    for name in OUTPUTS:
        image = nib.load(sample_run / name)
        assert image.shape == array.shape, name
        np.testing.assert_allclose(image.affine, affine, atol=1e-4, err_msg=name)
    assert _load(sample_run, "mask.nii.gz").dtype == np.uint8
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_run / "preview.png")))
    assert png.dtype == np.uint8 and png.ndim == 3 and png.shape[2] == 3 and png.max() > png.min()


def test_metrics_report_the_requested_mask(sample_run):
    metrics = json.loads((sample_run / "metrics.json").read_text(encoding="utf-8"))
    # exact on the token grid of the whole padded volume: round(ratio * L) of the L tokens are hidden
    assert metrics["tokens_masked"] == num_masked(MaskConfig("block", 0.6, 2), metrics["tokens"])
    assert metrics["token_mask_ratio"] == metrics["tokens_masked"] / metrics["tokens"]
    assert metrics["mask"] == {
        "kind": "block",
        "ratio": 0.6,
        "block": 2,
        "noise_std": 0.1,
        "seed": 3,
        "unit_voxels": 16,
    }
    mask = _load(sample_run, "mask.nii.gz").astype(bool)
    assert mask.sum() == metrics["masked"]["voxels"]
    assert metrics["mask_ratio"] == pytest.approx(mask.sum() / metrics["field_of_view_voxels"])
    # on source voxels the share only approximates the token share (padding tokens, resampling); a sanity bound
    assert abs(metrics["mask_ratio"] - 0.6) < 0.1
    assert np.isfinite(metrics["masked"]["mse"]) and np.isfinite(metrics["masked"]["psnr"])
    assert 0 < metrics["ssim"] <= 1
    assert metrics["checkpoint_step"] == 4 and "last.pt" in metrics["title"]


def test_visible_voxels_are_the_input_and_errors_are_finite(sample_run):
    lo, hi = -1000.0, 1000.0
    original = _load(sample_run, "input.nii.gz")
    recon = _load(sample_run, "reconstruction.nii.gz")
    mask = _load(sample_run, "mask.nii.gz").astype(bool)
    array, _ = read_volume(find_volumes([LUNG])[0][0])
    np.testing.assert_array_equal(original, np.clip(array, lo, hi))
    np.testing.assert_array_equal(recon[~mask], original[~mask])
    assert np.isfinite(recon).all() and (recon[mask] >= lo).all() and (recon[mask] <= hi).all()
    np.testing.assert_array_equal(_load(sample_run, "error.nii.gz"), np.abs(recon - original))
    masked = _load(sample_run, "masked.nii.gz")
    assert (masked[mask] == lo).all()
    np.testing.assert_array_equal(masked[~mask], original[~mask])


@pytest.mark.parametrize("kind", ["none", "block"])
def test_whole_volume_is_covered(tiny_checkpoint, tmp_path, monkeypatch, kind):
    """A volume whose preprocessed size (about 70, 50, 75 at 1.5 mm) is no multiple of the 64³ crop, all body.

    The decoder is replaced by a constant 0.25 (-500 HU), so any voxel a window missed would show.
    """
    rng = np.random.default_rng(1)
    scan = write_volume(tmp_path / "odd.nii.gz", rng.integers(-400, 600, size=(70, 50, 45)), spacing=(1.5, 1.5, 2.5))
    monkeypatch.setattr(
        Decoder,
        "forward",
        lambda self, latent, ids_keep, ids_pred: torch.full(
            (latent.shape[0], ids_pred.shape[1], self.head.out_features), 0.25
        ),
    )
    out = tmp_path / "out"
    assert _run(tiny_checkpoint, scan, "--out", out, "--mask", kind).exit_code == 0
    recon, original = _load(out, "reconstruction.nii.gz"), _load(out, "input.nii.gz")
    mask = _load(out, "mask.nii.gz").astype(bool)
    if kind == "none":  # nothing hidden: the model's output everywhere
        assert not mask.any()
        np.testing.assert_allclose(recon, -500.0, atol=1e-2)
    else:
        assert 0 < mask.mean() < 1
        np.testing.assert_allclose(recon[mask], -500.0, atol=1e-2)
        np.testing.assert_array_equal(recon[~mask], original[~mask])


def test_same_seed_repeats_and_another_differs(tiny_checkpoint, tmp_path, ct_array):
    scan = write_volume(tmp_path / "small.nii.gz", ct_array, spacing=(3.0, 3.0, 5.0))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _run(tiny_checkpoint, scan, "--out", tmp_path / name, "--seed", seed, "--mask", "random").exit_code == 0
    assert (tmp_path / "a" / "mask.nii.gz").read_bytes() == (tmp_path / "b" / "mask.nii.gz").read_bytes()
    assert (tmp_path / "a" / "metrics.json").read_text(encoding="utf-8") == (tmp_path / "b" / "metrics.json").read_text(
        encoding="utf-8"
    )
    assert (tmp_path / "a" / "mask.nii.gz").read_bytes() != (tmp_path / "c" / "mask.nii.gz").read_bytes()


def test_dicom_input_leaks_no_patient_tags(tiny_checkpoint, tmp_path, ct_array):
    series = tmp_path / "patient" / "series1"
    write_dicom_series(series, ct_array, patient_name="Doe^Jane", patient_id="PID12345")
    out = tmp_path / "out"
    assert _run(tiny_checkpoint, series, "--out", out, "--mask", "noise").exit_code == 0
    files = sorted(out.iterdir())
    assert {f.name for f in files} == {*OUTPUTS, "preview.png", "metrics.json"}
    for f in files:
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
        for secret in (b"Doe", b"Jane", b"PID12345"):
            assert secret not in data, (f.name, secret)


def test_errors_are_one_line(tiny_checkpoint, tmp_path, ct_array):
    scan = write_volume(tmp_path / "small.nii.gz", ct_array)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "step": 1}, foreign)
    norm_pix = tmp_path / "normpix.pt"
    state = load_checkpoint(tiny_checkpoint)
    cfg = state["config"].replace(model={"norm_pix_loss": True})
    save_checkpoint(
        {**{k: v for k, v in state.items() if k not in ("format", "format_version")}, "config": cfg.to_dict()}, norm_pix
    )
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all" * 20)
    cases = [
        ((tmp_path / "missing.pt", scan), 1, "checkpoint not found"),
        ((foreign, scan), 1, "not a ctmae checkpoint"),
        ((norm_pix, scan), 1, "norm_pix_loss"),
        ((tiny_checkpoint, bad), 1, "bad.nii.gz"),
        ((tiny_checkpoint, tmp_path / "nothing.nii.gz"), 1, "does not exist"),
        ((tiny_checkpoint, scan, "--mask", "holes"), 2, "unknown mask kind"),
        ((tiny_checkpoint, scan, "--mask-ratio", "1.5"), 2, "mask ratio"),
    ]
    for args, code, words in cases:
        result = _run(*args[:2], "--out", tmp_path / "o", *args[2:])
        assert result.exit_code == code, (args, result.output)
        assert words in result.output and "Traceback" not in result.output, result.output


def _assert_metrics_match_the_files(out: Path) -> dict:
    """Every figure of metrics.json but model_on_visible, recomputed from the written NIfTIs."""
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    lo, hi = metrics["hu_window"]
    original = _load(out, "input.nii.gz").astype(np.float64)
    recon = _load(out, "reconstruction.nii.gz").astype(np.float64)
    mask = _load(out, "mask.nii.gz").astype(bool)
    np.testing.assert_allclose(_load(out, "error.nii.gz"), np.abs(recon - original), atol=1e-3)
    assert metrics["voxels"] == mask.size and metrics["field_of_view_voxels"] <= mask.size
    assert metrics["mask_ratio"] == pytest.approx(mask.sum() / metrics["field_of_view_voxels"])
    for name, where in (("masked", mask), ("visible", ~mask)):
        figure = metrics[name]
        assert figure["voxels"] == where.sum(), name
        if not where.any():
            assert figure["mse"] is None and figure["psnr"] is None
            continue
        mse = float(np.mean(((recon[where] - original[where]) / (hi - lo)) ** 2))
        assert figure["mse"] == pytest.approx(mse, rel=1e-5, abs=1e-12), name
        assert figure["psnr"] == (None if mse == 0 else pytest.approx(-10 * math.log10(mse), abs=1e-3)), name
    seen = metrics["model_on_visible"]  # the model's own output on visible voxels: in no file, named for that
    assert seen["voxels"] == metrics["field_of_view_voxels"] - mask.sum() and seen["mse"] > 0
    assert set(metrics["definitions"]) >= {"masked", "visible", "model_on_visible", "mask_ratio"}
    return metrics


def test_metrics_describe_the_written_files(sample_run):
    metrics = _assert_metrics_match_the_files(sample_run)
    # block masking copies visible voxels from the input: the visible error is 0 by construction, and says so
    assert metrics["visible"]["mse"] == 0.0 and metrics["visible"]["psnr"] is None
    assert metrics["masked"]["mse"] > 0 and "copied from the input" in metrics["definitions"]["visible"]


def test_metrics_describe_the_files_when_nothing_is_hidden(tiny_checkpoint, tmp_path, ct_array):
    scan = write_volume(tmp_path / "small.nii.gz", ct_array, spacing=(3.0, 3.0, 5.0))
    assert _run(tiny_checkpoint, scan, "--out", tmp_path / "o", "--mask", "noise").exit_code == 0
    metrics = _assert_metrics_match_the_files(tmp_path / "o")
    assert metrics["masked"]["voxels"] == 0 and metrics["visible"]["mse"] > 0 and metrics["mask_ratio"] == 0
    assert metrics["fill"]["psnr"] is None and metrics["fill"]["masked_minus_fill_db"] is None  # no hole to fill


def test_metrics_carry_the_gaussian_fill_and_the_difference(sample_run):
    metrics = json.loads((sample_run / "metrics.json").read_text(encoding="utf-8"))
    fill, masked = metrics["fill"], metrics["masked"]
    assert fill["sigma_voxels"] in SIGMAS and fill["voxels"] == masked["voxels"]
    assert fill["masked_minus_fill_db"] == pytest.approx(masked["psnr"] - fill["psnr"])
    # the fill is an interpolation of the visible voxels: it beats filling every hole with their mean
    original, hidden = _load(sample_run, "input.nii.gz"), _load(sample_run, "mask.nii.gz") == 1
    lo, hi = metrics["hu_window"]
    scaled = (original - lo) / (hi - lo)
    mean_fill_mse = float(((scaled[hidden] - scaled[~hidden].mean()) ** 2).mean())
    assert fill["mse"] < mean_fill_mse


def _head(shape=(180, 220, 30), value: float | None = None) -> np.ndarray:
    """A head-shaped volume, 180 x 220 x 30 voxels (R-L x A-P x S-I) of 1 x 1 x 5 mm: an ellipsoid of soft tissue
    in air with a brighter skull shell, or a uniform ``value`` filling the whole field."""
    if value is not None:
        return np.full(shape, value, np.float32)
    axes = np.meshgrid(*[np.linspace(-1.1, 1.1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum(a**2 for a in axes))
    return np.where(r < 0.92, 40.0, np.where(r < 1.0, 900.0, -1000.0)).astype(np.float32)


HEAD_AFFINE = np.diag([1.0, 1.0, 5.0, 1.0])


def test_preview_panels_have_true_aspect_and_no_bands_between_views():
    uniform = _head(value=0.0)  # 0 HU everywhere: any pixel of a panel is grey, a band would show as background
    image, layout, _ = render_preview([uniform] * 3 + [uniform * 0], uniform < 0, HEAD_AFFINE, ["title", "line 2"])
    assert image.shape == (layout.height, layout.width, 3)
    (ax_h, ax_w), (co_h, co_w), (sa_h, sa_w) = layout.sizes
    assert ax_h / ax_w == pytest.approx(220 / 180, abs=0.02)  # axial: A-P rows, R-L columns
    assert co_h / co_w == pytest.approx(150 / 180, abs=0.02) and sa_h / sa_w == pytest.approx(150 / 220, abs=0.02)
    assert co_w == ax_w and sa_w == ax_h  # one millimetre is the same number of pixels in every panel
    grey = round((0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 255)
    for c in range(3):
        column = image[layout.top : layout.row_top(2) + sa_h, layout.column_left(c) + layout.cell_w // 2]
        is_grey = (column == grey).all(axis=1)
        assert (column[~is_grey] == BACKGROUND).all()  # nothing but panels and separators
        assert (~is_grey).sum() == 2 * SEP  # exactly one separator between views: each row is as tall as its panels
    title_band = image[: layout.top]
    assert (title_band == TEXT).all(axis=2).sum() > 200 and not (title_band == grey).all(axis=2).any()


@pytest.mark.parametrize(("error_hu", "scale_hu"), [(20.0, 25.0), (300.0, 400.0)])
def test_error_column_is_coloured_on_a_stated_scale_without_saturating(error_hu, scale_hu):
    head = _head()
    hidden = np.zeros(head.shape, bool)
    hidden[60:120, 80:160, 10:20] = True
    error = np.where(hidden, error_hu, 0.0).astype(np.float32)
    image, layout, scale = render_preview([head, head, head + error, error], hidden, HEAD_AFFINE, ["t"])
    assert scale == scale_hu
    h, w = layout.sizes[0]
    left = layout.column_left(len(COLUMNS) - 1) + (layout.cell_w - w) // 2
    panel = image[layout.top : layout.top + h, left : left + w].reshape(-1, 3)
    colours = {tuple(c) for c in panel}
    assert tuple(ERROR_LUT[0]) in colours  # no error: the map's dark end
    assert tuple(ERROR_LUT[round(error_hu / scale_hu * 255)]) in colours  # the error: mid-map, not saturated
    assert not (panel == ERROR_LUT[255]).all(axis=1).any()


@pytest.mark.slow
def test_head_preview_is_what_the_written_files_show(tiny_checkpoint, tmp_path):
    scan = write_volume(tmp_path / "head.nii.gz", _head(), spacing=(1.0, 1.0, 5.0), origin=(0, 0, 0))
    out = tmp_path / "out"
    result = _run(tiny_checkpoint, scan, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "preview.png")))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    volumes = [_load(out, name).astype(np.float32) for name in OUTPUTS[:4]]
    affine = nib.load(out / "input.nii.gz").affine
    title = [
        f"{tiny_checkpoint} (step 4)",
        f"mask block ratio 0.75 block 2 seed 0 | masked PSNR {metrics['masked']['psnr']:.2f} dB, "
        f"SSIM {metrics['ssim']:.3f}, {metrics['fill']['masked_minus_fill_db']:+.2f} dB vs gaussian fill",
    ]
    image, layout, scale = render_preview(volumes, _load(out, "mask.nii.gz").astype(bool), affine, title)
    np.testing.assert_array_equal(png, image)
    assert metrics["preview"] == {"window_hu": list(WINDOW), "error_scale_hu": scale}
    (ax_h, ax_w), (co_h, _), _ = layout.sizes
    assert co_h < 0.75 * ax_h  # the short head gets short coronal and sagittal rows, not bands


@pytest.mark.parametrize("crop, patch, stride", [(32, 16, 32), (64, 16, 48), (96, 16, 64), (32, 8, 24)])
def test_windows_step_on_the_patch_grid(crop, patch, stride):
    from ctmae.infer.sliding import patch_aligned_overlap

    overlap = patch_aligned_overlap(crop, patch)
    assert 0.0 <= overlap < 1.0 and int(crop * (1 - overlap)) == stride  # MONAI's stride formula


def test_mask_unit_hides_the_same_voxels_for_patch_8_and_patch_16(tiny_checkpoint, tmp_path, ct_array):
    """``--mask-unit 16`` draws the mask on 16-voxel cubes from the scan's first voxel: a patch-8 and a patch-16
    checkpoint hide exactly the same voxels for a seed, so their masked PSNRs and fills compare like for like."""
    state = load_checkpoint(tiny_checkpoint)
    cfg = state["config"].replace(model={"patch": 8})
    patch8 = tmp_path / "patch8.pt"
    weights = build_model(cfg.model).state_dict()
    kept = {k: v for k, v in state.items() if k not in ("format", "format_version", "model")}
    save_checkpoint({**kept, "model": weights, "config": cfg.to_dict()}, patch8)
    scan = write_volume(tmp_path / "scan.nii.gz", ct_array, spacing=(1.5, 1.5, 1.5))
    masks, fills = [], []
    for checkpoint in (tiny_checkpoint, patch8):
        out = tmp_path / checkpoint.stem
        result = _run(checkpoint, scan, "--out", out, "--mask-unit", "16", "--seed", "5", "--device", "cpu")
        assert result.exit_code == 0, result.output
        masks.append(_load(out, "mask.nii.gz"))
        fills.append(json.loads((out / "metrics.json").read_text(encoding="utf-8"))["fill"]["psnr"])
    assert masks[0].any() and np.array_equal(masks[0], masks[1])
    assert fills[0] == pytest.approx(fills[1], abs=1e-4)  # the same hidden voxels: the same fill
    refused = _run(tiny_checkpoint, scan, "--out", tmp_path / "x", "--mask-unit", "24", "--device", "cpu")
    assert refused.exit_code == 2 and "--mask-unit 24 must be a multiple of the patch size 16" in refused.output


@pytest.mark.slow  # two reconstructions of the sample scan, one of them from 60 windows: 13 s
def test_window_step_sets_how_densely_windows_overlap(tiny_checkpoint, tmp_path):
    """``--window-step 16`` reconstructs the same hidden voxels of the sample scan (several windows wide) from more
    overlapping windows: the mask is the same, the reconstruction differs, metrics.json records the step; a step off
    the patch grid is refused in one line."""
    scan, runs = LUNG, {}
    for step in (None, "16"):
        out = tmp_path / f"step{step}"
        extra = [] if step is None else ["--window-step", step]
        result = _run(tiny_checkpoint, scan, "--out", out, "--seed", "2", "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        runs[step] = (_load(out, "mask.nii.gz"), _load(out, "reconstruction.nii.gz"), metrics["window_step_voxels"])
    (mask_a, recon_a, step_a), (mask_b, recon_b, step_b) = runs[None], runs["16"]
    assert (step_a, step_b) == (48, 16)  # 3/4 of the 64³ crop by default
    assert np.array_equal(mask_a, mask_b) and mask_a.any()
    assert not np.allclose(recon_a[mask_a == 1], recon_b[mask_b == 1])
    refused = _run(tiny_checkpoint, scan, "--out", tmp_path / "x", "--window-step", "24", "--device", "cpu")
    assert refused.exit_code == 2 and "--window-step 24 must be a multiple of the patch size 16" in refused.output


def _predict_with_window_means(tiny_checkpoint, monkeypatch, volume: torch.Tensor, window_step: int, seen: list):
    """``_predict`` under ``--mask none`` with a model whose every window predicts that window's mean scan voxel
    (``known`` = 1), recording each window's encoder input and known map in ``seen``."""
    from ctmae.infer.reconstruct import _predict, mask_config
    from ctmae.infer.sliding import load_model
    from ctmae.mae.model import MaskedAutoencoder3D

    def window_mean(self, images, ids_keep=None, ids_pred=None, known=None, maps=None):
        seen.append((images.clone(), known.clone()))
        mean = (images * known).sum((1, 2, 3, 4)) / known.sum((1, 2, 3, 4))  # (B,)
        return mean.view(-1, 1, 1, 1, 1).expand_as(images).clone()

    monkeypatch.setattr(MaskedAutoencoder3D, "reconstruct", window_mean)
    loaded = load_model(tiny_checkpoint, "cpu")
    raw, *_ = _predict(loaded, volume, mask_config(loaded, "none", None, None), 0, 2, None, window_step)
    return raw


def test_a_scan_thinner_than_a_crop_is_padded_with_its_edge_not_with_air(tiny_checkpoint, monkeypatch):
    """Training crops lie inside scans, so the model never saw the wall of air that zero padding would put where a
    thin scan (here 40 voxels deep, under the 64³ crop) ends: the padding repeats the edge voxels, and the ``known``
    map still marks it as no scan voxel."""
    volume = torch.full((1, 64, 64, 40), 0.6)  # soft tissue everywhere
    seen: list = []
    _predict_with_window_means(tiny_checkpoint, monkeypatch, volume, 64, seen)
    ((images, known),) = seen  # one 64³ window
    assert known[0, 0, :, :, :40].min() == 1 and known[0, 0, :, :, 40:].max() == 0
    torch.testing.assert_close(images[0, 0, :, :, 40:], torch.full((64, 64, 24), 0.6))


def test_windows_weigh_most_at_their_centre(tiny_checkpoint, monkeypatch):
    """With overlapping windows (step 16 of a 64³ crop), a voxel's prediction favours the windows it lies near the
    centre of (MONAI's gaussian importance map): on a scan brightening along x, where each window predicts its own
    mean, the blend rises within every 16-voxel band that the same windows cover. A plain average would be constant
    there, a step per band."""
    ramp = torch.linspace(0.1, 0.9, 128).view(1, 128, 1, 1).expand(1, 128, 64, 64).contiguous()
    raw = _predict_with_window_means(tiny_checkpoint, monkeypatch, ramp, 16, [])
    profile = raw[:, 32, 32]  # (128,) along x
    bands = profile[16:112].view(6, 16)  # voxels 16..111: the voxels of a band lie in the same windows
    rise = bands[:, -1] - bands[:, 0]
    assert (rise[1:5] > 0.05).all(), bands  # the inner bands, 4 windows each (0.085 measured)
    assert (profile.diff() > -1e-3).all()  # and the blend never falls back across a band edge


# --- scans too small to mask, export folders, stop signals, windows progress -----------------------------------------


def test_a_scan_of_one_mask_cell_is_refused_with_one_line(tiny_checkpoint, tmp_path):
    """A 16x16x5 series (1280 voxels): its body is one 16³ token after resampling, so no ratio hides anything."""
    tissue = np.random.default_rng(0).integers(-100, 200, size=(16, 16, 5)).astype(np.int16)
    tissue[:, :3] = -1000  # air in front of the body
    series = tmp_path / "CT5N"
    write_dicom_series(series, tissue, spacing=(1.0, 1.0, 2.0))
    out = tmp_path / "o"
    result = _run(tiny_checkpoint, series, "--out", out)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"error: {series}: body region is" in text and "1 mask cell(s) of 16³ voxels" in text, text
    assert "too small to hide any at mask ratio" in text and result.output.count("error:") == 1
    assert not out.exists()
    assert _run(tiny_checkpoint, series, "--out", out, "--mask", "none").exit_code == 0  # hides nothing: no refusal


@pytest.mark.parametrize("fmt", ["safetensors", "monai-bundle"])
def test_an_export_folder_is_refused_naming_what_reconstruct_needs(tiny_checkpoint, tmp_path, fmt):
    export = tmp_path / "encoder"
    assert runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(export), "--format", fmt]).exit_code == 0
    result = _run(export, LUNG, "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"{export}: a folder; pass the MAE checkpoint (.pt) written by ctmae pretrain" in text
    assert "holds the encoder alone, without the decoder" in text and len(result.output.strip().splitlines()) == 1


def test_a_stop_signal_between_windows_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """SIGTERM after the first batch of windows: the command stops there, exit code 0, no output half-written."""
    # as a cluster's stop inside the scan, once the first batch of windows is done
    result = stopped_by_sigterm(
        monkeypatch, "windows", 2, lambda: _run(tiny_checkpoint, LUNG, "--out", tmp_path / "o", "--device", "cpu")
    )
    assert_stopped_writing_nothing(result, tmp_path / "o")


def test_progress_shows_the_windows_of_the_scan(tiny_checkpoint, tmp_path):
    result = _run(tiny_checkpoint, LUNG, "--out", tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 0, result.output
    found = re.search(r"windows of the scan\s+\S+\s+(\d+)/(\d+)", result.output)
    assert found and found[1] == found[2] and int(found[1]) > 2, result.output
