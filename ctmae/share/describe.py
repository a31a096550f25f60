"""What an encoder export holds, read from an MAE checkpoint: its file names, MONAI ``ViT`` arguments, the ViT's
tensors and their digest, and the ``config.json`` content (architecture, preprocessing contract, training figures).

The writer (``ctmae.share.export``) and the loader (``ctmae.share.load``) both build on this module, so neither
imports the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import ViT

from ctmae.mae.config import ModelConfig, RunConfig
from ctmae.preprocess.contract import preprocessing_of
from ctmae.runtime.checkpoint import FORMAT, KINDS, SEG_FORMAT, CheckpointError, read_checkpoint

EXPORT_FORMAT = "ctmae-encoder"  # config.json's "format"
EXPORT_VERSION = 1  # bump when config.json's layout changes incompatibly
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "encoder.safetensors", "README.md"
EVALUATE_SECTIONS = ("probe", "fewshot", "recon")  # the figures of ctmae evaluate's report.json
POSITION_NOTE = (
    "fixed 3D sin-cos table (ctmae.mae.model.sincos_embedding_3d), stored with the weights; MONAI's own sincos table "
    "differs, so load the stored one (for another img_size, ctmae.load_encoder(..., img_size=N) recomputes it exactly)"
)


def vit_arguments(model: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of ``monai.networks.nets.ViT`` that hold this encoder, by MONAI's names."""
    return {
        "in_channels": model.in_chans,
        "img_size": [model.img_size] * 3,
        "patch_size": [model.patch] * 3,
        "hidden_size": model.dim,
        "mlp_dim": int(model.dim * model.mlp_ratio),
        "num_layers": model.depth,
        "num_heads": model.heads,
        "proj_type": "conv",
        "pos_embed_type": "sincos",
        "qkv_bias": model.qkv_bias,
        "classification": False,
        "dropout_rate": 0.0,
        "spatial_dims": 3,
    }


def monai_vit(arguments: dict[str, Any], where: str = CONFIG_FILE) -> ViT:
    """MONAI's ``ViT`` built from ``arguments``; CheckpointError naming ``where`` for arguments it does not take."""
    try:
        with warnings.catch_warnings():  # MONAI's sincos table calls torch.meshgrid without indexing=
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            return ViT(**arguments)
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{where}: architecture is not a MONAI ViT's arguments ({e})") from None


def encoder_tensors(model_weights: dict[str, torch.Tensor], arguments: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The MAE's ``encoder.*`` tensors as a whole MONAI ``ViT`` state dict (float32, CPU, contiguous).

    Raises:
        CheckpointError: an encoder tensor is missing, has no place in the ViT or does not fit its shape.
    """
    vit = monai_vit(arguments)
    encoder = {k.removeprefix("encoder."): v for k, v in model_weights.items() if k.startswith("encoder.")}
    target = vit.state_dict()
    for key, value in encoder.items():
        if key not in target or target[key].shape != value.shape:
            raise CheckpointError(f"encoder tensor {key!r} {tuple(value.shape)} does not fit MONAI's ViT")
    missing = [k for k in target if k not in encoder and ".norm_cross_attn." not in k]
    if missing:
        raise CheckpointError(f"the checkpoint lacks encoder tensor {missing[0]!r} ({len(missing)} missing)")
    vit.load_state_dict(encoder, strict=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in vit.state_dict().items()}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape and raw bytes of each (independent of the file's
    layout, so the same weights give the same digest in encoder.safetensors and models/model.pt)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def peek_format(path: str | os.PathLike) -> str | None:
    """The ``format`` tag of a ctmae checkpoint without reading its tensors (memory-mapped); None if there is none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return state.get("format") if isinstance(state, dict) else None


def load_mae_state(path: str | os.PathLike) -> dict[str, Any]:
    """A pretraining checkpoint's state (``config`` as a RunConfig); a segmentation checkpoint is refused by name.

    Raises:
        CheckpointError: a missing, foreign, corrupt or segmentation checkpoint, as one line.
    """
    if peek_format(path) == SEG_FORMAT:
        raise CheckpointError(
            f"{path}: {KINDS[SEG_FORMAT]}, not {KINDS[FORMAT]}; export takes the MAE checkpoint its encoder came "
            f"from (a segmentation checkpoint feeds ctmae segment)"
        )
    state = read_checkpoint(path, FORMAT)
    try:
        state["config"] = RunConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid: {e}") from None
    return state


def describe_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json content, ViT tensors) of an MAE checkpoint; the run folder around it adds the final loss and
    any probe or evaluation figures (``run_figures``)."""
    path = Path(path)
    state = load_mae_state(path)
    cfg: RunConfig = state["config"]
    if cfg.model.arch == "primus":
        raise CheckpointError(f"{path}: a Primus encoder is nnU-Net's, not MONAI's ViT; use --format nnunet")
    arguments = vit_arguments(cfg.model)
    try:
        tensors = encoder_tensors(state["model"], arguments)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    training, figures = training_of(path, state)
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "network": "monai.networks.nets.ViT",
        "architecture": arguments,
        "position_embedding": POSITION_NOTE,
        "preprocessing": preprocessing_of(cfg.preprocess),
        "training": training,
        **({"evaluation": figures} if figures else {}),
        "weights": {
            "file": WEIGHTS_FILE,
            "dtype": "float32",
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "sha256": tensors_sha256(tensors),
            "sha256_of": "tensors in name order: name, dtype, shape, raw bytes (ctmae.share.describe.tensors_sha256)",
        },
    }
    return config, tensors


def training_of(path: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the training summary of a loaded MAE checkpoint at ``path``, the evaluation figures of its run folder)."""
    cfg: RunConfig = state["config"]
    step = int(state.get("step", 0))
    m = cfg.mask
    training = {
        "exported_by": f"ctmae {_version()}",
        "checkpoint": path.name,
        "model_size": cfg.model.size,
        "scans": None,  # not recorded in checkpoints of this ctmae version
        "step": step,
        "total_steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "seed": cfg.train.seed,
        "mask": {"kind": m.kind, "ratio": m.ratio, "block": m.block, "predict_ratio": m.predict_ratio}
        | ({"noise_std": m.noise_std} if m.kind == "noise" else {}),
        "norm_pix_loss": cfg.model.norm_pix_loss,
    }
    figures = run_figures(path, step)
    training.update(figures.pop("training", {}))
    return training, figures


