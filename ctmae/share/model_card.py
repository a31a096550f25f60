"""The ``README.md`` model card of an exported encoder, generated from its ``config.json`` content alone."""

from __future__ import annotations

import json
from typing import Any


def model_card(config: dict[str, Any], layout: str) -> str:
    """Markdown: what the encoder is, how to load it, its preprocessing, training and any evaluation figures.

    Args:
        config: the export's config.json content (``ctmae.share.describe.describe_checkpoint``).
        layout: ``safetensors`` or ``monai-bundle``: which loading instructions to give.
    """
    arch, pre, train = config["architecture"], config["preprocessing"], config["training"]
    grid = "x".join(str(s // p) for s, p in zip(arch["img_size"], arch["patch_size"]))
    lines = [
        "# CT encoder pretrained with ctmae",
        "",
        f"A 3D vision transformer (MONAI `ViT`, {arch['num_layers']} blocks, width {arch['hidden_size']}, "
        f"{arch['num_heads']} heads, {_n(arch['patch_size'])} patches) pretrained as the encoder of ctmae's masked "
        f"autoencoder on CT scans in Hounsfield units. It maps a {_n(arch['img_size'])}-voxel crop to "
        f"{grid} = {_tokens(arch)} token features of width {arch['hidden_size']} (no CLS token).",
        "",
        "## Load it",
        "",
        *_loading(layout),
        "",
        f"Position embedding: {config['position_embedding']}.",
        "",
        "## Preprocessing (the encoder's input contract)",
        "",
        f"1. Orientation {pre['orientation']}.",
        f"2. Resampling to {_mm(pre['spacing'])} mm ({pre['interpolation']}, float32).",
        f"3. HU window {pre['hu_window'][0]:g}..{pre['hu_window'][1]:g} scaled linearly to "
        f"{pre['scaled_to'][0]:g}..{pre['scaled_to'][1]:g}, clipped.",
        f"4. Crop to the body: voxels above {pre['body_threshold_hu']:g} HU ({pre['body_threshold']:.4g} after "
        f"scaling) bound the foreground box.",
        f"5. Padding with {pre['pad_value']:g} to at least {pre['crop']}³; windows of {pre['crop']}³ cover the "
        f"volume (ctmae pads the far end of each axis to whole patches and slides windows along the patch grid).",
        "",
        "Inputs must be CT in HU: ctmae warns about MR-like value ranges, images already scaled to 0..1 or 0..255, a "
        "DICOM modality other than CT, and voxel spacings over 4x coarser or finer than the training spacing.",
        "",
        "## Training",
        "",
        *_training(train),
        *_evaluation(config.get("evaluation")),
        "## Weights",
        "",
        f"- `{config['weights']['file']}`: {config['weights']['tensors']} tensors, "
        f"{config['weights']['parameters']:,} values, {config['weights']['dtype']}.",
        f"- SHA-256 of the tensors ({config['weights']['sha256_of']}): `{config['weights']['sha256']}`.",
        "- MONAI's `norm_cross_attn` layers (unused without cross-attention) hold their initial values.",
        "",
        "No DICOM tag and no path but the checkpoint's file name is stored in this export.",
        "",
    ]
    return "\n".join(lines)


def _loading(layout: str) -> list[str]:
    if layout == "monai-bundle":
        return [
            "With MONAI alone (no ctmae needed):",
            "",
            "```python",
            "from monai.bundle import ConfigParser",
            "",
            "parser = ConfigParser()",
            'parser.read_config("configs/inference.json")',
            'parser["bundle_root"] = "."',
            'vit = parser.get_parsed_content("network")  # ViT with models/model.pt loaded, eval mode',
            'preprocess = parser.get_parsed_content("preprocessing")',
            "```",
            "",
            "Token features of one scan, saved as a (D, gx, gy, gz) `.npy`:",
            "",
            "```bash",
            "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
            "    --bundle_root . --input_image scan.nii.gz --output_path tokens.npy",
            "```",
            "",
            "With ctmae: `ctmae.load_encoder(DIR)` (MONAI ViT) or `ctmae.load_unetr(DIR, num_classes)` (MONAI UNETR).",
            "",
            "MONAI's `LoadImaged` reads the scan (NibabelReader for NIfTI; DICOM series need ITK or pydicom); ctmae's "
            "own reader is SimpleITK. The transforms after reading are the same as ctmae's.",
        ]
    return [
        "```python",
        "import json",
        "from monai.networks.nets import ViT",
        "from safetensors.torch import load_file",
        "",
        'config = json.load(open("config.json"))',
        'vit = ViT(**config["architecture"])',
        'vit.load_state_dict(load_file("encoder.safetensors"))',
        "tokens, hidden_states = vit(crop)  # crop (B, 1, D, H, W) preprocessed as below -> tokens (B, L, width)",
        "```",
        "",
        "With ctmae: `ctmae.load_encoder(DIR)` (MONAI ViT, weights and shapes checked against config.json) or "
        "`ctmae.load_unetr(DIR, num_classes)` (MONAI UNETR whose ViT holds these weights).",
    ]


def _training(train: dict[str, Any]) -> list[str]:
    mask = train["mask"]
    mask_text = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in mask.items())
    rows = [
        ("Checkpoint", f"`{train['checkpoint']}` at step {train['step']} of {train['total_steps']}"),
        ("Model preset", train["model_size"]),
        ("Scans", train["scans"] if train.get("scans") is not None else "not recorded in the checkpoint"),
        ("Masking", mask_text),
        ("Batch, learning rate, seed", f"{train['batch_size']}, {train['lr']:g}, {train['seed']}"),
        ("Final loss", _final_loss(train)),
        ("Exported by", train["exported_by"]),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _final_loss(train: dict[str, Any]) -> str:
    if train.get("final_loss") is None:
        return "not available (no metrics.jsonl beside the checkpoint)"
    return f"{train['final_loss']:.4f} (MSE on predicted patches, 0..1 units, at step {train['final_loss_step']})"


def _evaluation(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return []
    lines = ["## Evaluation", ""]
    if "probe_dice" in evaluation:
        probe = evaluation["probe_dice"]
        figures = {k: v for k, v in probe.items() if k != "step"}
        lines.append(f"- Frozen-encoder probe Dice at step {probe['step']} (metrics.jsonl): `{json.dumps(figures)}`")
    if "report" in evaluation:
        lines.append(f"- `ctmae evaluate` report (numbers only): `{json.dumps(evaluation['report'])}`")
    return [*lines, ""]


def _n(sizes: list[int]) -> str:
    return "x".join(str(s) for s in sizes) if len(set(sizes)) > 1 else f"{sizes[0]}³"


def _mm(spacing: list[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing)


def _tokens(arch: dict[str, Any]) -> int:
    count = 1
    for s, p in zip(arch["img_size"], arch["patch_size"]):
        count *= s // p
    return count
