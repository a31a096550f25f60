"""End to end: pretrain an MAE on a dataset's images, measure it with ``ctmae evaluate``, record the figures.

On a GPU with a public labelled dataset (MSD Task06 Lung or Task09 Spleen in MSD / nnU-Net layout, or BTCV through
a datalist such as MONAI's ``dataset_0.json``):

    python -m benchmarks.evaluate_protocol --dataset /data/Task09_Spleen --out runs/eval_spleen \\
        --model base --crop 96 --pretrain-steps 20000 --batch-size 8 --shots 1,2,5 --repeats 3 --steps 2000

On a CPU, the sample data (tiny model; the sample scan and its left-right mirror image are the two labelled cases):

    python -m benchmarks.evaluate_protocol --sample --out runs/eval_sample
    python -m benchmarks.evaluate_protocol --make-sample-cases runs/eval_data     # only write the two cases

The test cases are chosen exactly as ``ctmae evaluate`` chooses them (same seed and rule) and left out of
pretraining, so the encoder never sees a test scan. Both commands run with ``--resume``: rerunning the script after
an interruption continues. The figures (report.md's tables, the settings, the machine) are appended to
``benchmarks/evaluation_results.md`` (a record of every run) and to BENCHMARKS.md (``--benchmarks-md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ctmae.experiments.evaluate import split_cases
from ctmae.seg.data import find_cases

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
RECORD = Path(__file__).resolve().parent / "evaluation_results.md"
# The CPU run on the sample data (a few minutes on 2 cores): the demo's pretraining, then short fine-tuning runs on
# 32³ crops with a narrow UNETR decoder.
SAMPLE_SETTINGS = dict(
    model="tiny",
    crop=96,
    pretrain_steps=300,
    batch_size=4,
    pretrain_lr=1e-3,
    shots="1",
    repeats=2,
    steps=50,
    lr=2e-3,
    finetune_crop=32,
    feature_size=8,
)


def make_sample_cases(folder: Path) -> Path:
    """Two labelled cases from the one sample scan: ``lung1`` and ``lung1_mirrored`` (the voxel array flipped along
    its first, left-right axis with the same affine: the same patient mirrored, the tumour in the other lung).

    They are not independent patients: a figure measured on one after training on the other shows that the protocol
    runs and what it reports, not how well an encoder generalises.
    """
    for kind, target in (("ct", "images"), ("labels", "labels")):
        image = nib.load(SAMPLE / kind / "lung1.nii.gz")
        (folder / target).mkdir(parents=True, exist_ok=True)
        nib.save(image, folder / target / "lung1.nii.gz")
        mirrored = np.ascontiguousarray(np.asarray(image.dataobj)[::-1])
        nib.save(nib.Nifti1Image(mirrored, image.affine, image.header), folder / target / "lung1_mirrored.nii.gz")
    return folder


def dataset_inputs(dataset: Path, labels: Path | None) -> tuple[list[str], list[str], list[Path]]:
    """(--images, --labels for ctmae evaluate, unlabelled extra scans for pretraining) of a dataset argument.

    An MSD task folder is read through its dataset.json (which skips macOS ``._`` files in imagesTr/), an nnU-Net
    folder through imagesTr/labelsTr; its imagesTs/ scans are added to pretraining (they have no labels).
    """
    if labels is not None:
        return [str(dataset)], [str(labels)], []
    extra = sorted(p for p in (dataset / "imagesTs").glob("*.nii*") if not p.name.startswith("._"))
    if (dataset / "dataset.json").is_file():
        return [str(dataset / "dataset.json")], [], extra
    return [str(dataset)], [], extra


def pretraining_list(out: Path, images: list[str], labels: list[str], extra: list[Path], shots: str, seed: int) -> Path:
    """A .txt list of the scans to pretrain on: every labelled image except ``ctmae evaluate``'s test cases."""
    cases = find_cases(images, labels)
    train_needed = max(int(k) for k in shots.split(","))
    test, pool = split_cases(cases, None, train_needed, seed)
    scans = [c.image.files[0] if not c.image.is_dicom else os.path.dirname(c.image.files[0]) for c in pool]
    listing = out / "pretrain_scans.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{s}\n" for s in [*scans, *map(str, extra)]))
    print(f"pretraining on {len(scans) + len(extra)} scan(s); test cases left out: {', '.join(c.id for c in test)}")
    return listing


