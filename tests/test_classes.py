"""Segmentation classes by name: ``--classes`` parsed and resolved through the labels' names files (nnU-Net v2 and
MSD forms, a TotalSegmentator-style labels.json, ``--label-names``), chosen values turned into classes 1..K after the
cache, names carried into checkpoints, prediction sidecars and evaluate/study reports, and labels whose names
disagree refused, on TotalSegmentator-like maps of 117 classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import organ_ct, organ_map, write_volume
from ctmae.cli import app
from ctmae.io.checks import InputError
from ctmae.preprocess.config import PreprocessConfig
from ctmae.seg.classes import choose_classes, parse_classes
from ctmae.seg.data import cache_cases, find_cases
from ctmae.seg.label_names import LabelNames, read_names
from ctmae.seg.network import load_seg_checkpoint
from ctmae.seg.predict import sidecar_path

runner = CliRunner()
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
ISO = (1.5, 1.5, 1.5)
NAMES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver"}
TOTAL = {**{v: f"structure_{v}" for v in range(6, 118)}, **NAMES}  # 117 named classes
FINETUNE = ["--from-scratch", "--model", "tiny", "--crop", "32", "--feature-size", "8", "--batch-size", "1"]
FINETUNE += ["--crops-per-volume", "1", "--device", "cpu", "--steps", "1"]
EVALUATE = ["--device", "cpu", "--crop", "32", "--protocols", "probe", "--windows", "1", "--test-cases", "1"]


def msd_form(names: dict[int, str]) -> dict:
    """MSD's dataset.json labels (value -> name), as TotalSegmentator's labels.json too."""
    return {"labels": {"0": "background", **{str(v): n for v, n in names.items()}}}


def nnunet_form(names: dict[int, str]) -> dict:
    """nnU-Net v2's dataset.json labels (name -> value)."""
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{n: v for v, n in names.items()}}}


def write_cases(root: Path, count: int = 3, classes: int = 117, labels: str = "labels") -> Path:
    """``count`` cases as images/caseN.nii.gz and ``labels``/caseN.nii.gz: organ maps of ``classes`` classes."""
    for i in range(count):
        label = organ_map((40, 40, 32), classes, seed=i)
        write_volume(root / "images" / f"case{i}.nii.gz", organ_ct(label, i), spacing=ISO, direction=IDENTITY)
        write_volume(root / labels / f"case{i}.nii.gz", label, dtype=np.uint8, spacing=ISO, direction=IDENTITY)
    return root


def write_json(path: Path, body: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def total(tmp_path_factory) -> Path:
    """Three 117-class cases with a nnU-Net v2 dataset.json one folder above the labels."""
    root = write_cases(tmp_path_factory.mktemp("total"))
    write_json(root / "dataset.json", nnunet_form(TOTAL))
    return root


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# --- --classes and names files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, pairs",
    [
        ("liver=5,spleen=1", [("liver", 5), ("spleen", 1)]),
        ("liver, spleen", [("liver", None), ("spleen", None)]),
        ("5,1", [("", 5), ("", 1)]),
        ("kidney_left=3", [("kidney_left", 3)]),
    ],
)
def test_classes_option_parses_names_values_and_pairs(spec, pairs):
    assert parse_classes(spec) == pairs


