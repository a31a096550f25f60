"""Mask one scan, let the MAE fill it in, and write the result on the source scan's grid for a viewer.

One token mask is drawn for the whole (patch-padded) preprocessed volume, not one per window: windows start on the
patch grid, so a voxel is hidden in every window that holds it or in none, and overlapping windows blend
predictions of the same hidden voxels. The decoder predicts every token of a window, so the model's output on
visible voxels can be scored too (``model_on_visible`` in metrics.json); ``reconstruction.nii.gz`` takes hidden
voxels from the model and visible voxels from the input. With a strategy that hides no tokens (``none``, ``noise``)
the reconstruction is the model's output everywhere in the field of view (plain / denoising autoencoder).

metrics.json's ``masked`` and ``visible`` figures are recomputable from the written files: reconstruction vs input
where mask.nii.gz is 1, resp. 0 (so ``visible`` is exactly 0 when visible voxels are copied from the input).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ctmae.draw.preview import WINDOW, write_preview
from ctmae.infer.adapt import adapt
from ctmae.infer.scores import figures as score_figures
from ctmae.infer.scores import fill_score, ssim
from ctmae.infer.sliding import (
    LoadedModel,
    default_window_step,
    pad_to_patches,
    preprocess,
    to_source_grid,
    window_overlap,
    window_tokens,
)
from ctmae.io.checks import InputError, ensure_not_inputs
from ctmae.io.discovery import VolumeSource, find_volumes
from ctmae.io.volume import read_volume, write_nifti
from ctmae.mae.config import MaskConfig
from ctmae.mae.fill_context import cells_to_voxels, pool_factor
from ctmae.mae.fills import best_fill
from ctmae.mae.masking import corrupt, num_masked, sample_mask, strategy
from ctmae.mae.shift import WARN_SCORE, has_reference, no_reference_note, shift_score, shift_warning
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.checkpoint import CheckpointError
from ctmae.runtime.files import atomic_write_text
from ctmae.runtime.signals import check_stop
from ctmae.runtime.windows import OnWindows, watch, window_count

OUTPUTS = ("input.nii.gz", "masked.nii.gz", "reconstruction.nii.gz", "error.nii.gz", "mask.nii.gz")
# What each figure of metrics.json measures, written into it so the file explains itself.
DEFINITIONS = {
    "voxels": "voxels of every output file (the input's grid)",
    "field_of_view_voxels": "voxels the preprocessed volume covers (the body crop); outside it every file copies "
    "the input and nothing is hidden",
    "mask_ratio": "hidden voxels (mask.nii.gz = 1) / field_of_view_voxels",
    "masked": "reconstruction.nii.gz vs input.nii.gz where mask.nii.gz = 1 (= error.nii.gz there)",
    "visible": "reconstruction.nii.gz vs input.nii.gz where mask.nii.gz = 0; 0 when the strategy hides tokens, "
    "because visible voxels are copied from the input (PSNR null: infinite)",
    "model_on_visible": "the model's own prediction of the visible voxels in the field of view vs the input; "
    "not written to any file",
    "ssim": "reconstruction.nii.gz vs input.nii.gz over the whole volume",
    "tokens": "tokens of the preprocessed volume padded to whole mask cells (mask.unit_voxels); tokens_masked of "
    "them hidden",
    "fill": "the baseline a model must beat: a normalised gaussian convolution of the visible voxels (ctmae.mae."
    "fills; sigma_voxels on the preprocessed grid, the best of a few chosen on this scan's hidden voxels) vs "
    "input.nii.gz where mask.nii.gz = 1; masked_minus_fill_db = masked PSNR minus the fill's (> 0: the model "
    "beats interpolation)",
    "window_step_voxels": "voxels between the overlapping windows the scan is reconstructed in; each window's "
    "prediction counts in proportion to the share of its tokens that are visible, and within it by a gaussian "
    "centred on the window",
    "adapt_steps": "test-time training steps on this scan's visible voxels before it was reconstructed (ctmae.infer."
    "adapt; 0: the checkpoint's model as it is)",
    "shift": "shift_score: how far the mean encoder feature of fixed seeded crops of this scan lies from the training "
    "scans' (squared Mahalanobis distance), over the same distance of a training scan left out of the statistics: "
    "about 1 or below for scans like the training scans, a warning above threshold (ctmae.mae.shift); null when the "
    "checkpoint stores no reference of this kind (note says so)",
}


def mask_config(loaded: LoadedModel, kind: str | None, ratio: float | None, block: int | None) -> MaskConfig:
    """The checkpoint's mask settings with the given options replacing them; ValueError for bad values."""
    given = {k: v for k, v in dict(kind=kind, ratio=ratio, block=block).items() if v is not None}
    return loaded.cfg.replace(mask=given).mask


