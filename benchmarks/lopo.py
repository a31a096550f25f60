"""Leave-one-patient-out: does a pretraining recipe learn what carries to a patient it never saw?

For each bundled patient in turn, ``ctmae pretrain`` runs with the recipe on every scan of the other patients, and
``ctmae reconstruct`` scores the model on every scan of the held-out patient against the best gaussian fill of the
same hidden voxels (48 mm block masks, 75% hidden, drawn on 16-voxel cells, seeds 1..S), with the default windows and
with ``--window-step 16``. Per patient the masked PSNR is pooled over its scans and seeds; the table gives the
model's margin over the fill per held-out patient, then the mean and the worst over the rotation.

The patients are people, not files: the bundled abdominal slabs are one patient (sample_data/README.md), and each
patient's scans are all its slabs. A lever is the base recipe (the demo's, ``ctmae/recipes/demo.yaml``, without the
intensity augmentation and the fill context this benchmark chose, for 1400 steps) with some sections changed
(``LEVERS``); ``--synthetic N`` adds N synthetic chest phantoms to every fold's pretraining; ``--adapt-steps N``
reconstructs each held-out scan after N steps of test-time training on its visible voxels.

    python -m benchmarks.lopo [--levers demo,flip,...] [--seeds 2] [--synthetic 0] [--adapt-steps 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import machine, progress
from benchmarks.recipe import BLOCK_MM, UNIT, phantoms, pooled, pretrain
from benchmarks.recipe_table import _merged
from ctmae.mae.config import recipe_path

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
PATIENTS: dict[str, list[Path]] = {
    "lung1 (chest, 1.5 x 1.5 x 5 mm)": [SAMPLE / "ct" / "lung1.nii.gz"],
    "abdomen (abdomen and pelvis, 3 mm)": [
        SAMPLE / "demo" / "pretrain" / "abdomen_lower.nii.gz",
        SAMPLE / "demo" / "heldout" / "abdomen_upper.nii.gz",
    ],
}
DENSE_STEP = 16  # voxels: the README's ``--window-step 16``


DEMO = yaml.safe_load(recipe_path("demo").read_text(encoding="utf-8"))  # ctmae/recipes/demo.yaml
# recipe_table.py's demo-cpv8-zoom, the levers' common base: the demo without its intensity augmentation and fill
# context, for the 1400 steps it trained before the context made a step dearer
BASE = _merged(DEMO, {"data": {"contrast": 0.0}, "model": {"fill_context": 0}, "train": {"steps": 1400}})


def _lever(why: str, **sections: dict) -> dict:
    return {"why": why, "config": _merged(BASE, sections)}


LEVERS: dict[str, dict] = {
    "demo": {"why": "the demo as shipped (ctmae/recipes/demo.yaml)", "config": DEMO},
    "demo-1step": {
        "why": "the demo after 1 step: its fill and an untrained residual",
        "config": _merged(DEMO, {"train": {"steps": 1}}),
    },
    "base": _lever("the demo before this benchmark: 8 crops a visit, scaled by 1/1.25 to 1.25"),
    "base-1step": _lever("the base after 1 step: the fill it starts from", train={"steps": 1}),
    "flip": _lever("the base with left-right flips", data={"flip": True}),
    "contrast25": _lever(
        "the base with each crop's intensities bent by a gamma in [1/1.25, 1.25]", data={"contrast": 0.25}
    ),
    "contrast25-flip": _lever("contrast25 and flip together", data={"contrast": 0.25, "flip": True}),
    "contrast50": _lever(
        "the base with each crop's intensities bent by a gamma in [1/1.5, 1.5]", data={"contrast": 0.5}
    ),
    "no-zoom": _lever("the base without scaling", data={"zoom": 0.0}),
    "zoom50": _lever("the base with crops scaled by 1/1.5 to 1.5", data={"zoom": 0.5}),
    "plain-decoder": _lever(
        "the base with a plain decoder (no fill residual)", model={"fill_sigma": 0.0, "fill_queries": False}
    ),
    "mask60": _lever("the base hiding 60% of the tokens", mask={"ratio": 0.6, "predict_ratio": 0.6}),
    "block1": _lever("the base hiding single tokens (random masking; the score hides 48 mm blocks)", mask={"block": 1}),
    "block1-contrast25": _lever(
        "block1 with contrast25's intensity augmentation", mask={"block": 1}, data={"contrast": 0.25}
    ),
    "block3": _lever("the base hiding cubes of 3 tokens (72 mm) instead of 2 (48 mm)", mask={"block": 3}),
    "steps2000": _lever("the base for 2000 steps", train={"steps": 2000}),
    "context16": _lever(
        "contrast25 with fills that read 16 voxels of the scan around each crop (model.fill_context)",
        data={"contrast": 0.25},
        model={"fill_context": 16},
    ),
    "context32": _lever(
        "contrast25 with fills that read 32 voxels of the scan around each crop (model.fill_context)",
        data={"contrast": 0.25},
        model={"fill_context": 32},
    ),
    "demo-block1": {
        "why": "the demo hiding single tokens (random masking; block1, the best base lever without test-time training)",
        "config": _merged(DEMO, {"mask": {"block": 1}}),
    },
    "demo-zoom50": {
        "why": "the demo with crops scaled by 1/1.5 to 1.5 (zoom50, the best base lever without the context)",
        "config": _merged(DEMO, {"data": {"zoom": 0.5}}),
    },
}


def score_patient(checkpoint: Path, scans: list[Path], seeds: int, scratch: Path, adapt_steps: int = 0) -> dict:
    """Masked PSNR of the model and of the best gaussian fill, pooled over ``scans`` and mask seeds 1..``seeds``,
    with the default windows and dense ones; ``difference`` is the model's margin over the fill in dB. With
    ``adapt_steps`` each scan is reconstructed after test-time training on its visible voxels."""
    from ctmae.infer.reconstruct import mask_config, reconstruct
    from ctmae.infer.sliding import load_model

    loaded = load_model(checkpoint, "cpu")
    mask = mask_config(loaded, "block", 0.75, round(BLOCK_MM / loaded.cfg.preprocess.spacing[0] / UNIT))
    out = {}
    for windows, step in (("default", None), ("dense", DENSE_STEP)):
        runs = [
            reconstruct(
                loaded,
                scan,
                scratch / f"{windows}{i}-{seed}",
                mask,
                seed,
                mask_unit=UNIT,
                window_step=step,
                adapt_steps=adapt_steps,
            )
            for i, scan in enumerate(scans)
            for seed in range(1, seeds + 1)
        ]
        out[windows] = pooled(runs)
    return out


def rotate(
    name: str,
    seeds: int,
    synthetic: list[Path],
    work: Path,
    reuse: bool = False,
    adapt_steps: int = 0,
    train_seed: int = 0,
) -> dict:
    """One lever over the rotation: per held-out patient, the scores of a model pretrained on the others.

    With ``reuse``, a fold whose run in ``work`` finished (its last checkpoint) is not trained again, and one already
    scored (its score.json) is not scored again. ``train_seed`` other than 0 trains the lever from another seed
    (weights, data order, crops, masks) in its own folder: the spread between seeds is the noise of one run."""
    config = _merged(LEVERS[name]["config"], {"train": {"seed": train_seed}}) if train_seed else LEVERS[name]["config"]
    steps = config["train"]["steps"]
    folder = work / _key(name, len(synthetic), train_seed)  # phantoms and other seeds make other runs
    rows = {}
    for held, scans in PATIENTS.items():
        others = [s for p, group in PATIENTS.items() if p != held for s in group]
        run = folder / held.split()[0]
        run.parent.mkdir(parents=True, exist_ok=True)
        scored = run / (f"score-adapt{adapt_steps}.json" if adapt_steps else "score.json")
        checkpoint = run / "checkpoints" / "last.pt"
        if reuse and scored.exists():
            rows[held] = json.loads(scored.read_text(encoding="utf-8"))
            continue
        if not (reuse and checkpoint.exists()):
            progress(f"{name}: pretraining without {held}, {steps} steps")
            pretrain(name, config, [*others, *synthetic], run, steps)
        rows[held] = score_patient(checkpoint, scans, seeds, folder / "recon", adapt_steps)
        scored.write_text(json.dumps(rows[held], indent=2), encoding="utf-8")
        progress(f"{name}: held out {held}: {json.dumps(rows[held])}")
    return rows


def _key(name: str, synthetic: int, train_seed: int) -> str:
    """A lever's run folder and results key: its name, the phantoms added and the training seed when not 0."""
    return name + (f"+synthetic{synthetic}" if synthetic else "") + (f"+seed{train_seed}" if train_seed else "")


