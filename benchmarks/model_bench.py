"""Model rows: training-step time and achieved FLOP/s against MONAI's MaskedAutoEncoderViT, and peak memory.

Step functions come from ``benchmarks.step_vs_monai`` (same widths, depths, heads and MLP widths; AdamW; 75 %
masking, block for ctmae, random patches for MONAI). The machine's fp32 matmul FLOP/s is measured in the same
rounds as the steps, so the achieved share of it is taken under the same load.

Peak memory runs each model in its own process (``python -m benchmarks.model_bench memory ...``): the peak resident
set (VmHWM) after two training steps minus the resident set measured right after the imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from benchmarks.common import Figure, Row, Target, interleaved, matmul_flops, progress
from benchmarks.step_vs_monai import ctmae_step, encoder_step, flops, monai_step
from ctmae.mae.config import MaskConfig, ModelConfig, RunConfig
from ctmae.mae.masking import num_predicted

REPO = Path(__file__).resolve().parent.parent
STEP_TARGETS = {96: Target(">=", 1.5, "≥ 1.5×"), 160: Target(">=", 1.75, "≥ 1.75×")}
MEMORY_TARGET = Target("<=", 0.6, "≤ 0.6×")
MFU_TARGET = Target(">=", 0.60, "ctmae ≥ 60%", on_ctmae=True)


def model_config(crop: int, patch: int, size: str, ratio: float) -> ModelConfig:
    """The ModelConfig ``step_vs_monai.ctmae_step`` builds, without building the model."""
    return RunConfig.from_dict(
        {"model": {"size": size, "patch": patch}, "data": {"crop": crop}, "mask": {"ratio": ratio}}
    ).model


def reference_step(m: ModelConfig, ratio: float):
    """``step_vs_monai.monai_step`` and a note when its decoder position embedding had to be learnable."""
    note = (
        ""
        if m.dec_dim % 6 == 0
        else (
            f" MONAI's decoder uses a learnable position embedding here: its 3D sin-cos embedding needs a decoder "
            f"width divisible by 6, and the {m.size} preset's is {m.dec_dim}."
        )
    )
    return monai_step(m, ratio), note


def step_rows(size: str, crop: int, patch: int, batch: int, ratio: float, repeats: int) -> tuple[Row, Row, Figure]:
    """(step-time row, achieved-FLOP/s row, ctmae step times) at one crop size."""
    torch.manual_seed(0)
    m, ours = ctmae_step(crop, patch, size, batch, ratio)
    theirs, note = reference_step(m, ratio)
    x = torch.rand(batch, 1, crop, crop, crop)
    progress(f"{size} {crop}³: counting FLOPs (one step each, also the warm-up)")
    gflop = {"ctmae": flops(ours, x) / 1e9, "monai": flops(theirs, x) / 1e9}
    encoder = encoder_step(crop, patch, size, ratio)
    gflop["encoder"] = flops(encoder, x) / 1e9
    ours(x)
    theirs(x)
    peak: list[float] = []
    fns = {"ctmae": lambda: ours(x), "monai": lambda: theirs(x), "encoder": lambda: encoder(x)}
    fns["matmul"] = lambda: peak.extend(matmul_flops())
    times = interleaved(fns, repeats, label=f"step {size} {crop}³")
    a, b = Figure(times["ctmae"], "s"), Figure(times["monai"], "s")
    enc = Figure(times["encoder"], "s")
    speed = b.median / a.median
    tokens = (crop // patch) ** 3
    m_pred = num_predicted(MaskConfig(ratio=ratio), tokens) / tokens
    step_row = Row(
        f"Training step, {crop}³, batch {batch}",
        a.fmt(),
        b.fmt(),
        speed,
        STEP_TARGETS.get(crop),
        notes=f"{size} preset (dim {m.dim}, depth {m.depth}, decoder {m.dec_dim}×{m.dec_depth}), patch {patch} "
        f"({tokens} tokens), {ratio:.0%} masking (block for ctmae, random patches for MONAI), fp32, each side's "
        f"training step: ctmae's as `ctmae pretrain` runs it (CrossMAE decoder, loss on a random "
        f"{m_pred:.0%} of the tokens, fused AdamW stepped inside backward), MONAI's model in the usual loop (decoder "
        f"and loss over every token, fused AdamW after backward). "
        f"FLOPs per step (torch.utils.flop_counter): ctmae {gflop['ctmae']:.1f} GFLOP, MONAI "
        f"{gflop['monai']:.1f} GFLOP ({gflop['monai'] / gflop['ctmae']:.2f}× ctmae's). "
        f"Ratio = MONAI median ÷ ctmae median step time. Ceiling: the encoder alone (forward + backward over the "
        f"visible tokens, gradients dropped as they complete, no decoder or optimizer; the same ViT in both "
        f"models) is {gflop['encoder']:.1f} GFLOP "
        f"and {enc.fmt()}, so no implementation of this encoder beats MONAI's step by more than "
        f"{b.median / enc.median:.2f}× here.{note}",
    )
    mm = Figure(peak, "GFLOP/s")
    ach_a = Figure([gflop["ctmae"] / t for t in times["ctmae"]], "GFLOP/s")
    ach_b = Figure([gflop["monai"] / t for t in times["monai"]], "GFLOP/s")
    share_a, share_b = ach_a.median / (mm.median / 1e9), ach_b.median / (mm.median / 1e9)
    mfu_row = Row(
        f"Achieved FLOP/s ÷ fp32 matmul FLOP/s, {crop}³",
        f"{share_a:.1%} ({ach_a.fmt(digits=3)})",
        f"{share_b:.1%} ({ach_b.fmt(digits=3)})",
        share_a / share_b,
        MFU_TARGET,
        ctmae_value=share_a,
        notes=f"Step FLOPs ÷ step time, each repeat; machine peak = median of {len(peak)} fp32 2048×2048 `torch.mm` "
        f"timed in the same rounds: {mm.fmt(scale=1e-9, unit='GFLOP/s')}. Ratio = ctmae share ÷ MONAI share; "
        f"the target is on ctmae's share.",
    )
    return step_row, mfu_row, a


def memory_row(size: str, crop: int, patch: int, batch: int, ratio: float, repeats: int) -> Row:
    """Peak memory above the post-import baseline, each model in its own process, processes interleaved."""
    peaks: dict[str, list[float]] = {"ctmae": [], "monai": []}
    for r in range(repeats):
        for impl in ("ctmae", "monai") if r % 2 == 0 else ("monai", "ctmae"):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.model_bench",
                "memory",
                impl,
                "--size",
                size,
                "--crop",
                str(crop),
                "--patch",
                str(patch),
                "--batch",
                str(batch),
                "--ratio",
                str(ratio),
            ]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            peaks[impl].append(result["above_baseline_mib"])
            progress(
                f"memory {impl} {crop}³ round {r + 1}/{repeats}: {result['above_baseline_mib']:.0f} MiB above "
                f"{result['baseline_mib']:.0f} MiB after imports"
            )
    a, b = Figure(peaks["ctmae"], "MiB"), Figure(peaks["monai"], "MiB")
    return Row(
        f"Peak training memory, {crop}³, batch {batch}",
        a.fmt(digits=4),
        b.fmt(digits=4),
        a.median / b.median,
        MEMORY_TARGET,
        notes=f"{size} preset, each side's training step as in the step rows. Each model in its own process: peak "
        f"RSS (VmHWM, reset to the current RSS right after the imports) after 2 training steps minus VmRSS right "
        f"after the imports, so weights, gradients, optimizer state, inputs, activations and the allocator's "
        f"retained memory count. Not `ru_maxrss`: Linux "
        f"carries that over from the parent across fork + exec, so every child reported at least the "
        f"parent benchmark's own size. Ratio = ctmae ÷ MONAI.",
    )


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    return kib / 1024


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_child(argv: list[str]) -> None:
    """Entry of the memory subprocess: prints one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_bench memory")
    ap.add_argument("impl", choices=["ctmae", "monai"])
    ap.add_argument("--size", default="base")
    ap.add_argument("--crop", type=int, default=160)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.75)
    args = ap.parse_args(argv)
    baseline = _status_mib("VmRSS")  # every import of this module is done by now
    reset = _reset_peak()
    torch.manual_seed(0)
    if args.impl == "ctmae":
        _, step = ctmae_step(args.crop, args.patch, args.size, args.batch, args.ratio)
    else:
        step, _ = reference_step(model_config(args.crop, args.patch, args.size, args.ratio), args.ratio)
    x = torch.rand(args.batch, 1, args.crop, args.crop, args.crop)
    for _ in range(2):
        step(x)
    # ru_maxrss would be the obvious figure, but Linux carries it over from the parent across fork + exec, so a
    # child of a large benchmark process reports at least the parent's size. VmHWM belongs to the new image.
    peak = _status_mib("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "impl": args.impl,
                "baseline_mib": baseline,
                "peak_mib": peak,
                "peak_reset": reset,
                "ru_maxrss_mib": maxrss,
                "above_baseline_mib": peak - baseline,
            }
        )
    )


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    if len(sys.argv) > 1 and sys.argv[1] == "memory":
        memory_child(sys.argv[2:])
    else:
        sys.exit("usage: python -m benchmarks.model_bench memory {ctmae,monai} [--size ...] (run by benchmarks.run)")