def reconstruct(
    loaded: LoadedModel,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    mask: MaskConfig,
    seed: int = 0,
    batch_size: int = 2,
    checkpoint_name: str = "",
    mask_unit: int | None = None,
    window_step: int | None = None,
    on_windows: OnWindows | None = None,
    adapt_steps: int = 0,
    on_adapt: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Mask, reconstruct and write one scan's outputs (NIfTI, preview.png, metrics.json) into ``out_dir``.

    Args:
        loaded: the checkpoint's model (``ctmae.infer.sliding.load_model``).
        input_path: one image file, DICOM series folder or multi-frame DICOM file.
        out_dir: created if missing; the files in ``OUTPUTS`` plus preview.png and metrics.json are replaced.
        mask: mask kind, ratio and block edge (``mask_config``).
        seed: seeds the token mask and the noise, so a run repeats exactly.
        batch_size: windows per forward pass.
        checkpoint_name: how metrics.json and the preview title name the checkpoint.
        mask_unit: draw the mask on cells of this many voxels, a multiple of the patch (None: the patch), so that
            checkpoints of different patch sizes can be scored on the very same hidden voxels.
        window_step: voxels between overlapping windows, a multiple of the patch up to the crop (None: about 3/4 of
            a crop, ``default_window_step``).
        on_windows: called after each batch of sliding windows with (windows done, windows of the scan).
        adapt_steps: train a copy of the model this many steps on the scan's visible voxels first
            (``ctmae.infer.adapt``); 0: the checkpoint's model as it is.
        on_adapt: called after each of those steps with (steps done, adapt_steps).

    Returns:
        The metrics written to metrics.json.

    Raises:
        InputError: the input is unreadable, holds no / several volumes, or its body region is one mask cell, so
            the ratio hides nothing.
        Stopped: a stop signal came before the outputs were written (checked between windows); nothing is written.
        CheckpointError: the checkpoint was trained with ``norm_pix_loss`` (see ``_refuse_norm_pix``).
    """
    cfg = loaded.cfg
    _refuse_norm_pix(loaded, checkpoint_name)
    if mask_unit is not None and (mask_unit < 1 or mask_unit % cfg.model.patch):
        raise ValueError(f"mask unit {mask_unit} must be a multiple of the checkpoint's patch size {cfg.model.patch}")
    if window_step is not None and not (0 < window_step <= cfg.model.img_size and window_step % cfg.model.patch == 0):
        raise ValueError(f"window step {window_step} must be a multiple of the patch size, at most the crop")
    source = _one_volume(input_path)
    ensure_not_inputs([Path(out_dir) / name for name in (*OUTPUTS, "preview.png", "metrics.json")], source.files)
    transform = preprocess_transforms(cfg.preprocess, pad=False)  # _predict pads at the far end only
    image = preprocess(source, transform)  # (1, X, Y, Z) in 0..1, RAS, cropped to the body
    array, affine = read_volume(source)  # (X0, Y0, Z0) HU, the geometry every output keeps
    lo, hi = cfg.preprocess.hu_window

    kind = strategy(mask)
    _refuse_one_cell(source, image.shape[1:], mask, mask_unit or cfg.model.patch)
    raw, hidden, encoder_view, tokens_hidden = _predict(
        loaded, image.as_tensor(), mask, seed, batch_size, mask_unit, window_step, on_windows, adapt_steps, on_adapt
    )
    check_stop()  # before the fill, the scores and the outputs (seconds on a large scan), which are then written whole
    # the baseline: the best gaussian fill of the same hidden voxels from the visible ones (none without a hole)
    fill, sigma = best_fill(image.as_tensor()[None].float(), hidden[None, None]) if kind.hides_tokens else (raw, None)
    channels = torch.stack([raw, hidden, encoder_view, fill.reshape(raw.shape), torch.ones_like(raw)])
    back = to_source_grid(channels, image, transform)
    cover = back[4]
    # Linear resampling mixes the zeros of the cropped-away region into border voxels; dividing by the covered
    # share undoes that, and voxels mostly outside the crop keep the input.
    inside = cover >= 0.5
    raw, hidden, encoder_view, fill = (back[:4] / np.maximum(cover, 1e-6)).astype(np.float32)
    hidden = inside & (hidden >= 0.5)
    predicted = hidden if kind.hides_tokens else inside

    original = np.clip(array, lo, hi)  # what the model sees, in HU
    model_hu = np.clip(raw, 0.0, 1.0) * (hi - lo) + lo
    recon = np.where(predicted, model_hu, original).astype(np.float32)
    shown = np.where(inside, encoder_view, 0.0) * (hi - lo) + lo if kind.corrupt is not None else original
    masked = np.where(hidden, lo, shown).astype(np.float32)
    error = np.abs(recon - original)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, volume in zip(OUTPUTS, (original, masked, recon, error, hidden.astype(np.uint8))):
        write_nifti(volume, affine, out / name)
    figures = score_figures(recon, original, model_hu, hidden, inside, (lo, hi))
    metrics = {
        "title": f"{checkpoint_name or 'checkpoint'} (step {loaded.step}) | {_mask_words(mask, seed)}",
        "checkpoint": checkpoint_name,
        "checkpoint_step": loaded.step,
        "input": source.id,
        "mask": {
            "kind": mask.kind,
            "ratio": mask.ratio,
            "block": mask.block,
            "noise_std": mask.noise_std,
            "seed": seed,
            "unit_voxels": mask_unit or cfg.model.patch,
        },
        "window_step_voxels": window_step or default_window_step(cfg.model.img_size, cfg.model.patch),
        "adapt_steps": adapt_steps,
        **figures,
        "fill": fill_score(fill, sigma, original, hidden, (lo, hi), figures["masked"]["psnr"]),
        "tokens": int(tokens_hidden.numel()),  # over the preprocessed volume padded to whole mask cells
        "tokens_masked": int(tokens_hidden.sum()),
        "token_mask_ratio": int(tokens_hidden.sum()) / tokens_hidden.numel(),
        "ssim": ssim(recon, original, lo, hi, loaded.device),
        "shift": _shift(loaded, image.as_tensor(), source.label, checkpoint_name),
    }
    versus = metrics["fill"]["masked_minus_fill_db"]
    title = [
        f"{checkpoint_name or 'checkpoint'} (step {loaded.step})",
        f"{_mask_words(mask, seed)} | masked PSNR {_db(metrics['masked']['psnr'])}, SSIM {metrics['ssim']:.3f}"
        + ("" if versus is None else f", {versus:+.2f} dB vs gaussian fill"),
    ]
    scale = write_preview(out / "preview.png", [original, masked, recon, error], hidden, affine, title)
    metrics["preview"] = {"window_hu": list(WINDOW), "error_scale_hu": scale}
    metrics["definitions"] = DEFINITIONS
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _shift(loaded: LoadedModel, image: torch.Tensor, name: str, checkpoint: str) -> dict[str, Any]:
    """The shift score of the preprocessed scan (1, X, Y, Z) with its warning; a note instead when the checkpoint
    stores no reference."""
    if not has_reference(loaded.shift_reference):
        note = no_reference_note(checkpoint or "the checkpoint")
        return {"shift_score": None, "threshold": WARN_SCORE, "warning": None, "note": note}
    score = shift_score(loaded.model, image[0], loaded.shift_reference)
    return {"shift_score": score, "threshold": WARN_SCORE, "warning": shift_warning(name, score), "note": None}


def _mask_words(mask: MaskConfig, seed: int) -> str:
    return f"mask {mask.kind} ratio {mask.ratio:g} block {mask.block} seed {seed}"


def _db(psnr: float | None) -> str:
    return "n/a" if psnr is None else f"{psnr:.2f} dB"


def _refuse_norm_pix(loaded: LoadedModel, name: str) -> None:
    """Refuse ``norm_pix_loss`` checkpoints: they predict each patch normalised by its own mean and std, which for a
    hidden patch are exactly what the model was not shown, so no honest voxel values can be recovered."""
    if loaded.cfg.model.norm_pix_loss:
        raise CheckpointError(
            f"{name or 'checkpoint'}: trained with norm_pix_loss (per-patch normalised targets); "
            "its predictions have no HU scale, so reconstruct cannot show them"
        )


def _refuse_one_cell(source: VolumeSource, size: Sequence[int], mask: MaskConfig, unit: int) -> None:
    """InputError when the body region is too small for the mask ratio to hide a single cell of ``unit``³ voxels:
    its figures (mask ratio 0, SSIM 1) would say nothing."""
    cells = math.prod(-(-n // unit) for n in size)
    if strategy(mask).hides_tokens and num_masked(mask, cells) == 0:
        raise InputError(
            f"{source.label}: body region is {'x'.join(map(str, size))} voxels after resampling, {cells} mask cell(s) "
            f"of {unit}³ voxels: too small to hide any at mask ratio {mask.ratio:g}"
        )


def _one_volume(input_path: str | os.PathLike) -> VolumeSource:
    sources, problems = find_volumes([input_path])
    if not sources:
        raise InputError(problems[0] if problems else f"{input_path}: no volume found")
    if len(sources) > 1:
        raise InputError(f"{input_path}: holds {len(sources)} volumes; reconstruct takes one file or series folder")
    return sources[0]


@torch.inference_mode()
def _predict(
    loaded: LoadedModel,
    volume: torch.Tensor,
    mask_cfg: MaskConfig,
    seed: int,
    batch_size: int,
    mask_unit: int | None,
    window_step: int | None,
    on_windows: OnWindows | None = None,
    adapt_steps: int = 0,
    on_adapt: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model output, hidden-voxel map and encoder input on the preprocessed grid, plus the token mask ratio.

    Args:
        volume: (1, X, Y, Z) preprocessed, 0..1.
        mask_unit: edge in voxels of the cells the mask is drawn on (a multiple of the patch); None: the patch.
        window_step: voxels between windows (a multiple of the patch); None: ``default_window_step``.
        adapt_steps: test-time training steps on the scan's visible voxels (``reconstruct``).

    Returns:
        (raw prediction, hidden 0/1, encoder input with hidden voxels at 0), each (X, Y, Z) on the CPU, and the
        token mask over whole cells (tokens of cells (ux, uy, uz)) bool, hiding ``masking.num_masked(mask_cfg, C)``
        of the C cells.
    """
    model, device, p, crop = loaded.model, loaded.device, loaded.cfg.model.patch, loaded.cfg.model.img_size
    unit = mask_unit or p
    size = volume.shape[1:]
    # Cells tile the scan from its first voxel, so the mask does not depend on the crop size; the volume is padded
    # at its far end to whole cells and to at least one crop.
    # The padding repeats the scan's edge voxels: training crops lie inside scans, so the model never saw the wall
    # of air that zeros would put at a thin scan's end (the held-out demo slab, 51 voxels deep, is padded to 64);
    # +0.10 dB under block masks and +0.26 under random masks there (the demo recipe, mean of 3 training seeds).
    # The ``known`` map keeps the padding out of the model's own fill either way.
    padded = pad_to_patches(volume, unit, minimum=crop, mode="replicate").to(device)  # (1, Xp, Yp, Zp)
    known = pad_to_patches(torch.ones_like(volume), unit, minimum=crop).to(device)  # 0 on the padding
    cells = tuple(-(-n // unit) for n in size)
    gen = torch.Generator(device).manual_seed(seed)
    hidden = sample_mask(mask_cfg, 1, cells, gen, device).mask.view(cells)  # (ux, uy, uz) bool
    hidden = cells_to_voxels(hidden, unit // p)  # -> the tokens of hidden cells
    in_cells = hidden
    pads = [q for n, g in zip(reversed(padded.shape[1:]), reversed(hidden.shape)) for q in (0, n // p - g)]
    hidden = torch.nn.functional.pad(hidden, pads)  # (gx, gy, gz): padding beyond the cells is visible air
    encoder_input = corrupt(padded[None], mask_cfg, gen)  # (1, 1, Xp, Yp, Zp)
    if adapt_steps:
        model = adapt(loaded, padded, known, hidden, adapt_steps, seed, on_adapt)
    # A model pretrained with fill context corrects fills of the whole scan, so a window whose edge cuts through a
    # hidden block still fills it from the visible voxels beyond; other models fill from each window, as they learned.
    maps, f = None, pool_factor(p)
    if model.cfg.fill_context:
        seen = cells_to_voxels((~hidden).float(), p) * known  # (1, Xp, Yp, Zp)
        maps = model.fill_context_maps(encoder_input, seen[None])  # (1, 2S, Xp/f, Yp/f, Zp/f)

    def predictor(windows: torch.Tensor, slices: list[list[slice]]) -> torch.Tensor:
        """(B, 3, c, c, c) [clean, encoder input, scan voxels] -> (B, 3, c, c, c) [prediction of every voxel times
        the window's weight, the weight, the prediction]."""
        keep = torch.stack([~hidden[window_tokens(s, p)].flatten() for s in slices])  # (B, L)
        out = torch.empty_like(windows[:, :1])
        # windows hide different numbers of tokens; the encoder takes a batch only of equal counts
        for count in keep.sum(1).unique().tolist():
            rows = (keep.sum(1) == count).nonzero().flatten()
            ids_keep = keep[rows].nonzero()[:, 1].view(len(rows), count)  # (b, Lv), sorted
            # every token predicted: (b, 1, c, c, c); the padding beyond the scan's edge is no voxel to fill from
            context = (
                None
                if maps is None
                else torch.stack([maps[0][(slice(None), *_coarse(slices[r], f))] for r in rows.tolist()])
            )  # (b, 2S, c/f, c/f, c/f)
            out[rows] = model.reconstruct(windows[rows, 1:2], ids_keep, known=windows[rows, 2:], maps=context)
        weight = keep.float().mean(1).view(-1, 1, 1, 1, 1).expand_as(out)  # (B, 1, c, c, c): share of visible tokens
        return torch.cat([out * weight, weight, out], dim=1)

    # A window's prediction counts in proportion to the share of its tokens that are visible: one whose tokens are
    # all hidden has no context at all, and is not averaged in where a window with context covers the voxel (+0.04
    # dB for the demo's recipe on the held-out slab). Voxels that only such windows cover keep their plain average.
    # Within a window, MONAI's gaussian importance map (sigma 1/8 of the crop) favours voxels near its centre, which
    # have context on every side: +0.12 dB (block) and +0.15 (random) for the demo's recipe at window step 16,
    # +0.10 / +0.01 at the default step.
    overlap = window_overlap(crop, window_step or default_window_step(crop, p))
    watched = watch(predictor, window_count(padded.shape[1:], (crop,) * 3, overlap), on_windows)  # stops, counts
    blend = sliding_window_inference(
        torch.cat([padded[None], encoder_input, known[None]], dim=1),
        (crop,) * 3,
        batch_size,
        watched,
        overlap=overlap,
        mode="gaussian",
        with_coord=True,
    )[0]  # (3, Xp, Yp, Zp)
    raw = torch.where(blend[1] > 0, blend[0] / blend[1].clamp_min(1e-12), blend[2])
    hidden_voxels = cells_to_voxels(hidden.float(), p)  # (gx, gy, gz) -> (Xp, Yp, Zp)
    view = encoder_input[0, 0] * (1 - hidden_voxels)
    crop_back = (slice(0, size[0]), slice(0, size[1]), slice(0, size[2]))
    return raw[crop_back].cpu(), hidden_voxels[crop_back].cpu(), view[crop_back].cpu(), in_cells.cpu()


def _coarse(slices: list[slice], f: int) -> tuple[slice, slice, slice]:
    """A window's slices on the fill maps' grid, ``f`` times coarser, from MONAI's voxel slices [batch, channel,
    x, y, z] (windows start on the patch grid, a multiple of ``f``)."""
    return tuple(slice(s.start // f, s.stop // f) for s in slices[2:])
