"""Pretraining recipes at equal wall-clock, scored against trivial fills on a slab of real CT pretraining never saw.

Each recipe is a config file for ``ctmae pretrain``. It is first timed for a few steps, then pretrained for as many
steps as fit the budget (the learning-rate schedule spans the whole run), on the bundled demo slab
(``sample_data/demo/pretrain``: the lower slabs of the sample chest CT and of the sample abdominal CT) plus
``--synthetic`` anatomical phantoms. ``--pretrain sample_data/demo/pretrain/lung1_lower.nii.gz`` pretrains on the
chest's lower slab alone.
Each checkpoint then goes through ``ctmae reconstruct`` on the held-out upper slab (``sample_data/demo/heldout``)
with several seeded masks drawn on 16-voxel cells (``--mask-unit 16``), so that recipes with patch 8 and patch 16
face the very same hidden voxels: block masks of 48 mm cubes (2 cells at 1.5 mm) and random masks of single cells,
each hiding 75%. The score is
the pooled masked PSNR of the model minus that of the best gaussian fill of the same hidden voxels, the figure
``ctmae reconstruct`` writes to metrics.json.

    python -m benchmarks.recipe [--minutes 3] [--recipes a,b,...] [--seeds 3] [--synthetic 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import synthetic
from benchmarks.common import machine, progress
from benchmarks.recipe_table import RECIPES

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "sample_data" / "demo" / "pretrain"
HELDOUT = ROOT / "sample_data" / "demo" / "heldout" / "lung1_upper.nii.gz"
BLOCK_MM = 48.0  # block masks hide cubes of this edge
TIMING_STEPS = 90  # steps of the timing run; its rate is taken from step 30 on
UNIT = 16  # voxels: masks are drawn on cells of this edge (1.5 mm spacing: 24 mm)


def pretrain(name: str, config: dict, inputs: list[Path], out: Path, steps: int) -> float:
    """``ctmae pretrain`` with ``config`` for ``steps`` steps into ``out``; returns the wall-clock seconds."""
    cfg_file = out.with_suffix(".yaml")
    cfg_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    command = [
        sys.executable,
        "-c",
        "from ctmae.cli import main; main()",
        "pretrain",
        *map(str, inputs),
        "--out",
        str(out),
    ]
    command += ["--config", str(cfg_file), "--steps", str(steps), "--overwrite", "--workers", "0"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def seconds_per_step(run: Path) -> float:
    """Seconds per step from step 30 on (the first steps read every volume cold and warm the threads up)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    first, last = next(r for r in rows if r["step"] >= 30), rows[-1]
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def score(checkpoint: Path, seeds: int, scratch: Path, heldout: Path = HELDOUT, window_step: int | None = None) -> dict:
    """Pooled masked PSNR of the model and of the best gaussian fill on the held-out slab, under block masks
    (48 mm cubes) and random masks (single 24 mm cubes), drawn on 16-voxel cells: every recipe with a patch that
    divides 16 faces the very same hidden voxels for a seed."""
    from ctmae.infer.reconstruct import mask_config, reconstruct
    from ctmae.infer.sliding import load_model

    loaded = load_model(checkpoint, "cpu")
    block = round(BLOCK_MM / loaded.cfg.preprocess.spacing[0] / UNIT)
    out = {}
    for kind, edge in (("block", block), ("random", 1)):
        mask = mask_config(loaded, kind, 0.75, edge)
        runs = [
            reconstruct(loaded, heldout, scratch / f"{kind}{seed}", mask, seed, mask_unit=UNIT, window_step=window_step)
            for seed in range(seeds)
        ]
        out[kind] = pooled(runs)
    return out


