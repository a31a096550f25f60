"""The MONAI Bundle layout of an exported encoder: ``configs/metadata.json``, ``configs/inference.json``,
``configs/logging.conf``, ``models/model.pt`` (a plain ``ViT`` state dict) and ``docs/README.md``.

``inference.json`` builds ``monai.networks.nets.ViT`` with the encoder's sizes, loads ``models/model.pt`` into it
(``network``) and rebuilds ctmae's preprocessing from MONAI's stock transforms (``preprocessing``); its ``run``
computes the token feature map of ``input_image`` by sliding windows, as ``ctmae embed --tokens`` does, and saves it
to ``output_path`` as ``.npy`` (D, gx, gy, gz). Nothing in it needs ctmae:

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --bundle_root . --input_image scan.nii.gz --output_path tokens.npy

Where it differs from ctmae's own chain (``ctmae.preprocess.transforms``): scans are read by MONAI's ``LoadImaged``
(NibabelReader for NIfTI; a DICOM series needs ITK or pydicom installed) instead of ctmae's SimpleITK reader, which
also splits DICOM folders by series, checks slice geometry and refuses NaN voxels; the arithmetic is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctmae.infer.sliding import patch_aligned_overlap
from ctmae.runtime.files import atomic_path, atomic_write_json, atomic_write_text

METADATA, INFERENCE, LOGGING = "configs/metadata.json", "configs/inference.json", "configs/logging.conf"
WEIGHTS, CARD = "models/model.pt", "docs/README.md"
CTMAE_KEY = "ctmae"  # metadata.json carries the export's config.json content under this key

# The logging config MONAI's bundles ship (console, INFO); MONAI 1.6 accepts only literal handler arguments.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def preprocessing_transforms(pre: dict[str, Any], patch: int) -> list[dict[str, Any]]:
    """ctmae's deterministic chain as MONAI bundle components, then the far-end padding to whole patches that
    ctmae's sliding windows use (``ctmae.infer.sliding.pad_to_patches``)."""
    lo, hi = pre["hu_window"]
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": pre["orientation"],
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        },
        {
            "_target_": "Spacingd",
            "keys": "image",
            "pixdim": pre["spacing"],
            "mode": pre["interpolation"],
            "dtype": "$torch.float32",
        },
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": lo,
            "a_max": hi,
            "b_min": pre["scaled_to"][0],
            "b_max": pre["scaled_to"][1],
            "clip": pre["clip"],
        },
        {
            "_target_": "CropForegroundd",
            "keys": "image",
            "source_key": "image",
            "select_fn": f"$lambda x: x > {pre['body_threshold']!r}",
            "allow_smaller": False,
        },
        {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [pre["crop"]] * 3, "value": pre["pad_value"]},
        {"_target_": "DivisiblePadd", "keys": "image", "k": patch, "method": "end", "value": pre["pad_value"]},
    ]


def inference_config(config: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: the network with its weights, the preprocessing, and a ``run`` writing tokens."""
    arch, pre = config["architecture"], config["preprocessing"]
    patch, crop = arch["patch_size"][0], arch["img_size"][0]
    return {
        "imports": ["$import numpy as np", "$import os", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "input_image": "",
        "output_path": "$@bundle_root + '/eval/tokens.npy'",
        "network_def": {"_target_": "ViT", **arch},
        # the ViT with models/model.pt loaded, in eval mode, on the device
        "network": "$[@network_def.load_state_dict(torch.load(@ckpt_path, map_location='cpu', weights_only=True)), "
        "@network_def.to(@device).eval()][-1]",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(pre, patch)},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [crop] * 3,
            "sw_batch_size": 2,
            "overlap": patch_aligned_overlap(crop, patch),
            "mode": "constant",
        },
        # (B, 1, c, c, c) windows -> (B, D, g, g, g) token maps: ViT's (B, L, D) tokens in raster order
        "token_map": f"$lambda x, net=@network: net(x)[0].transpose(1, 2).reshape(x.shape[0], -1, *[n // {patch} "
        f"for n in x.shape[2:]])",
        "image": "$@preprocessing({'image': @input_image})['image']",
        "tokens": "$torch.no_grad()(lambda: @inferer(@image[None].to(@device), @token_map))()[0].float().cpu()",
        "run": [
            "$os.makedirs(os.path.dirname(os.path.abspath(@output_path)), exist_ok=True)",
            "$np.save(@output_path, @tokens.numpy())",
        ],
    }


def metadata(config: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's required versions and data formats, plus the export's config."""
    import monai

    arch, pre = config["architecture"], config["preprocessing"]
    version = "0.1.0"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": version,
        "changelog": {version: f"exported by {config['training']['exported_by']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": "ctmae CT encoder",
        "task": "Self-supervised (masked autoencoder) CT encoder: token features for downstream networks",
        "description": "A 3D ViT encoder pretrained with ctmae's masked autoencoder on CT in HU. The network outputs "
        "token features (B, L, hidden_size) and the hidden states of every block; see docs/README.md.",
        "authors": "ctmae user",
        "copyright": "see the owner of the training data and the user who exported it",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": arch["in_channels"],
                    "spatial_shape": arch["img_size"],
                    "dtype": "float32",
                    "value_range": pre["scaled_to"],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "tuple",
                    "format": "token features",
                    "num_channels": arch["hidden_size"],
                    "spatial_shape": [int(np.prod([s // p for s, p in zip(arch["img_size"], arch["patch_size"])]))],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {},
                }
            },
        },
        CTMAE_KEY: config,
    }


def write_bundle(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Path]:
    """Write the bundle into ``out`` (an empty folder), each file atomically; returns the files written."""
    from ctmae.share.model_card import model_card

    config = {**config, "weights": {**config["weights"], "file": WEIGHTS}}
    with atomic_path(out / WEIGHTS) as tmp:
        torch.save(tensors, tmp)
    atomic_write_json(out / METADATA, metadata(config))
    atomic_write_json(out / INFERENCE, inference_config(config))
    atomic_write_text(out / LOGGING, LOGGING_CONF)
    atomic_write_text(out / CARD, model_card(config, "monai-bundle"))
    return [out / p for p in (WEIGHTS, METADATA, INFERENCE, LOGGING, CARD)]


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a MONAI bundle (a safetensors export has neither of these files)."""
    return (folder / METADATA).is_file() and (folder / WEIGHTS).is_file()