def run_figures(checkpoint: Path, step: int) -> dict[str, Any]:
    """Figures the checkpoint's run folder holds, up to its step: ``{"training": {"final_loss", "final_loss_step"},
    "probe_dice": {...}, "report": {...}}``, each only when present.

    The run folder is the checkpoint's grandparent (``RUN_DIR/checkpoints/last.pt``) or its folder. ``probe_dice``
    comes from metrics.jsonl rows (``ctmae pretrain --probe-every``); ``report`` from a ``report.json`` of
    ``ctmae evaluate`` there: its numbers only (Dice, PSNR ... by key path), never its strings (case ids).
    """
    run_dir = next((d for d in (checkpoint.parent.parent, checkpoint.parent) if (d / "metrics.jsonl").is_file()), None)
    out: dict[str, Any] = {}
    if run_dir is not None:
        rows = []
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
        losses = [r for r in rows if isinstance(r.get("loss"), (int, float))]
        if losses:
            out["training"] = {"final_loss": float(losses[-1]["loss"]), "final_loss_step": losses[-1]["step"]}
        probes = [r for r in rows if "probe_dice" in r]
        if probes:  # probe_dice (mean over classes) and probe_dice_<class>, as ctmae pretrain --probe-every logs them
            last = probes[-1]
            out["probe_dice"] = {"step": last["step"], **_numbers({k: v for k, v in last.items() if "probe" in k})}
    for folder in dict.fromkeys(d for d in (run_dir, checkpoint.parent) if d is not None):
        report = folder / "report.json"
        if report.is_file():
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            # ctmae evaluate's protocols (probe, fewshot, recon per subject); another report: all its numbers
            sections = {k: v for k, v in data.items() if k in EVALUATE_SECTIONS} if isinstance(data, dict) else {}
            found = _numbers(sections or data, frozenset(_strings(data)))
            if found:
                out["report"] = found
            break
    return out


def _numbers(value: Any, banned: frozenset[str] = frozenset(), depth: int = 0) -> Any:
    """The numeric content of a JSON value: numbers kept, dicts and lists of numbers recursed (4 levels), strings
    and anything else dropped, so an evaluation's case ids or paths never reach an export.

    A dict key is kept only if it looks like a figure's name: short, no path or file-suffix characters, and none of
    ``banned`` (the strings the report lists anywhere, e.g. its test case ids).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if depth >= 4:
        return None
    if isinstance(value, dict):
        kept = {
            str(k): _numbers(v, banned, depth + 1)
            for k, v in value.items()
            if len(str(k)) <= 40 and not any(c in str(k) for c in "/\\.#") and str(k) not in banned
        }
        kept = {k: v for k, v in kept.items() if v not in (None, {}, [])}
        return kept or None
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _version() -> str:
    from ctmae import __version__

    return __version__