def summary(rows: dict, windows: str) -> tuple[float, float]:
    """Mean and worst margin over the held-out patients."""
    margins = [r[windows]["difference"] for r in rows.values()]
    return sum(margins) / len(margins), min(margins)


def markdown(results: dict, info: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "", *[f"- **{k}**: {v}" for k, v in info.items()], ""]
    held = list(PATIENTS)
    head = " | ".join(f"held out {h.split()[0]}: default / dense" for h in held)
    lines += [
        f"| lever | what | {head} | mean: default | worst: default | mean: dense | worst: dense |",
        "|---|---|" + "---|" * (len(held) + 4),
    ]
    for key, rows in sorted(results.items(), key=lambda kv: -summary(kv[1], "default")[0]):
        lever, _, extra = key.partition("+")
        why = LEVERS[lever]["why"] + (f", plus {extra}" if extra else "")
        cells = " | ".join(
            f"{rows[h]['default']['difference']:+.2f} / {rows[h]['dense']['difference']:+.2f}" for h in held
        )
        (mean, worst), (dmean, dworst) = summary(rows, "default"), summary(rows, "dense")
        lines.append(f"| {key} | {why} | {cells} | **{mean:+.2f}** | {worst:+.2f} | {dmean:+.2f} | {dworst:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levers", default="base,demo", help=f"comma-separated names from: {', '.join(LEVERS)}")
    ap.add_argument("--seeds", type=int, default=2, help="block masks per held-out scan (seeds 1..N)")
    ap.add_argument("--synthetic", type=int, default=0, help="synthetic chest phantoms added to every fold")
    ap.add_argument("--out", type=Path, default=None, help="keep runs and results.json here (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="keep the finished runs and scores already in --out")
    ap.add_argument("--adapt-steps", type=int, default=0, help="reconstruct's --adapt-steps (test-time training)")
    ap.add_argument("--train-seed", type=int, default=0, help="the levers' training seed (train.seed)")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.lopo " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    work = args.out or Path(tempfile.mkdtemp(prefix="ctmae-lopo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_CACHE_HOME", str(work / "cache"))
    synthetic = phantoms(work / "synthetic", args.synthetic)
    done = work / "results.json"
    results = json.loads(done.read_text(encoding="utf-8")) if done.exists() else {}
    for name in args.levers.split(","):
        key = _key(name, args.synthetic, args.train_seed) + (f"+adapt{args.adapt_steps}" if args.adapt_steps else "")
        results[key] = rotate(name, args.seeds, synthetic, work, args.reuse, args.adapt_steps, args.train_seed)
        done.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(markdown({k: v for k, v in results.items() if k.split("+")[0] in LEVERS}, info, command))


if __name__ == "__main__":
    main()
