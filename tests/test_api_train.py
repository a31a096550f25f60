"""``ctmae.pretrain`` and ``ctmae.finetune`` called directly: a real run folder and checkpoint, a resume that
continues it, progress told to the reporter and nothing printed, and arguments that cannot work refused with the
error types the CLI turns into one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ctmae
from conftest import Heard, write_body_scans, write_volume
from ctmae.io.checks import InputError
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.seg.network import load_seg_checkpoint


@pytest.fixture
def tiny(tmp_path: Path) -> ctmae.PretrainConfig:
    """A tiny MAE on 32³ crops of 8³ patches, two steps on the CPU, every step logged."""
    return ctmae.PretrainConfig().replace(
        model={"size": "tiny", "patch": 8},
        preprocess={"crop": 32, "cache_dir": str(tmp_path / "cache")},
        data={"workers": 0},
        train={"steps": 2, "batch_size": 2, "log_every": 1, "device": "cpu"},
    )


def test_pretrain_writes_a_run_that_resume_continues(tiny, tmp_path, capfd):
    scans, out, heard = write_body_scans(tmp_path / "scans", 2), tmp_path / "run", Heard()
    first = ctmae.pretrain([scans], out, tiny, stop_at=1, reporter=heard)
    assert capfd.readouterr() == ("", "")  # an API function prints nothing
    assert (first.figures["steps"], first.figures["total_steps"], first.volumes) == (1, 2, 2)
    assert first.checkpoint == out / "checkpoints" / "last.pt"
    assert {"config.yaml", "metrics.jsonl", "train.log", "inputs.csv"} <= {p.name for p in out.iterdir()}
    state = load_checkpoint(first.checkpoint)
    assert state["step"] == 1 and state["config"].model.size == "tiny"
    assert ("start", "preprocessing", 2) in heard.events and ("start", "pretraining", 2) in heard.events
    said = [e[1] for e in heard.events if e[0] == "say"]
    assert any("2 volume(s) ready" in line for line in said) and any("training on cpu" in line for line in said)
    steps = [e for e in heard.events if e[0] == "progress"]
    assert steps == [("progress", 1, steps[0][2])] and steps[0][2].startswith("loss ")

    with pytest.raises(ctmae.OptionError, match="preprocess.spacing 2x2x2 mm differs"):
        ctmae.pretrain([scans], out, tiny.replace(preprocess={"spacing": (2.0,) * 3}), resume=True)
    again = Heard()
    second = ctmae.pretrain([scans], out, resume=True, reporter=again)  # no config: the checkpoint's
    assert (second.figures["start_step"], second.figures["steps"], second.stopped) == (1, 2, None)
    assert ("start", "pretraining", 2, 1) in again.events
    assert ("say", f"resuming from step 1 ({first.checkpoint})") in again.events
    assert load_checkpoint(second.checkpoint)["step"] == 2


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("not_empty", ctmae.OptionError, "folder is not empty; pass --resume"),
        ("no_scans", InputError, r"no usable volume among the inputs \(1 skipped\)"),
        ("probe_labels", ctmae.OptionError, "--probe-labels and --probe-every need --probe-images"),
    ],
)
def test_pretrain_refuses_what_cannot_work(tiny, tmp_path, case, error, message):
    scans, out = write_body_scans(tmp_path / "scans", 1), tmp_path / "run"
    given: dict = {}
    if case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n", encoding="utf-8")
    if case == "no_scans":
        scans = tmp_path / "notes.csv"
        scans.write_text("missing.nii.gz\n", encoding="utf-8")
    if case == "probe_labels":
        given = {"probe_labels": [scans]}
    with pytest.raises(error, match=message):
        ctmae.pretrain([scans], out, tiny, **given)
    assert not (out / "checkpoints").exists()


def labelled_cases(folder: Path, count: int) -> Path:
    """``count`` 32³ cases of noisy tissue with one bright cube labelled 1, as images/ and labels/ (1.5 mm)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = np.zeros((32, 32, 32), np.uint8)
        label[8 + i : 20 + i, 10:22, 9:21] = 1
        image = rng.normal(0.0, 60.0, label.shape) + 400.0 * label
        write_volume(folder / "images" / f"case{i}.nii.gz", image, spacing=(1.5, 1.5, 1.5))
        write_volume(folder / "labels" / f"case{i}.nii.gz", label, spacing=(1.5, 1.5, 1.5), dtype=np.uint8)
    return folder


def test_finetune_from_a_pretrained_encoder_and_resume(tiny_checkpoint, tmp_path, capfd):
    data, out, heard = labelled_cases(tmp_path / "data", 3), tmp_path / "seg", Heard()
    cfg = ctmae.finetune_config(tiny_checkpoint, feature_size=8).replace(
        preprocess={"crop": 32, "cache_dir": str(tmp_path / "cache")},
        data={"crops_per_volume": 2, "workers": 0},
        train={"steps": 2, "device": "cpu", "log_every": 1, "val_every": 1},
    )
    args = {"labels": [data / "labels"], "classes": "tumour=1"}
    first = ctmae.finetune([data / "images"], out, cfg, stop_at=1, reporter=heard, **args)
    assert capfd.readouterr() == ("", "")
    assert first.figures["encoder_tensors"] > 0 and first.classes == ("tumour",)
    saved = load_seg_checkpoint(first.best)["config"]
    assert saved.pretrained == str(tiny_checkpoint) and saved.data.label_values == (1,) and saved.net.num_classes == 2
    assert ("start", "checking labels", 3) in heard.events and ("start", "fine-tuning", 2) in heard.events
    said = [e[1] for e in heard.events if e[0] == "say"]
    assert any(f"tensors loaded from {tiny_checkpoint}" in line for line in said)
    assert ("say", "classes: 1 tumour (label 1)") in heard.events
    assert [e[1] for e in heard.events if e[0] == "progress"] == [1]

    second = ctmae.finetune([data / "images"], out, resume=True, **args)
    assert (second.figures["start_step"], second.figures["steps"], second.stopped) == (1, 2, None)
    assert load_seg_checkpoint(second.last)["step"] == 2


@pytest.mark.parametrize(
    "given, error, message",
    [
        ({"images": []}, ctmae.OptionError, "--images is required"),
        ({"val_fraction": 1.0}, ctmae.OptionError, "--val-fraction must be between 0 and 1"),
        ({"classes": "liver=x"}, ctmae.OptionError, "liver=x"),
        ({"num_classes": 3, "classes": "1"}, ctmae.OptionError, "--num-classes 3, but --classes chooses 1"),
    ],
)
def test_finetune_refuses_what_cannot_work(tmp_path, given, error, message):
    data = labelled_cases(tmp_path / "data", 1)
    args = {"images": [data / "images"], "labels": [data / "labels"], **given}
    with pytest.raises(error, match=message):
        ctmae.finetune(args.pop("images"), tmp_path / "seg", **args)
    assert not (tmp_path / "seg" / "checkpoints").exists()


def test_finetune_config_refuses_a_vit_unetr_cannot_hold():
    with pytest.raises(ctmae.OptionError, match="the large preset has 24 blocks; UNETR needs a 12-block ViT"):
        ctmae.finetune_config(model="large")
