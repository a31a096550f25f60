"""Frozen probe on organs: do an encoder's token features tell liver from spleen better than intensity does?

The bundled organ map (sample_data/organs, one labelled upper-abdominal slab of 30 slices at 3 mm) is one patient, so
the probe cannot hold out a patient: it holds out a region. The slab is cut into two disjoint regions along its axis
(slices 0-14 and 15-29, 45 mm each, no voxel shared), each written as its own case; ``ctmae evaluate --protocols
probe`` fits the linear probe on one region's tokens and scores per-class Dice on the other, then the other way round
(``--seed`` picks the test case; the two seeds used give each region once). Every checkpoint is compared, as
``evaluate`` always does, with a randomly initialised encoder of the same size and the raw-intensity floor.

    python -m benchmarks.organ_probe CHECKPOINT [CHECKPOINT ...] [--classes liver,spleen,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import progress

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_data" / "demo" / "heldout" / "abdomen_upper.nii.gz"
LABELS = ROOT / "sample_data" / "organs" / "abdomen_upper.nii.gz"
CLASSES = "liver,spleen,kidney_left,kidney_right,stomach,vertebrae_L1"  # organs present in both regions
CUT = 15  # slice where the second region begins


def write_regions(folder: Path) -> tuple[Path, Path]:
    """The slab's two regions as cases ``images/{lower,upper}.nii.gz`` with labels of the same names, each on its
    own part of the grid (the affine's origin moved to the region's first slice); the names file beside the labels."""
    import nibabel as nib

    from ctmae.io.volume import write_nifti

    pairs = []
    for kind, path in (("images", IMAGE), ("labels", LABELS)):
        image = nib.load(path)
        array, affine = np.asanyarray(image.dataobj), image.affine
        for name, start, stop in (("lower", 0, CUT), ("upper", CUT, array.shape[2])):
            moved = affine.copy()
            moved[:3, 3] = affine[:3, :3] @ [0, 0, start] + affine[:3, 3]
            write_nifti(array[:, :, start:stop], moved, folder / kind / f"{name}.nii.gz")
        pairs.append(folder / kind)
    shutil.copyfile(LABELS.parent / "labels.json", folder / "labels" / "labels.json")
    return pairs[0], pairs[1]


def evaluate(checkpoints: list[Path], images: Path, labels: Path, classes: str, seed: int, out: Path) -> dict:
    """``ctmae evaluate --protocols probe`` with the region held out by ``seed``; returns report.json."""
    command = [sys.executable, "-c", "from ctmae.cli import main; main()", "evaluate", *map(str, checkpoints)]
    command += ["--images", str(images), "--labels", str(labels), "--protocols", "probe", "--classes", classes]
    command += ["--test-cases", "1", "--shots", "1", "--seed", str(seed), "--device", "cpu", "--out", str(out)]
    subprocess.run([*command, "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+", help="MAE pretraining checkpoints")
    ap.add_argument("--classes", default=CLASSES, help="organs by name (sample_data/organs/labels.json)")
    ap.add_argument("--out", type=Path, default=None, help="keep the regions and reports here")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.organ_probe " + " ".join(sys.argv[1:] if argv is None else argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="ctmae-organ-probe-"))
    images, labels = write_regions(work / "regions")
    dice: dict[str, list[list[float]]] = {}
    names: list[str] = []
    tested: list[str] = []
    for seed in range(8):  # the first seeds that hold out each region once
        report = evaluate(args.checkpoints, images, labels, args.classes, seed, work / f"seed{seed}")
        (test,) = report["cases"]["test"]
        if test in tested:
            continue
        tested.append(test)
        progress(f"seed {seed}: {test} region held out")
        names = report["cases"]["class_names"]
        label = {s["slug"]: s["label"] for s in report["subjects"]}
        for slug, r in report["probe"].items():
            dice.setdefault(label[slug], []).append(r["dice_per_class"])
        if len(tested) == 2:
            break
    print(f"Command: `{command}`\n")
    print(f"| features | {' | '.join(names)} | mean |\n|---|{'---|' * (len(names) + 1)}")
    for label, runs in dice.items():
        per = np.mean(np.asarray(runs, dtype=float), axis=0)
        print(f"| {label} | {' | '.join(f'{d:.3f}' for d in per)} | {per.mean():.3f} |")
    print(f"\nDice on the held-out region, averaged over the two directions ({', '.join(map(str, tested))} as test).")


if __name__ == "__main__":
    main()
