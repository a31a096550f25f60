"""Masked-autoencoder pretraining speed: nnU-Net's Primus-B encoder against ctmae's ViT-B, same crop and mask.

Each model runs ``ctmae pretrain``'s training step (``benchmarks.step_vs_monai.ctmae_update``: AdamW stepped inside
backward; bf16 autocast on CUDA, fp32 on CPU) on the same crops with the same mask settings (block masking, ratio and
predict ratio as given). ViT-B embeds 16³ patches, Primus-B nnU-Net's 8³, so at one crop Primus encodes 8x the
tokens: the ratio is the price of nnU-Net's patch size. A third model, Primus-B with its rotary encoding switched off
(``eva.rope = None``; same weights otherwise), gives the cost of the rotary encoding on the visible tokens. Runs are
interleaved (ViT, Primus, Primus without rope, ...) and the medians compared.

    python -m benchmarks.primus_speed --device cuda                      # 128³, batch 4, ratio 0.75: on a GPU
    python -m benchmarks.primus_speed --size tiny --crop 32 --batch 2 --rounds 2   # proves it runs, on the CPU

Needs the nnunet extra (``pip install 'ctmae[nnunet]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

from benchmarks.common import interleaved, progress
from benchmarks.step_vs_monai import ctmae_update
from ctmae.mae.config import RunConfig
from ctmae.mae.masking import sample_mask
from ctmae.mae.model import build_model

VIT_OF = {"tiny": "tiny", "s": "small", "b": "base", "l": "large"}  # the ViT preset beside each Primus one


def step_fn(model_section: dict, args: argparse.Namespace, no_rope: bool = False):
    """(model config, ``step(x)``): one pretraining step of the model ``model_section`` describes."""
    cfg = RunConfig.from_dict(
        {
            "model": model_section,
            "preprocess": {"crop": args.crop},
            "mask": {"ratio": args.ratio, "predict_ratio": args.predict_ratio},
            "train": {"batch_size": args.batch},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).to(args.device)
    if no_rope:
        model.encoder.eva.rope = None
    update = ctmae_update(model, cfg)
    gen = torch.Generator(args.device).manual_seed(0)
    grid = (cfg.model.grid,) * 3
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else contextlib.nullcontext()
    )  # as ctmae pretrain's precision auto

    def step(x: torch.Tensor) -> None:
        with autocast:
            loss, _, _ = model(x, sample_mask(cfg.mask, x.shape[0], grid, gen, x.device))
        update(loss)
        if args.device == "cuda":
            torch.cuda.synchronize()

    return cfg.model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="b", help="Primus preset (tiny|s|b|l); the ViT is the matching preset")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--predict-ratio", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=args.device)
    models = {
        f"ViT-{args.size.upper()} (16³ patches)": step_fn({"size": VIT_OF[args.size], "patch": 16}, args),
        f"Primus-{args.size.upper()} (8³ patches)": step_fn({"arch": "primus", "size": args.size}, args),
        f"Primus-{args.size.upper()} without rope": step_fn({"arch": "primus", "size": args.size}, args, True),
    }
    for name, (m, step) in models.items():
        progress(f"{name}: dim {m.dim}, depth {m.depth}, heads {m.heads}, {m.grid**3} tokens per crop; warm-up")
        step(x)
    times = interleaved({n: (lambda s=s: s(x)) for n, (_, s) in models.items()}, args.rounds, "step")
    med = {n: statistics.median(t) for n, t in times.items()}
    vit, primus, plain = med.values()
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "crop": args.crop,
        "batch": args.batch,
        "mask": {"kind": "block", "ratio": args.ratio, "predict_ratio": args.predict_ratio},
        "seconds_per_step": {n: round(v, 5) for n, v in med.items()},
        "crops_per_s": {n: round(args.batch / v, 3) for n, v in med.items()},
        "primus_over_vit_step_time": round(primus / vit, 3),
        "rope_share_of_primus_step": round(1 - plain / primus, 4),
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print("\n| model | s/step | crops/s |\n|---|---|---|")
    for n, v in med.items():
        print(f"| {n} | {v:.4g} | {args.batch / v:.3g} |")
    print(f"\nPrimus/ViT step time: {primus / vit:.2f}x; rotary encoding: {1 - plain / primus:.1%} of a Primus step")


if __name__ == "__main__":
    main()
