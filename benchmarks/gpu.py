"""One-GPU figures: ctmae vs MONAI's MaskedAutoEncoderViT in bf16, with and without torch.compile.

    bash benchmarks/gpu.sh                          # ViT-B, 160³, patch 16, batch 32: a few minutes on one H100
    python -m benchmarks.gpu --batch 16 --compile off
    python -m benchmarks.gpu --dry-run              # on CPU: one tiny step of each variant, prints the fragment

For each variant (model × compile off/on): build the model and a fused AdamW (ctmae's stepped inside backward, as
``ctmae pretrain`` does), run warm-up steps (compilation happens there), record the peak memory above what was
allocated before the variant was built (``torch.cuda.max_memory_allocated``), then time all variants in interleaved
rounds of ``--steps`` steps each.
MFU = step FLOPs (``torch.utils.flop_counter`` on the uncompiled model) ÷ step time ÷ the card's dense bf16 peak.
ctmae's attention runs through SDPA, restricted to the flash kernel when the card has it; MONAI's model is built as
its constructor gives it (its attention is not SDPA), with one fp32 cast after its ``decoder_embed`` so that it
runs under autocast at all. Writes a markdown fragment (``--out``) that
``python -m benchmarks.run`` includes in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.step_vs_monai import ctmae_update, monai_mae, monai_update
from ctmae.mae.config import MaskConfig, ModelConfig, RunConfig
from ctmae.mae.masking import sample_mask
from ctmae.mae.model import build_model
from ctmae.preprocess.config import PreprocessConfig

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name(); the first
# match wins, so the more specific names come first.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
TARGET_MFU, TARGET_SPEEDUP, TARGET_MEMORY = 0.45, 1.75, 0.6
OUT = Path(__file__).resolve().parent / "gpu_results.md"


def bf16_peak(name: str) -> float | None:
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key.lower() in name.lower()), None)


def flash_available(device: torch.device, head_dim: int) -> bool:
    """Whether SDPA's flash kernel runs here for bf16 at this head size."""
    if device.type != "cuda":
        return False
    q = torch.randn(1, 2, 64, head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return False
    return True


def build(impl: str, m: ModelConfig, ratio: float, device: torch.device, compiled: bool, flash: bool):
    """(uncompiled model, step(x) -> None) for ``impl`` in {"ctmae", "monai"}; the step runs under bf16 autocast."""
    if impl == "ctmae":
        model = build_model(m).to(device)
    else:
        model = monai_mae(m, ratio).to(device)
        # MONAI's forward index-puts decoder_embed's output into fp32 mask tokens, which fails under autocast (bf16
        # into fp32); casting that one (B, Lv+1, Dd) tensor back to fp32 keeps fp32 weights and bf16 matmuls.
        model.decoder_embed.register_forward_hook(lambda mod, inp, out: out.float())
    cfg = RunConfig(preprocess=PreprocessConfig(crop=m.img_size), model=m, mask=MaskConfig(ratio=ratio))
    update = ctmae_update(model, cfg) if impl == "ctmae" else monai_update(model)
    net = torch.compile(model) if compiled else model
    gen = torch.Generator(device).manual_seed(0)
    grid = (m.img_size // m.patch,) * 3
    p = m.patch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    attention = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext()

    def step(x: torch.Tensor) -> None:
        with autocast, attention:
            if impl == "ctmae":
                loss, _, _ = net(x, sample_mask(cfg.mask, x.shape[0], grid, gen, device))
            else:
                pred, mask = net(x)  # (B, L, p³), (B, L) with 1 = masked
                b, c, d, h, w = x.shape
                target = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
                target = target.reshape(b, -1, p**3)  # (B, L, p³)
                loss = (F.mse_loss(pred.float(), target, reduction="none").mean(-1) * mask).sum() / mask.sum()
        update(loss)

    return model, step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step: Callable[[torch.Tensor], None], x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--crop", type=int, default=160)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--compile", choices=["both", "on", "off"], default=None, help="[both; off with --dry-run]")
    ap.add_argument("--warmup", type=int, default=3, help="steps per variant before timing (compiles)")
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for cards not in the table")
    ap.add_argument("--out", type=Path, default=None, help="markdown fragment [benchmarks/gpu_results.md]")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny model, one step per variant; prints the fragment instead of writing it (unless --out is given)",
    )
    args = ap.parse_args(argv)
    if args.dry_run:
        args.size, args.crop, args.batch, args.compile = "tiny", 32, 2, args.compile or "off"
        args.warmup, args.steps, args.rounds = 1, 1, 1
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible to PyTorch; use --dry-run to check the script on CPU")
        device = torch.device("cuda")
        args.compile = args.compile or "both"
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak(name)
    m = RunConfig.from_dict(
        {"model": {"size": args.size, "patch": args.patch}, "data": {"crop": args.crop}, "mask": {"ratio": args.ratio}}
    ).model
    flash = flash_available(device, m.dim // m.heads)
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, device=device)
    print(f"{name}: {args.size} {args.crop}³ patch {args.patch} batch {args.batch}, flash {flash}", flush=True)

    flops: dict[str, float] = {}
    for impl in ("ctmae", "monai"):  # on uncompiled models, before any memory is measured
        flops[impl] = count_flops(build(impl, m, args.ratio, device, False, flash)[1], x)
    variants: dict[str, Callable[[torch.Tensor], None]] = {}
    memory: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    for compiled in compile_modes:
        for impl in ("ctmae", "monai"):
            key = f"{impl}, compile {'on' if compiled else 'off'}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                _, step = build(impl, m, args.ratio, device, compiled, flash)
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    step(x)
                sync(device)
            except Exception as e:  # a compile failure is a result to report, not a reason to lose the others
                failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                print(f"  {key}: FAILED {failed[key]}", flush=True)
                continue
            memory[key] = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else None
            variants[key] = step
            print(f"  {key}: warm-up {time.perf_counter() - t0:.1f}s, {flops[impl] / 1e12:.2f} TFLOP/step", flush=True)

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for key in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[key](x)
            sync(device)
            times[key].append((time.perf_counter() - t0) / args.steps)
        print(
            f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
            flush=True,
        )

    text = fragment(name, peak, args, m, flash, flops, times, memory, failed)
    out = args.out or (None if args.dry_run else OUT)
    if out is None:
        print(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")


def fragment(name, peak, args, m, flash, flops, times, memory, failed) -> str:
    """The markdown for BENCHMARKS.md's GPU section."""
    lines = [
        f"Card: **{name}**; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. "
        f"`python -m benchmarks.gpu {' '.join(_argv(args))}`",
        "",
        f"{args.size} preset (dim {m.dim}, depth {m.depth}, decoder {m.dec_dim}×{m.dec_depth}), {args.crop}³ crops, "
        f"patch {args.patch}, batch {args.batch}, {args.ratio:.0%} masking, bf16 autocast, fused AdamW; ctmae's SDPA "
        f"{'restricted to the flash kernel' if flash else 'on its default kernel choice (flash unavailable)'}; "
        f"MONAI's model as built (no SDPA), with its decoder_embed output cast to fp32 by a forward hook (its "
        f"forward fails under autocast otherwise). "
        f"Step times: median (min–max) of {args.rounds} interleaved rounds of {args.steps} steps. "
        + (
            f"MFU against a dense bf16 peak of {peak / 1e12:.0f} TFLOP/s."
            if peak
            else "MFU: not measured (card not in the peak table; pass --peak-tflops)."
        ),
        "",
        "| variant | ms/step | steps/s | samples/s | peak memory | TFLOP/step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, t in times.items():
        med = statistics.median(t)
        impl = key.split(",")[0]
        mem = f"{memory[key] / 2**30:.2f} GiB" if memory.get(key) is not None else "n/a"
        mfu = f"{flops[impl] / med / peak:.1%}" if peak else "n/a"
        lines.append(
            f"| {key} | {med * 1e3:.1f} ({min(t) * 1e3:.1f}–{max(t) * 1e3:.1f}) | {1 / med:.2f} | "
            f"{args.batch / med:.1f} | {mem} | {flops[impl] / 1e12:.2f} | {flops[impl] / med / 1e12:.1f} | "
            f"{mfu} |"
        )
    lines += ["", "| measure | value | target | met? |", "|---|---|---|---|"]
    for mode in ("off", "on"):
        a, b = f"ctmae, compile {mode}", f"monai, compile {mode}"
        if a in times and b in times:
            speed = statistics.median(times[b]) / statistics.median(times[a])
            lines.append(
                f"| step speed-up vs MONAI (compile {mode}) | {speed:.2f}× | ≥ {TARGET_SPEEDUP}× | "
                f"{'yes' if speed >= TARGET_SPEEDUP else '**no**'} |"
            )
            if memory.get(a) is not None and memory.get(b):
                mem = memory[a] / memory[b]
                lines.append(
                    f"| peak memory vs MONAI (compile {mode}) | {mem:.2f}× | ≤ {TARGET_MEMORY}× | "
                    f"{'yes' if mem <= TARGET_MEMORY else '**no**'} |"
                )
        if a in times and peak:
            mfu = flops["ctmae"] / statistics.median(times[a]) / peak
            lines.append(
                f"| ctmae MFU (compile {mode}) | {mfu:.1%} | ≥ {TARGET_MFU:.0%} | "
                f"{'yes' if mfu >= TARGET_MFU else '**no**'} |"
            )
    for key, why in failed.items():
        lines.append(f"| {key} | failed: {why.replace('|', '/')} | — | — |")
    return "\n".join(lines) + "\n"


def _argv(args: argparse.Namespace) -> list[str]:
    out = [f"--size {args.size}", f"--crop {args.crop}", f"--batch {args.batch}", f"--compile {args.compile}"]
    return out + (["--dry-run"] if args.dry_run else [])


if __name__ == "__main__":
    main()
