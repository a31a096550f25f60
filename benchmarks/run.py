"""Every performance measure against MONAI, side by side with its MONAI reference, written to BENCHMARKS.md.

    python -m benchmarks.run                    # full: ViT-B, ~15 minutes on 2 cores
    python -m benchmarks.run --quick            # small preset, fewer repeats: a few minutes
    python -m benchmarks.run --size base --out /tmp/B.md

Rows: training-step time at 96³ and 160³ and the achieved share of the machine's fp32 matmul FLOP/s (against
MONAI's MaskedAutoEncoderViT of the same sizes), peak training memory at 160³, the first pass that builds the cache
and the cached crop stream (against MONAI's uncached LoadImaged → ... chain) on a synthetic 512×512×200 CT as
.nii.gz and as a DICOM series and on sample_data's lung1, and the default loader's delivery against the default
model's consumption. Compared timings are interleaved; figures are medians with min–max over the repeats. Progress
goes to stderr. The CPU is measured; ``benchmarks/gpu.sh`` covers the GPU and writes ``benchmarks/gpu_results.md``,
which is included here when present. ``benchmarks/CHANGES.md``, the hand-kept record of what each optimisation did
(and what was tried and dropped), is appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from benchmarks import data_bench, model_bench, synthetic
from benchmarks.common import Row, machine, not_measured, progress
from benchmarks.step_vs_monai import ctmae_step
from ctmae.io.discovery import find_volumes
from ctmae.mae.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CT = REPO / "sample_data" / "ct" / "lung1.nii.gz"
GPU_FRAGMENT = Path(__file__).resolve().parent / "gpu_results.md"
# sections other benchmarks write (each under its own heading), included as they stand
FRAGMENTS = [Path(__file__).resolve().parent / name for name in ("cache_results.md", "recipe_results.md")]
CHANGES = Path(__file__).resolve().parent / "CHANGES.md"  # hand-kept log of what each change did, appended
PATCH, BATCH, RATIO = 16, 2, 0.75


@dataclasses.dataclass(frozen=True)
class Plan:
    """Repeats per measure."""

    step_repeats: dict[int, int]  # per crop edge
    memory_repeats: int
    first_pass_repeats: int
    crop_repeats: int
    crop_visits: int  # visits of ctmae's crop stream per repeat
    live_steps: int  # training steps in the live loader loop
    loader_repeats: int
    loader_batches: int


FULL = Plan({96: 11, 160: 5}, 2, 3, 5, 25, 6, 5, 32)
QUICK = Plan({96: 3, 160: 3}, 1, 2, 3, 10, 3, 3, 16)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and --size small: a few minutes")
    ap.add_argument("--size", default=None, help="model preset for the MONAI comparison [base; small with --quick]")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    size = args.size or ("small" if args.quick else "base")
    plan = QUICK if args.quick else FULL
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")  # MONAI's and pydicom's deprecation chatter; progress lines are on stderr

    info = machine()
    progress(
        f"{info['CPU']}, {info['threads']}, torch {torch.__version__}; size {size}, "
        f"{'quick' if args.quick else 'full'} plan"
    )
    rows: list[Row] = []
    scratch = data_bench.scratch_dir()
    try:
        rows += model_rows(size, plan)
        rows += data_rows(scratch, plan)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.write_text(markdown(rows, info, command, size), encoding="utf-8")
    progress(f"wrote {args.out}")
    for r in rows:
        met = {True: "met", False: "NOT met", None: "-"}[r.met]
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        print(f"{r.measure:70s} {ratio:>8s}  {r.target.text if r.target else '':14s} {met}")


def model_rows(size: str, plan: Plan) -> list[Row]:
    steps, mfus = [], []
    for crop, repeats in plan.step_repeats.items():
        step_row, mfu_row, _ = model_bench.step_rows(size, crop, PATCH, BATCH, RATIO, repeats)
        steps.append(step_row)
        mfus.append(mfu_row)
    progress("peak memory at 160³ (one subprocess per model)")
    memory = model_bench.memory_row(size, 160, PATCH, BATCH, RATIO, plan.memory_repeats)
    return [*steps, memory, *mfus]


def data_rows(scratch: Path, plan: Plan) -> list[Row]:
    progress(f"writing a synthetic {'×'.join(map(str, synthetic.SHAPE))} CT as .nii.gz and as a DICOM series")
    array = synthetic.ct_volume()
    nii = synthetic.write_nifti(scratch / "synthetic_ct.nii.gz", array)
    dcm = synthetic.write_dicom(scratch / "synthetic_dicom", array)
    del array
    volumes = {
        f"synthetic {'×'.join(map(str, synthetic.SHAPE))} .nii.gz": find_volumes([nii])[0][0],
        f"synthetic {synthetic.SHAPE[2]}-slice DICOM series": find_volumes([dcm])[0][0],
    }
    if SAMPLE_CT.is_file():
        volumes["sample_data/ct/lung1.nii.gz"] = find_volumes([SAMPLE_CT])[0][0]
    cfg = RunConfig().replace(preprocess={"cache_dir": str(scratch / "cache")}, data={"workers": 2})  # crop 96, ...

    rows = []
    for name, source in volumes.items():
        if source.is_dicom and not _has_pydicom():
            rows.append(
                not_measured(
                    f"First pass (build cache) per volume: {name}",
                    data_bench.FIRST_PASS_TARGET,
                    "MONAI's PydicomReader needs pydicom, which is not installed",
                )
            )
            continue
        rows.append(data_bench.first_pass(name, source, cfg, plan.first_pass_repeats, scratch))
    for name, source in volumes.items():
        if source.is_dicom and not _has_pydicom():
            rows.append(
                not_measured(
                    f"Cached crop stream: {name}",
                    data_bench.CROPS_TARGET,
                    "MONAI's PydicomReader needs pydicom, which is not installed",
                )
            )
            continue
        rows.append(data_bench.cached_crops(name, source, cfg, plan.crop_repeats, plan.crop_visits))

    default = RunConfig().model
    crop, workers = cfg.preprocess.crop, cfg.data.workers
    progress(f"loader vs step: default config ({default.size} model, crop {crop}, workers {workers})")
    torch.manual_seed(0)
    _, step = ctmae_step(cfg.preprocess.crop, default.patch, default.size, BATCH, RATIO)
    rows.append(
        data_bench.loader_vs_step(
            list(volumes.values()),
            cfg,
            step,
            BATCH,
            plan.live_steps,
            plan.loader_repeats,
            plan.loader_batches,
            f"{default.size} preset, patch {default.patch}",
        )
    )
    return rows


def _has_pydicom() -> bool:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def markdown(rows: list[Row], info: dict[str, str], command: str, size: str) -> str:
    met = {True: "yes", False: "**no**", None: "—"}
    lines = [
        "# Benchmarks",
        "",
        "ctmae against MONAI, measured side by side in one run by `benchmarks/run.py`. "
        "Figures are medians with (min–max) over [n] repeats; compared timings were interleaved. Timings from a "
        "loaded or shared machine are noisy: read the ratios, and rerun on a quiet machine before quoting them.",
        "",
        f"Command: `{command}` (model preset for the MONAI comparison: `{size}`)",
        "",
        *[f"- **{k}**: {v}" for k, v in info.items()],
        "",
        "| # | measure | ctmae | reference (MONAI) | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "—"
        target = r.target.text if r.target else "—"
        lines.append(f"| {i} | {r.measure} | {r.ctmae} | {r.reference} | {ratio} | {target} | {met[r.met]} |")
    met_count = sum(r.met is True for r in rows)
    judged = sum(r.met is not None for r in rows)
    lines += ["", f"{met_count} of {judged} targets met in this run.", "", "## Notes per row", ""]
    lines += [f"{i}. {r.measure}: {r.notes}" for i, r in enumerate(rows, 1)]
    lines += ["", "## GPU", ""]
    if GPU_FRAGMENT.is_file():
        lines += [GPU_FRAGMENT.read_text(encoding="utf-8").strip()]
    else:
        lines += [
            "Not measured in this run: no GPU figures yet. Run `bash benchmarks/gpu.sh` on a CUDA machine; it "
            "writes `benchmarks/gpu_results.md`, which the next `python -m benchmarks.run` includes here."
        ]
    lines += ["", *[f.read_text(encoding="utf-8").strip() + "\n" for f in FRAGMENTS if f.is_file()]]
    lines += [CHANGES.read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