@pytest.mark.parametrize(
    "spec, problem",
    [("liver=0", "0 is the background"), ("liver=x", "whole number 1..255"), ("liver=,", "NAME=VALUE, NAME or VALUE")]
    + [("liver,Liver", "given twice"), ("5,liver=5", "given twice"), ("300", "1..255")],
)
def test_a_malformed_classes_option_is_named(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_classes(spec)


def test_names_files_in_both_forms_beside_or_above_the_labels(tmp_path):
    write_cases(tmp_path / "v1", count=1, classes=5)
    write_json(tmp_path / "v1" / "dataset.json", msd_form(NAMES))  # MSD, one folder above the labels
    write_cases(tmp_path / "v2", count=1, classes=5)
    write_json(tmp_path / "v2" / "dataset.json", nnunet_form(NAMES))
    write_cases(tmp_path / "ts", count=1, classes=5)  # TotalSegmentator-style labels.json beside, with other keys
    write_json(tmp_path / "ts" / "labels" / "labels.json", {**msd_form(NAMES), "present": {"5": "liver"}})
    for form in ("v1", "v2", "ts"):
        names = LabelNames.of([tmp_path / form / "labels" / "case0.nii.gz"])
        assert [names.name_of(v) for v in range(1, 6)] == list(NAMES.values()) and names.value_of("Liver") == 5
        chosen = choose_classes("liver,spleen,3", names)
        assert (chosen.values, chosen.names, chosen.count) == ((5, 1, 3), ("liver", "spleen", "kidney_left"), 4)
        assert chosen.text() == "1 liver (label 5), 2 spleen (label 1), 3 kidney_left (label 3)"
    explicit = write_json(tmp_path / "names.json", {"1": "heart", "2": "aorta"})  # --label-names: the mapping itself
    assert read_names(explicit) == {1: "heart", 2: "aorta"}
    assert LabelNames.of([tmp_path / "v1" / "labels" / "case0.nii.gz"], explicit).value_of("aorta") == 2
    assert read_names(write_json(tmp_path / "region.json", {"labels": {"liver": [5], "kidney": [2, 3]}})) == {
        5: "liver"
    }
    with pytest.raises(InputError, match="names values to names|map values to names"):
        read_names(write_json(tmp_path / "bad.json", {"labels": {"liver": 5.5}}))


def test_chosen_names_must_exist_and_agree_with_the_files(tmp_path):
    write_cases(tmp_path, count=1, classes=5)
    names = LabelNames.of([tmp_path / "labels" / "case0.nii.gz"])
    with pytest.raises(InputError, match="no label names found"):
        choose_classes("liver", names)  # no names file anywhere: values are needed
    write_json(tmp_path / "dataset.json", msd_form(NAMES))
    names = LabelNames.of([tmp_path / "labels" / "case0.nii.gz"])
    with pytest.raises(InputError, match="no class of that name in .*did you mean liver"):
        choose_classes("livr", names)
    with pytest.raises(InputError, match="label value 1 is 'spleen' in .*dataset.json, where liver is 5"):
        choose_classes("liver=1", names)


def test_labels_whose_names_disagree_are_refused(tmp_path):
    write_json(tmp_path / "a" / "dataset.json", nnunet_form({1: "heart"}))
    write_json(tmp_path / "b" / "dataset.json", msd_form({1: "liver", 2: "heart"}))
    names = LabelNames.of([tmp_path / "a" / "labels" / "x.nii.gz", tmp_path / "b" / "labels" / "y.nii.gz"])
    with pytest.raises(InputError, match=r"label value 1 is 'heart' in .*a/dataset.json but 'liver' in .*b/dataset"):
        names.name_of(1)
    with pytest.raises(InputError, match=r"class 'heart' is label value 1 in .*a/dataset.json but 2 in"):
        names.value_of("heart")


def test_chosen_classes_are_applied_after_the_cache_whose_entries_serve_any_choice(tmp_path):
    write_cases(tmp_path, count=1, classes=117)
    cases = find_cases([tmp_path / "images"], [tmp_path / "labels"])
    raw = organ_map((40, 40, 32), 117, seed=0)
    pre = PreprocessConfig(spacing=ISO, crop=32, cache_dir=str(tmp_path / "cache"))
    plain = cache_cases(cases, pre)[0]["label"].numpy()[0]
    entries = sorted((tmp_path / "cache").rglob("*.b2nd"))
    chosen = cache_cases(cases, pre, label_values=(5, 1))
    label = chosen[0]["label"].numpy()[0]  # (X, Y, Z) on the cached grid
    assert sorted((tmp_path / "cache").rglob("*.b2nd")) == entries  # nothing new cached: the remap follows it
    assert np.array_equal(label, np.select([plain == 5, plain == 1], [1.0, 2.0], 0.0))
    assert (label == 1).sum() == (raw == 5).sum() and (label == 2).sum() == (raw == 1).sum()  # 1.5 mm in, 1.5 out


# --- finetune-seg ----------------------------------------------------------------------------------------------


def test_finetune_seg_learns_classes_chosen_by_name_and_names_them_everywhere(total, tmp_path):
    out = tmp_path / "run"
    args = ["--images", total / "images", "--labels", total / "labels", "--out", out, "--cache-dir", tmp_path / "c"]
    result = runner.invoke(
        app, ["finetune-seg", *map(str, [*FINETUNE, *args]), "--classes", "liver,spleen,kidney_left"]
    )
    assert result.exit_code == 0, result.output
    assert "classes: 1 liver (label 5), 2 spleen (label 1), 3 kidney_left (label 3)" in result.output
    assert "liver 0." in result.output and "kidney_left 0." in result.output  # Dice per class, by name
    cfg = load_seg_checkpoint(out / "checkpoints" / "last.pt")["config"]
    assert cfg.net.num_classes == 4 and cfg.data.label_values == (5, 1, 3)
    assert cfg.data.class_names == ("liver", "spleen", "kidney_left")
    pred = tmp_path / "pred"
    image = total / "images" / "case0.nii.gz"
    result = runner.invoke(
        app,
        ["finetune-seg", "--predict", str(out / "checkpoints" / "last.pt"), str(image)]
        + ["--out", str(pred), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(pred / "case0.nii.gz").read_text(encoding="utf-8"))
    assert sidecar["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_left"}
    assert [c["label_value"] for c in sidecar["classes"]] == [5, 1, 3] and sidecar["checkpoint"] == "last.pt"
    assert read_names(sidecar_path(pred / "case0.nii.gz")) == {1: "liver", 2: "spleen", 3: "kidney_left"}


def test_finetune_seg_without_classes_numbers_them_as_the_labels_and_names_them(tmp_path):
    root = write_cases(tmp_path, count=2, classes=3)
    write_json(root / "labels" / "labels.json", msd_form(NAMES))
    out = tmp_path / "run"
    args = ["--images", root / "images", "--labels", root / "labels", "--out", out, "--cache-dir", tmp_path / "c"]
    result = runner.invoke(app, ["finetune-seg", *map(str, [*FINETUNE, *args])])
    assert result.exit_code == 0, result.output
    cfg = load_seg_checkpoint(out / "checkpoints" / "last.pt")["config"]
    assert cfg.net.num_classes == 4 and cfg.data.label_values == ()
    assert cfg.data.class_names == ("spleen", "kidney_right", "kidney_left")


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--classes", "liver", "--num-classes", "3"], 2, "--num-classes 3, but --classes chooses 1 class(es)"),
        (["--num-classes", "2"], 1, "holds class 117, but --num-classes is 2; choose the classes to learn with"),
        (["--classes", "liverr"], 1, "no class of that name in"),
        (["--classes", "liver=5,liver=6"], 2, "liver is given twice"),
        (["--classes", "liver", "--label-names", "missing.json"], 1, "missing.json: names file does not exist"),
    ],
)
def test_finetune_seg_refuses_bad_classes_in_one_line(total, tmp_path, extra, code, message):
    args = ["--images", total / "images", "--labels", total / "labels", "--out", tmp_path / "run"]
    result = runner.invoke(app, ["finetune-seg", *map(str, [*FINETUNE, *args]), *extra])
    assert result.exit_code == code and len(error_lines(result.output)) == 1, result.output
    assert message in error_lines(result.output)[0] and not (tmp_path / "run" / "checkpoints").exists()