def ctmae(*args: object) -> float:
    """Run one ctmae command; returns its wall-clock seconds."""
    command = [sys.executable, "-m", "ctmae", *map(str, args)]
    print("$ ctmae " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def record(out: Path, title: str, commands: list[str], seconds: list[float], targets: list[Path]) -> str:
    """A Markdown section: title, machine, commands, then report.md's tables (its reading guide left out)."""
    report = (out / "eval" / "report.md").read_text(encoding="utf-8")
    tables = report.split("## How to read this report")[0].split("\n", 2)[2].strip()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} logical cores"
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = "\n".join(
        [
            f"## Evaluation: {title}",
            "",
            f"- **machine**: {device}; torch {torch.__version__}; {date}",
            f"- **load average at the end (1/5/15 min)**: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}",
            "- **commands**:",
        ]
        + [f"  - `{c}` ({s / 60:.1f} min)" for c, s in zip(commands, seconds)]
        + ["", tables, "", f"Report: `{out / 'eval'}` (report.json has every figure, per case too).", ""]
    )
    for path in targets:
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + section)
    return section


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, help="MSD/nnU-Net task folder, or a .csv/.json datalist")
    ap.add_argument("--labels", type=Path, help="label folder, when --dataset is an image folder")
    ap.add_argument("--sample", action="store_true", help="CPU run on the sample scan and its mirror image")
    ap.add_argument("--make-sample-cases", type=Path, metavar="DIR", help="only write the two sample cases to DIR")
    ap.add_argument("--out", type=Path, default=Path("runs/eval_protocol"))
    ap.add_argument("--model", default="base")
    ap.add_argument("--crop", type=int, default=96, help="pretraining crop")
    ap.add_argument("--pretrain-steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pretrain-lr", type=float, default=1.5e-4)
    ap.add_argument("--shots", default="1,2,5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000, help="fine-tuning steps per few-shot run")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    ap.add_argument("--finetune-crop", type=int, default=None)
    ap.add_argument("--feature-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md", help="also append here")
    args = ap.parse_args(argv)
    if args.make_sample_cases:
        print(f"two labelled cases written to {make_sample_cases(args.make_sample_cases)}")
        return
    if args.sample:
        for key, value in SAMPLE_SETTINGS.items():
            setattr(args, key, value)
        images, labels, extra = dataset_inputs(
            make_sample_cases(args.out / "data") / "images", args.out / "data" / "labels"
        )
        title = "sample data on CPU (tiny model; one scan and its mirror image)"
    elif args.dataset:
        images, labels, extra = dataset_inputs(args.dataset, args.labels)
        title = f"{args.dataset.name} ({args.model} model)"
    else:
        ap.error("give --dataset, --sample or --make-sample-cases")
    scans = pretraining_list(args.out, images, labels, extra, args.shots, args.seed)
    pretrain = [
        "pretrain",
        scans,
        "--out",
        args.out / "mae",
        "--model",
        args.model,
        "--crop",
        args.crop,
        "--steps",
        args.pretrain_steps,
        "--batch-size",
        args.batch_size,
        "--lr",
        args.pretrain_lr,
        "--seed",
        args.seed,
        "--device",
        args.device,
        "--resume",
    ]
    evaluate = [
        "evaluate",
        args.out / "mae" / "checkpoints" / "last.pt",
        "--images",
        *images,
        *(["--labels", *labels] if labels else []),
        "--out",
        args.out / "eval",
        "--shots",
        args.shots,
        "--repeats",
        args.repeats,
        "--steps",
        args.steps,
        "--lr",
        args.lr,
        "--feature-size",
        args.feature_size,
        "--seed",
        args.seed,
        "--device",
        args.device,
        "--resume",
    ]
    if args.finetune_crop:
        evaluate += ["--crop", args.finetune_crop]
    seconds = [ctmae(*pretrain), ctmae(*evaluate)]
    commands = ["ctmae " + " ".join(map(str, c)) for c in (pretrain, evaluate)]
    print(record(args.out, title, commands, seconds, [RECORD, args.benchmarks_md]))


if __name__ == "__main__":
    main()
