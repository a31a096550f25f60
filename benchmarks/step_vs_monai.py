"""Training-step time of ctmae's MAE against MONAI's MaskedAutoEncoderViT with the same sizes.

Both models get the same encoder/decoder width, depth, heads and MLP widths, the same crops and batch, 75% masking
(block masking for ctmae; MONAI's model can only mask random patches) and a fused AdamW step. Each side runs its
own training step: ctmae's as ``ctmae pretrain`` does (its default mask config, which predicts a third of the
hidden tokens; AdamW stepped inside backward, ``ctmae.runtime.optim``), MONAI's model in the usual loop (forward,
masked-patch MSE, backward, ``optimizer.step()``, ``zero_grad``). Runs are interleaved
(ctmae, MONAI, ctmae, ...) and the medians compared; FLOPs per step come from ``torch.utils.flop_counter``.

    python -m benchmarks.step_vs_monai                 # ViT-B, 96³, patch 16, batch 2
    python -m benchmarks.step_vs_monai --size tiny --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.nets import MaskedAutoEncoderViT
from torch.utils.flop_counter import FlopCounterMode

from ctmae.mae.config import RunConfig
from ctmae.mae.masking import sample_mask
from ctmae.mae.model import MaskedAutoencoder3D, build_model
from ctmae.runtime.optim import build_optimizer, updater


def ctmae_update(model: MaskedAutoencoder3D, cfg: RunConfig) -> Callable[[torch.Tensor], None]:
    """``update(loss)`` as ``ctmae pretrain`` applies it: ``build_optimizer``'s fused AdamW through ``updater``
    (stepped inside backward with the default config). The hooks stay on ``model`` for its lifetime."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = build_optimizer(model, cfg.train)
    return contextlib.ExitStack().enter_context(updater(model, optimizer, scaler, cfg.train.grad_clip))


def ctmae_step(crop: int, patch: int, size: str, batch: int, ratio: float):
    cfg = RunConfig.from_dict(
        {"model": {"size": size, "patch": patch}, "data": {"crop": crop}, "mask": {"ratio": ratio}}
    )
    model = build_model(cfg.model)
    update = ctmae_update(model, cfg)
    gen = torch.Generator().manual_seed(0)
    grid = (crop // patch,) * 3

    def step(x: torch.Tensor) -> None:
        loss, _, _ = model(x, sample_mask(cfg.mask, x.shape[0], grid, gen, x.device))
        update(loss)

    return cfg.model, step


def monai_mae(m, ratio: float) -> MaskedAutoEncoderViT:
    """MONAI's MAE with ``m``'s sizes. MONAI's 3D sin-cos decoder embedding needs a width divisible by 6; for other
    decoder widths (the tiny and small presets) a learnable one of the same FLOPs is used."""
    return MaskedAutoEncoderViT(
        in_channels=1,
        img_size=m.img_size,
        patch_size=m.patch,
        hidden_size=m.dim,
        mlp_dim=int(m.dim * m.mlp_ratio),
        num_layers=m.depth,
        num_heads=m.heads,
        masking_ratio=ratio,
        decoder_hidden_size=m.dec_dim,
        decoder_mlp_dim=int(m.dec_dim * m.mlp_ratio),
        decoder_num_layers=m.dec_depth,
        decoder_num_heads=m.dec_heads,
        qkv_bias=m.qkv_bias,
        decoder_pos_embed_type="sincos" if m.dec_dim % 6 == 0 else "learnable",
    )


def encoder_step(crop: int, patch: int, size: str, ratio: float):
    """The encoder's share of a step, which both models pay: ctmae's ViT forward + backward over the visible tokens
    of a block mask, each gradient dropped as soon as it is complete (as ctmae's update frees it), no decoder and no
    optimizer. MONAI's step time ÷ this time bounds any speed-up at these sizes."""
    cfg = RunConfig.from_dict(
        {"model": {"size": size, "patch": patch}, "data": {"crop": crop}, "mask": {"ratio": ratio}}
    )
    model = build_model(cfg.model)
    for p in model.encoder.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    gen = torch.Generator().manual_seed(0)
    grid = (crop // patch,) * 3

    def step(x: torch.Tensor) -> None:
        mask = sample_mask(cfg.mask, x.shape[0], grid, gen, x.device)
        model.encoder.forward_features(model.patchify(x), mask.ids_keep).sum().backward()

    return step


def monai_update(model: torch.nn.Module) -> Callable[[torch.Tensor], None]:
    """The usual loop's ``update(loss)`` for MONAI's model: backward, fused AdamW step, gradients freed."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def monai_step(m, ratio: float):
    """MONAI's MAE (``monai_mae``) with a masked-patch MSE loss and ``monai_update``."""
    model = monai_mae(m, ratio)
    update = monai_update(model)
    p = m.patch

    def step(x: torch.Tensor) -> None:
        pred, mask = model(x)  # (B, L, p³), (B, L) with 1 = masked
        b, c, d, h, w = x.shape
        target = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, p**3)
        loss = (F.mse_loss(pred, target, reduction="none").mean(-1) * mask).sum() / mask.sum()
        update(loss)

    return step


def flops(step, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base")
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg, ours = ctmae_step(args.crop, args.patch, args.size, args.batch, args.ratio)
    theirs = monai_step(cfg, args.ratio)
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop)
    flop = {"ctmae": flops(ours, x), "monai": flops(theirs, x)}  # also warms both up
    times: dict[str, list[float]] = {"ctmae": [], "monai": []}
    for _ in range(args.repeats):
        for name, step in (("ctmae", ours), ("monai", theirs)):
            t0 = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - t0)
    print(
        f"{args.size} model, {args.crop}³ crop, patch {args.patch}, batch {args.batch}, {args.ratio:.0%} masking, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name in ("ctmae", "monai"):
        t = times[name]
        print(
            f"  {name:6s} step median {statistics.median(t) * 1e3:8.1f} ms  (min {min(t) * 1e3:.1f}, max "
            f"{max(t) * 1e3:.1f})  {flop[name] / 1e9:6.1f} GFLOP/step"
        )
    ratio = statistics.median(times["monai"]) / statistics.median(times["ctmae"])
    print(f"  speed-up (MONAI median / ctmae median): {ratio:.2f}x")


if __name__ == "__main__":
    main()