# --- evaluate and study ----------------------------------------------------------------------------------------


def test_evaluate_scores_chosen_classes_by_name(tiny_checkpoint, tmp_path):
    root = write_cases(tmp_path / "data")
    write_json(root / "dataset.json", msd_form(TOTAL))  # the MSD form this time
    out = tmp_path / "report"
    args = [tiny_checkpoint, "--images", root / "images", "--labels", root / "labels", "--out", out, *EVALUATE]
    result = runner.invoke(app, ["evaluate", *map(str, args), "--classes", "liver,spleen=1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["cases"]["class_names"] == ["liver", "spleen"] and report["cases"]["label_values"] == [5, 1]
    assert report["settings"]["classes"] == "liver,spleen=1"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Classes: 1 liver (label 5), 2 spleen (label 1), and background." in md
    assert "| features | mean Dice | liver | spleen | tokens | D |" in md
    measures = {line.split(",")[5] for line in (out / "cases.csv").read_text(encoding="utf-8").splitlines()[1:]}
    assert measures == {"dice_liver", "dice_spleen"}


def test_evaluate_refuses_to_pool_labels_whose_names_differ(tiny_checkpoint, tmp_path):
    write_cases(tmp_path / "a", count=2, classes=3)
    write_cases(tmp_path / "b", count=1, classes=3)
    write_json(tmp_path / "a" / "dataset.json", nnunet_form({1: "heart", 2: "aorta", 3: "lung"}))
    write_json(tmp_path / "b" / "dataset.json", msd_form({1: "liver", 2: "aorta", 3: "lung"}))
    rows = [f"{d}/images/case{i}.nii.gz,{d}/labels/case{i}.nii.gz" for d, i in (("a", 0), ("a", 1), ("b", 0))]
    datalist = tmp_path / "pooled.csv"  # two datasets pooled in one datalist
    datalist.write_text("image,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    args = [tiny_checkpoint, "--images", datalist, "--out", tmp_path / "r", *EVALUATE]
    for extra in ([], ["--classes", "aorta,liver"]):  # every class, or one the two datasets number differently
        result = runner.invoke(app, ["evaluate", *map(str, args), *extra])
        assert result.exit_code == 1 and len(error_lines(result.output)) == 1, result.output
        assert "label value 1 is 'heart' in" in result.output and "but 'liver' in" in result.output
        assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.slow
def test_study_evaluates_chosen_classes_and_names_them(total, tmp_path):
    write_volume(tmp_path / "scans" / "scan.nii.gz", organ_ct(organ_map((40, 40, 32), 117, seed=7)), spacing=ISO)
    args = ["study", str(tmp_path / "scans"), "--eval-images", str(total / "images"), "--eval-labels"]
    args += [str(total / "labels"), "--out", str(tmp_path / "study"), "--grid", "mask=block", "--steps", "2"]
    args += ["--model", "tiny", "--crop", "32", "--patch", "16", "--device", "cpu", "--workers", "0", "--test-cases"]
    args += ["1", "--cache-dir", str(tmp_path / "cache"), "--protocols", "probe", "--classes", "liver,spleen"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "evaluation classes: 1 liver (label 5), 2 spleen (label 1)" in result.output
    study = json.loads((tmp_path / "study" / "study.json").read_text(encoding="utf-8"))
    assert study["manifest"]["eval_settings"]["classes"] == "liver,spleen"
    assert study["points"][0]["figures"]["classes"] == ["liver", "spleen"]
    md = (tmp_path / "study" / "study.md").read_text(encoding="utf-8")
    assert "Classes evaluated: liver, spleen." in md and "Probe Dice per class of the best point (000-" in md


def test_info_names_the_classes_of_a_segmentation_checkpoint(tmp_path):
    """``ctmae info`` on a fine-tuned checkpoint lists each output channel with its name and the label value it
    was trained on, so a user knows what a predicted 1 or 2 means without the run folder."""
    from ctmae.preprocess.config import PreprocessConfig
    from ctmae.seg.config import SegConfig, SegDataConfig, SegNetConfig
    from ctmae.seg.network import build_unetr, save_seg_checkpoint

    data = SegDataConfig(label_values=(5, 1), class_names=("liver", "spleen"))
    net = SegNetConfig(size="tiny", dim=96, heads=4, num_classes=3)
    cfg = SegConfig(data=data, preprocess=PreprocessConfig(crop=32), net=net)
    path = tmp_path / "best.pt"
    save_seg_checkpoint({"config": cfg.to_dict(), "model": build_unetr(cfg.net, 32).state_dict(), "step": 1}, path)
    result = CliRunner().invoke(app, ["info", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "1 liver (label 5), 2 spleen (label 1)" in result.output
