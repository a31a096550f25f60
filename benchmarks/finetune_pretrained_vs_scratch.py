"""Segmentation Dice of a UNETR fine-tuned from a ctmae MAE encoder against the same UNETR from random weights.

Both runs share everything but the ViT's initial weights: the split, the seed (so the convolutional decoder starts
identical), the crops, the steps and every setting. The script prints the validation Dice of each (best over the
validations and last) and nothing more; with one labelled case (the default, sample_data's tumour) validation is on
the training case, which the output says.

    python -m benchmarks.finetune_pretrained_vs_scratch CHECKPOINT                      # sample_data, 100 steps
    python -m benchmarks.finetune_pretrained_vs_scratch CHECKPOINT --images imgs/ --labels labs/ --steps 2000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ctmae.mae.checkpoint import load_checkpoint
from ctmae.preprocess.config import PreprocessConfig
from ctmae.seg.config import SegConfig
from ctmae.seg.data import check_case, find_cases, split_cases
from ctmae.seg.network import net_config_from_mae
from ctmae.seg.train import finetune

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="MAE pretraining checkpoint (ctmae pretrain's last.pt)")
    parser.add_argument(
        "--images",
        type=Path,
        nargs="+",
        default=[SAMPLE_DATA / "ct"],
        help="images, or one datalist / nnU-Net folder [default: sample_data/ct]",
    )
    parser.add_argument("--labels", type=Path, nargs="*", default=None, help="[default: sample_data/labels]")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=None, help="[default: the checkpoint's crop]")
    parser.add_argument("--feature-size", type=int, default=16)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="keep both run folders here [default: temporary]")
    args = parser.parse_args()
    labels = (
        args.labels
        if args.labels is not None
        else ([SAMPLE_DATA / "labels"] if args.images == [SAMPLE_DATA / "ct"] else [])
    )

    cases = find_cases(args.images, labels)
    top = max(check_case(c) for c in cases)
    mae = load_checkpoint(args.checkpoint)
    m = mae["config"]
    cfg = SegConfig(
        preprocess=PreprocessConfig(m.preprocess.spacing, m.preprocess.hu_window, args.crop or m.model.img_size),
        net=net_config_from_mae(m.model, args.feature_size, max(2, top + 1)),
    ).replace(
        train={
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "device": args.device,
            "val_every": args.val_every,
        }
    )
    train, val = split_cases(cases, args.val_fraction, args.seed)
    held_out = not {c.id for c in train} & {c.id for c in val}
    print(
        f"{len(train)} training case(s), {len(val)} validation case(s)"
        + ("" if held_out else " (the same case: Dice on training data, not held out)")
    )
    print(
        f"{m.model.size} ViT from {args.checkpoint} ({m.train.steps} pretraining steps), crop {cfg.preprocess.crop}, "
        f"{args.steps} fine-tuning steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        results = {}
        for name, weights, pretrained in (
            ("pretrained", mae["model"], str(args.checkpoint)),
            ("from scratch", None, ""),
        ):
            run_cfg = SegConfig(data=cfg.data, net=cfg.net, train=cfg.train, pretrained=pretrained)
            results[name] = finetune(run_cfg, train, val, root / name.replace(" ", "_"), mae_weights=weights)
    print(f"{'init':<14}{'best val Dice':>15}{'last val Dice':>15}{'seconds':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['best_dice']:>15.4f}{r['last_dice']:>15.4f}{r['seconds']:>10.1f}")


if __name__ == "__main__":
    main()
