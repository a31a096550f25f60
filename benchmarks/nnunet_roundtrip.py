"""The whole way from CT to a fine-tuned nnU-Net Primus, with the real nnU-Net commands, on a tiny synthetic dataset.

1. writes a synthetic nnU-Net raw dataset (imagesTr/labelsTr/dataset.json, MSD's layout; CT-like volumes in HU with a
   sphere to segment), its dataset.json naming nnU-Net's ``NibabelIOWithReorient`` reader;
2. ``ctmae pretrain --arch primus --model s`` on its images for a few steps;
3. ``ctmae export --format nnunet --patch-size 64 --num-classes 2``;
4. ``nnUNetv2_plan_and_preprocess``, merges the export's ``plans_fragment.json`` into the plans
   (``ctmae.share.nnunet.apply_plans``) and preprocesses again with them (``nnUNetv2_preprocess``);
5. ``nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNet_Primus_S_ctmaeShort_Trainer -pretrained_weights FILE -device cpu``:
   nnU-Net finds trainers by class name inside its own package, so this script writes that trainer (nnU-Net's
   ``nnUNet_Primus_S_Trainer`` with one epoch of a few iterations) into the installed nnunetv2 package folder and
   removes it at the end;

and prints the commands it ran and the log lines that show nnU-Net loaded the weights. Too slow for the test suite
(minutes on a CPU). Needs the nnunet extra.

    python -m benchmarks.nnunet_roundtrip --work /tmp/ctmae-nnunet
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

DATASET_ID, DATASET = 901, "Dataset901_CtmaeSpheres"
TRAINER = "nnUNet_Primus_S_ctmaeShort_Trainer"
TRAINER_SOURCE = f'''"""Written by ctmae's benchmarks/nnunet_roundtrip.py, removed at its end: one short epoch."""
import torch
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_S_Trainer


class {TRAINER}(nnUNet_Primus_S_Trainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = {{iterations}}
        self.num_val_iterations_per_epoch = 1
'''
SHAPE, SPACING = (64, 64, 64), 1.5


def write_dataset(raw: Path, cases: int) -> Path:
    """Synthetic CT (air outside a soft-tissue body, a brighter sphere inside: the label) in nnU-Net's raw layout."""
    folder = raw / DATASET
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float32)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])  # RAS
    for i in range(cases):
        body = ((grid - 32) ** 2 / np.array([26, 22, 30]) ** 2).sum(-1) < 1
        centre = rng.uniform(22, 42, 3)
        sphere = ((grid - centre) ** 2).sum(-1) < rng.uniform(6, 10) ** 2
        hu = np.where(body, 40.0, -1000.0) + np.where(sphere & body, 120.0, 0.0) + rng.normal(0, 20, SHAPE)
        label = (sphere & body).astype(np.uint8)
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "sphere": 1},
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",  # RAS arrays, as ctmae's encoder learned
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return folder


def run(cmd: list[str], env: dict[str, str], log: Path, commands: list[str]) -> str:
    """Run ``cmd`` (its output to ``log`` and returned); exit on failure with the log's tail."""
    commands.append(shlex.join(cmd))
    print(f"$ {commands[-1]}", flush=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(done.stdout, encoding="utf-8")
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {commands[-1]}\n{done.stdout[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ctmae-nnunet-roundtrip"))
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--pretrain-steps", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=2, help="training iterations in nnU-Net's one epoch")
    args = parser.parse_args()

    import nnunetv2

    from ctmae.share.nnunet import apply_plans

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
    }
    raw = write_dataset(work / "nnUNet_raw", args.cases)
    trainer_file = Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer" / "ctmae_short_trainer.py"
    trainer_file.write_text(TRAINER_SOURCE.format(iterations=args.iterations), encoding="utf-8")
    commands: list[str] = []
    try:
        ctmae = [sys.executable, "-m", "ctmae"]
        pretrain = ["pretrain", str(raw / "imagesTr"), "--out", str(work / "run"), "--arch", "primus", "--model", "s"]
        pretrain += ["--crop", "64", "--spacing", str(SPACING), "--steps", str(args.pretrain_steps)]
        pretrain += ["--batch-size", "2", "--workers", "0", "--cache-dir", str(work / "cache"), "--preview-every", "0"]
        run([*ctmae, *pretrain], env, work / "pretrain.log", commands)
        export = ["export", str(work / "run" / "checkpoints" / "last.pt"), "--format", "nnunet", "--out"]
        export += [str(work / "export"), "--patch-size", "64", "--num-classes", "2"]
        run([*ctmae, *export], env, work / "export.log", commands)
        plan = [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres"]
        run([*plan, "--verify_dataset_integrity", "-np", "1"], env, work / "plan.log", commands)
        plans = work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
        apply_plans(plans, work / "export" / "plans_fragment.json")
        commands.append(f"apply_plans('{plans}', '{work / 'export' / 'plans_fragment.json'}')  # ctmae.share.nnunet")
        preprocess = [str(bin_dir / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"]
        run(preprocess, env, work / "preprocess.log", commands)
        train = [str(bin_dir / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER]
        train += ["-pretrained_weights", str(work / "export" / "pretrained_weights.pth"), "-device", "cpu"]
        # augmentation in the training process (nnUNet_n_proc_DA=0): a CPU run has no cores to spare for workers
        out = run(train, {**env, "nnUNet_n_proc_DA": "0"}, work / "train.log", commands)
    finally:
        trainer_file.unlink(missing_ok=True)
    keys = ("pretrained weights", "Epoch ", "train_loss", "val_loss", "Pseudo dice", "Epoch time", "Training done")
    shown = [line for line in out.splitlines() if any(k in line for k in keys)]
    print("\ncommands:\n" + "\n".join(commands))
    print("\nnnUNetv2_train log lines:\n" + "\n".join(shown))
    (work / "roundtrip.md").write_text(
        "commands:\n" + "\n".join(commands) + "\n\nlog lines:\n" + "\n".join(shown) + "\n", encoding="utf-8"
    )
    if not any("Loading pretrained weights" in line for line in shown):
        sys.exit("nnUNetv2_train did not report loading the pretrained weights")


if __name__ == "__main__":
    main()