def pooled(runs: list[dict]) -> dict[str, float]:
    """Masked PSNR of the model and of the best gaussian fill over several reconstructions (``metrics.json``
    contents), from their squared errors pooled over every masked voxel, and the model's margin in dB."""
    voxels = sum(m["masked"]["voxels"] for m in runs)
    model, fill = (
        10 * math.log10(voxels / sum(m[key]["mse"] * m["masked"]["voxels"] for m in runs)) for key in ("masked", "fill")
    )
    return {"model": model, "fill": fill, "difference": model - fill}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="pretraining wall-clock per recipe")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    ap.add_argument("--seeds", type=int, default=3, help="masks per kind on the held-out slab")
    ap.add_argument("--synthetic", type=int, default=2, help="synthetic chest phantoms added to pretraining")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    ap.add_argument("--pretrain", type=Path, nargs="+", default=[PRETRAIN], help="real scans to pretrain on")
    ap.add_argument("--heldout", type=Path, default=HELDOUT, help="the scan held out of pretraining, scored")
    ap.add_argument("--rescore", action="store_true", help="score the runs already in --out again, no training")
    ap.add_argument("--window-step", type=int, default=None, help="ctmae reconstruct's --window-step (voxels)")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.recipe " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    work = args.out or Path(tempfile.mkdtemp(prefix="ctmae-recipe-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_CACHE_HOME", str(work / "cache"))
    inputs = [*args.pretrain, *phantoms(work / "synthetic", args.synthetic)]
    done = work / "results.json"
    results_before = json.loads(done.read_text(encoding="utf-8")) if done.exists() else {}
    results = {} if args.rescore else dict(results_before)
    for name in args.recipes.split(","):
        recipe = RECIPES[name]
        if args.rescore:  # score the runs of an earlier invocation again
            rows = [
                json.loads(line) for line in (work / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            ]
            last = [r for r in rows if "seconds" in r][-1]  # a preview row at the last checkpoint carries no time
            seconds, steps = results_before.get(name, {}).get("seconds", last["seconds"]), last["step"]
        else:
            if "steps" in recipe:  # a reference with a fixed number of steps
                steps = recipe["steps"]
            else:
                progress(f"{name}: timing")
                pretrain(name, recipe["config"], inputs, work / f"{name}-timing", TIMING_STEPS)
                rate = seconds_per_step(work / f"{name}-timing")
                steps = max(10, int(args.minutes * 60 / rate))
                progress(f"{name}: {rate:.3f} s/step -> {steps} steps")
            seconds = pretrain(name, recipe["config"], inputs, work / name, steps)
        checkpoint = work / name / "checkpoints" / "last.pt"
        figures = score(checkpoint, args.seeds, work / f"{name}-recon", args.heldout, args.window_step)
        results[name] = {"steps": steps, "seconds": seconds, **figures}
        progress(f"{name}: {json.dumps(results[name])}")
        (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    info["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(markdown(results, info, command, args))


def phantoms(folder: Path, count: int) -> list[Path]:
    """``count`` synthetic chest phantoms (body, lungs that grow and shrink along z, ribs, spine) at 1.5 mm: their
    files in ``folder``, one per phantom."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"chest{i}.nii.gz" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            synthetic.write_nifti(path, synthetic.ct_volume((240, 200, 110), (1.5, 1.5, 1.5), seed=i))
    return paths


def markdown(results: dict, info: dict, command: str, args: argparse.Namespace) -> str:
    lines = [f"Command: `{command}`", "", *[f"- **{k}**: {v}" for k, v in info.items()], ""]
    lines += [
        "| recipe | what | steps | pretraining s | block: model | block: fill | block: difference | random: model "
        "| random: fill | random: difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["block"]["difference"]):
        b, q = r["block"], r["random"]
        lines.append(
            f"| {name} | {RECIPES[name]['why']} | {r['steps']} | {r['seconds']:.0f} | {b['model']:.2f} | "
            f"{b['fill']:.2f} | **{b['difference']:+.2f}** | {q['model']:.2f} | {q['fill']:.2f} | "
            f"{q['difference']:+.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
