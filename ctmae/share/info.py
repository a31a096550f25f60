"""``ctmae info``: what a checkpoint or export folder holds and what it can feed, as titled rows of text."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctmae.preprocess.contract import preprocessing_of
from ctmae.runtime.checkpoint import SEG_FORMAT, CheckpointError
from ctmae.seg.network import net_config_from_mae
from ctmae.share.bundle import is_bundle
from ctmae.share.describe import describe_checkpoint, peek_format, run_figures
from ctmae.share.load import is_export, model_config, read_export


@dataclass
class Description:
    """What ``ctmae info`` shows: the kind of thing, sections of (name, value) rows, and what it feeds."""

    path: str
    kind: str
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    feeds: list[str] = field(default_factory=list)


def describe(path: str | os.PathLike) -> Description:
    """Describe an MAE checkpoint, a segmentation checkpoint or an export folder.

    Raises:
        CheckpointError: one line for anything else (a file from another program, a folder that is no export).
    """
    path = Path(path)
    if path.is_dir():
        if not is_export(path):
            raise CheckpointError(f"{path}: not a ctmae export folder (no config.json or MONAI bundle from ctmae)")
        config, _ = read_export(path)
        layout = "MONAI bundle" if is_bundle(path) else "safetensors"
        out = Description(str(path), f"ctmae encoder export ({layout})")
        _encoder_sections(out, config)
        out.feeds = _encoder_feeds(config, export=str(path), bundle=layout == "MONAI bundle")
        return out
    if peek_format(path) == SEG_FORMAT:
        return _segmentation(path)
    config, _ = describe_checkpoint(path)  # CheckpointError for foreign files, one line
    out = Description(str(path), "ctmae MAE pretraining checkpoint (encoder + decoder + optimiser state)")
    _encoder_sections(out, config)
    out.feeds = _encoder_feeds(config, checkpoint=str(path))
    return out


def _encoder_sections(out: Description, config: dict[str, Any]) -> None:
    arch, pre, train = config["architecture"], config["preprocessing"], config["training"]
    out.sections["architecture"] = [
        ("network", f"{config['network']} (no CLS token)"),
        *((k, _text(v)) for k, v in arch.items() if k not in ("classification", "dropout_rate", "spatial_dims")),
        ("position embedding", "fixed 3D sin-cos, stored with the weights"),
        ("weights", f"{config['weights']['tensors']} tensors, {config['weights']['parameters']:,} values"),
        ("SHA-256", config["weights"]["sha256"]),
    ]
    out.sections["preprocessing"] = [(k, _text(v)) for k, v in pre.items()]
    mask = ", ".join(f"{k} {_text(v)}" for k, v in train["mask"].items())
    rows = [
        ("model preset", train["model_size"]),
        ("step", f"{train['step']} of {train['total_steps']}"),
        ("scans", _text(train.get("scans")) if train.get("scans") is not None else "not recorded"),
        ("mask", mask),
        ("batch, lr, seed", f"{train['batch_size']}, {train['lr']:g}, {train['seed']}"),
        ("last loss", _loss(train)),
    ]
    out.sections["training"] = rows
    evaluation = config.get("evaluation") or {}
    if evaluation:
        out.sections["evaluation"] = [(k, json.dumps(v)) for k, v in evaluation.items()]


def _loss(train: dict[str, Any]) -> str:
    if train.get("final_loss") is None:
        return "not available (no metrics.jsonl in the run folder)"
    return f"{train['final_loss']:.4f} at step {train['final_loss_step']}"


def _encoder_feeds(config: dict[str, Any], checkpoint: str = "", export: str = "", bundle: bool = False) -> list[str]:
    where = checkpoint or export
    feeds = [f"MONAI ViT: ctmae.load_encoder({where!r}), or ViT(**architecture) + the weights"]
    problem = _unetr_problem(config["architecture"])
    if checkpoint:
        reconstruct = (
            "no: trained with norm_pix_loss"
            if config["training"].get("norm_pix_loss")
            else f"ctmae reconstruct {where}"
        )
        feeds += [f"reconstruct: {reconstruct} SCAN --out DIR", f"embed: ctmae embed {where} SCANS --out FILE"]
        feeds.append(f"export: ctmae export {where} --out DIR [--format safetensors|monai-bundle]")
        feeds.append(
            f"finetune-seg UNETR: ctmae finetune-seg {where} --images ... --labels ... --out RUN_DIR"
            if problem is None
            else f"finetune-seg UNETR: no ({problem})"
        )
    else:
        feeds.append("reconstruct / embed / finetune-seg: no, they take the MAE checkpoint (an export has no decoder)")
    feeds.append(
        f"MONAI UNETR: ctmae.load_unetr({where!r}, num_classes)" if problem is None else f"MONAI UNETR: no ({problem})"
    )
    if bundle:
        feeds.append("monai.bundle: python -m monai.bundle run --config_file configs/inference.json ... (tokens)")
    return feeds


def _unetr_problem(arch: dict[str, Any]) -> str | None:
    try:
        net_config_from_mae(model_config(arch), 16, 2)
    except ValueError as e:
        return str(e)
    return None


def _segmentation(path: Path) -> Description:
    from ctmae.seg.network import load_seg_checkpoint

    state = load_seg_checkpoint(path)
    cfg = state["config"]
    n, t = cfg.net, cfg.train
    out = Description(str(path), "ctmae fine-tuned segmentation checkpoint (MONAI UNETR)")
    out.sections["architecture"] = [
        ("network", "monai.networks.nets.UNETR"),
        ("ViT", f"{n.size} preset: width {n.dim}, 12 blocks, {n.heads} heads, 16³ patches"),
        ("feature_size", str(n.feature_size)),
        ("num_classes", f"{n.num_classes} (background included)"),
        ("img_size", f"{cfg.preprocess.crop}³"),
        ("classes", _classes(cfg.data.label_values, cfg.data.class_names, n.num_classes)),
    ]
    out.sections["preprocessing"] = [(k, _text(v)) for k, v in preprocessing_of(cfg.preprocess).items()]
    figures = run_figures(path, int(state.get("step", 0))).get("training", {})
    best = state.get("best_dice")
    out.sections["training"] = [
        ("step", f"{state.get('step', 0)} of {t.steps}"),
        (
            "encoder",
            f"{state.get('encoder_tensors', 0)} tensors from {cfg.pretrained}" if cfg.pretrained else "scratch",
        ),
        ("batch, lr, seed", f"{t.batch_size}, {t.lr:g}, {t.seed}"),
        ("frozen encoder, layer decay", f"{t.freeze_encoder}, {t.layer_decay:g}"),
        ("best validation Dice", f"{best:.4f}" if isinstance(best, float) and best >= 0 else "none yet"),
        ("last loss", _loss(figures)),
    ]
    out.feeds = [
        f"segmentation: ctmae segment {path} SCANS --out DIR (label volumes on each scan's grid)",
        "export / embed / reconstruct: no, they take the MAE checkpoint the encoder came from",
    ]
    return out


def _classes(values: tuple[int, ...], names: tuple[str, ...], num_classes: int) -> str:
    """``1 liver (label 5), 2 spleen (label 1)``: each output channel, its name and the label value it was trained
    on; channels 1..K are label values 1..K when no ``--classes`` picked them."""
    values = values or tuple(range(1, num_classes))
    names = names or ("",) * len(values)
    return ", ".join(f"{c} {n or 'unnamed'} (label {v})" for c, (v, n) in enumerate(zip(values, names), start=1))


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(_text(v) for v in value) if len(value) != 2 else f"{_text(value[0])}..{_text(value[1])}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
