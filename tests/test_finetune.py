"""`ctmae finetune-seg`: pairing layouts, label checks, encoder transfer into UNETR, training on a phantom whose
label is known, prediction in the source geometry, refusals and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import OBLIQUE, SAMPLE_DATA, write_volume
from ctmae.cli import app
from ctmae.io.checks import InputError
from ctmae.io.discovery import find_volumes
from ctmae.io.volume import read_volume
from ctmae.mae.blocks import sincos_embedding_3d
from ctmae.mae.checkpoint import load_checkpoint
from ctmae.mae.model import build_model
from ctmae.preprocess.config import PreprocessConfig
from ctmae.seg.config import SegConfig, SegNetConfig
from ctmae.seg.data import LabelledCase, check_case, find_cases, split_cases
from ctmae.seg.network import load_seg_checkpoint, net_config_from_mae
from ctmae.seg.predict import output_name, sidecar_path

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
ISO = (1.5, 1.5, 1.5)
# From scratch, tiny ViT, 32³ crops, narrow decoder: a few seconds of CPU per run.
FAST = [
    "--from-scratch",
    "--model",
    "tiny",
    "--crop",
    "32",
    "--feature-size",
    "8",
    "--batch-size",
    "2",
    "--crops-per-volume",
    "2",
    "--device",
    "cpu",
    "--log-every",
    "1",
]


def run(*args) -> object:
    return CliRunner().invoke(app, ["finetune-seg", *map(str, args)])


def sphere_case(seed: int, shape=(48, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy soft-tissue volume (0 HU ± 60) with one bright sphere (+400 HU) of random centre and radius."""
    rng = np.random.default_rng(seed)
    size = np.asarray(shape)
    centre, radius = rng.uniform(size / 3, 2 * size / 3), rng.uniform(0.13, 0.2) * size.min()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    label = (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.uint8)
    return rng.normal(0.0, 60.0, shape) + 400.0 * label, label


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Six sphere cases as images/caseN.nii.gz and labels/caseN.nii.gz (1.5 mm, axis-aligned)."""
    root = tmp_path_factory.mktemp("phantom")
    for i in range(6):
        image, label = sphere_case(i)
        write_volume(root / "images" / f"case{i}.nii.gz", image, spacing=ISO, direction=IDENTITY)
        write_volume(root / "labels" / f"case{i}.nii.gz", label, spacing=ISO, direction=IDENTITY, dtype=np.uint8)
    return root


def small_pair(root: Path, name: str, image_name: str | None = None, label_suffix: str = ".nii.gz", **label_geometry):
    """Write a 20x18x12 image and its label; ``label_geometry`` overrides the label's spacing/direction/shape."""
    image, label = sphere_case(0, shape=(20, 18, 12))
    shape = label_geometry.pop("shape", None)
    if shape is not None:
        label = np.zeros(shape, np.uint8)
    write_volume(root / "images" / (image_name or f"{name}.nii.gz"), image)
    write_volume(root / "labels" / f"{name}{label_suffix}", label, dtype=np.uint8, **label_geometry)


# --- pairing -------------------------------------------------------------------------------------------------------


def test_pairing_by_name_across_formats_and_channel_suffix(tmp_path):
    small_pair(tmp_path, "a", label_suffix=".nrrd")
    small_pair(tmp_path, "b", image_name="b_0000.nii.gz", label_suffix=".mha")
    small_pair(tmp_path, "c")
    cases = find_cases([tmp_path / "images"], [tmp_path / "labels"])
    assert [c.id for c in cases] == ["a", "b", "c"]
    assert cases[1].image.files[0].endswith("b_0000.nii.gz") and cases[1].label.files[0].endswith("b.mha")
    for case in cases:
        assert check_case(case) == 1


@pytest.mark.parametrize("kind", ["csv", "json", "msd-json"])
def test_pairing_from_datalist(tmp_path, kind):
    small_pair(tmp_path, "a")
    small_pair(tmp_path, "b")
    rows = [{"image": f"images/{n}.nii.gz", "label": f"labels/{n}.nii.gz"} for n in ("a", "b")]
    if kind == "csv":
        listing = tmp_path / "list.csv"
        listing.write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows), encoding="utf-8")
    else:
        listing = tmp_path / "list.json"
        listing.write_text(json.dumps({"training": rows} if kind == "msd-json" else rows), encoding="utf-8")
    cases = find_cases([listing])
    assert [(Path(c.image.files[0]).parent.name, Path(c.label.files[0]).parent.name) for c in cases] == [
        ("images", "labels")
    ] * 2
    assert [c.id for c in cases] == ["a", "b"]


def test_pairing_nnunet_folder(tmp_path):
    for name in ("case_001", "case_002"):
        image, label = sphere_case(1, shape=(20, 18, 12))
        write_volume(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", image)
        write_volume(tmp_path / "labelsTr" / f"{name}.nii.gz", label, dtype=np.uint8)
    cases = find_cases([tmp_path])
    assert [c.id for c in cases] == ["case_001", "case_002"]
    assert all(Path(c.label.files[0]).parent.name == "labelsTr" for c in cases)


def test_unpaired_volumes_are_named(tmp_path):
    small_pair(tmp_path, "a")
    small_pair(tmp_path, "b")
    (tmp_path / "labels" / "b.nii.gz").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\) without a matching label \(e.g. 'b'\)"):
        find_cases([tmp_path / "images"], [tmp_path / "labels"])
    result = run(*FAST, "--images", tmp_path / "images", "--labels", tmp_path / "labels", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "unpaired" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "geometry, what",
    [
        ({"shape": (20, 18, 11)}, "shape"),
        ({"spacing": (0.7, 0.9, 3.0)}, "spacing"),
        ({"direction": IDENTITY}, "direction"),
    ],
)
def test_geometry_mismatch_names_the_pair(tmp_path, geometry, what):
    small_pair(tmp_path, "good")
    small_pair(tmp_path, "bad", **geometry)
    result = run(*FAST, "--images", tmp_path / "images", "--labels", tmp_path / "labels", "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "pair 'bad'" in error[0] and f"label {what}" in error[0], result.output


def test_label_values_must_be_class_indices(tmp_path):
    small_pair(tmp_path, "a")
    write_volume(tmp_path / "labels" / "a.nii.gz", np.full((20, 18, 12), 0.5), dtype=np.float32)
    with pytest.raises(InputError, match="class indices"):
        check_case(find_cases([tmp_path / "images"], [tmp_path / "labels"])[0])


def test_sample_data_pair_passes_checks():
    (case,) = find_cases([SAMPLE_DATA / "ct"], [SAMPLE_DATA / "labels"])
    assert case.id == "lung1" and check_case(case) == 1


def test_split_is_seeded_and_keeps_cases_apart():
    cases = [LabelledCase(str(i), None, None) for i in range(10)]  # type: ignore[arg-type]
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and not {c.id for c in train} & {c.id for c in val}
    assert split_cases(cases, 0.2, seed=3) == (train, val)
    assert split_cases(cases[:1], 0.2, seed=3) == (cases[:1], cases[:1])  # one case: validate on it


# --- the network ---------------------------------------------------------------------------------------------------


def seg_config(mae_cfg, crop: int) -> SegConfig:
    net = net_config_from_mae(mae_cfg.model, feature_size=8, num_classes=2)
    return SegConfig(preprocess=PreprocessConfig(crop=crop), net=net)


@pytest.mark.parametrize("crop", [64, 32])
def test_encoder_transfer_loads_every_encoder_tensor(tiny_checkpoint, crop):
    from ctmae.seg.train import build_segmenter

    state = load_checkpoint(tiny_checkpoint)
    encoder = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
    unetr, loaded = build_segmenter(seg_config(state["config"], crop), state["model"])
    assert loaded == len(encoder) == 149  # 3 embedding tensors, 12 blocks x 12, final norm x 2
    vit = unetr.vit.state_dict()
    for key, value in encoder.items():
        if key == "patch_embedding.position_embeddings":
            value = sincos_embedding_3d(crop // 16, value.shape[-1])  # exact for another crop
        assert torch.equal(vit[key], value), key
    if crop == 64:  # the same network: UNETR's ViT computes what the MAE encoder computes
        mae = build_model(state["config"].model).eval()
        mae.load_state_dict(state["model"])
        x = torch.rand(1, 1, 64, 64, 64)
        with torch.no_grad():
            ours = mae.encoder.forward_features(mae.patchify(x))
            theirs = unetr.vit(x)[0]
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_from_scratch_differs_only_in_init(tiny_checkpoint):
    from ctmae.seg.train import build_segmenter

    state = load_checkpoint(tiny_checkpoint)
    cfg = seg_config(state["config"], 64)
    pretrained, _ = build_segmenter(cfg, state["model"])
    scratch, loaded = build_segmenter(cfg, None)
    a, b = pretrained.state_dict(), scratch.state_dict()
    assert loaded == 0 and list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    vit_differs = [k for k in a if k.startswith("vit.") and not torch.equal(a[k], b[k])]
    assert len(vit_differs) > 100
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("vit."))  # same seed, same decoder


@pytest.mark.parametrize("freeze", [False, True])
def test_layer_decay_and_frozen_encoder_groups(freeze):
    from ctmae.seg.network import param_groups
    from ctmae.seg.train import build_segmenter

    cfg = SegConfig(preprocess=PreprocessConfig(crop=32), net=SegNetConfig(dim=48, heads=4, feature_size=4)).replace(
        train={"freeze_encoder": freeze}
    )
    unetr, _ = build_segmenter(cfg, None)
    groups = param_groups(unetr, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(unetr.named_parameters())
    assert len(lr_of) == sum(p.requires_grad for p in named.values())
    assert lr_of[id(named["out.conv.conv.weight"])] == 1.0  # the decoder learns at the full rate
    if freeze:
        assert not any(k.startswith("vit.") and id(p) in lr_of for k, p in named.items())
    else:
        assert lr_of[id(named["vit.norm.weight"])] == 1.0
        assert lr_of[id(named["vit.blocks.11.mlp.linear1.weight"])] == 0.5
        assert lr_of[id(named["vit.patch_embedding.patch_embeddings.weight"])] == 0.5**13


def test_patch_8_checkpoint_is_refused(tmp_path, phantom):
    from ctmae.mae.config import RunConfig
    from ctmae.mae.train import pretrain
    from ctmae.preprocess.build_cache import build_cache

    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 8},
            "data": {"crop": 32, "workers": 0, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 2, "batch_size": 1},
        }
    )
    good, _ = build_cache(find_volumes([str(phantom / "images" / "case0.nii.gz")])[0], cfg.preprocess)
    pretrain(cfg, good, tmp_path / "mae")
    result = run(
        tmp_path / "mae" / "checkpoints" / "last.pt",
        "--images",
        phantom / "images",
        "--labels",
        phantom / "labels",
        "--out",
        tmp_path / "run",
    )
    assert result.exit_code == 1
    assert "8³ patches; MONAI's UNETR needs 16³" in result.output and "Traceback" not in result.output


def test_large_preset_and_bad_crop_are_refused(tmp_path, phantom):
    pairs = ["--images", phantom / "images", "--labels", phantom / "labels"]
    result = run("--from-scratch", "--model", "large", *pairs, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "24 blocks" in result.output
    result = run("--from-scratch", "--model", "tiny", "--crop", "40", *pairs, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "multiple of 16" in result.output


# --- training, prediction, resume ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_run(phantom, tmp_path_factory) -> Path:
    """A from-scratch fine-tuning on five phantom cases, validated on the sixth."""
    out = tmp_path_factory.mktemp("seg") / "run"
    result = run(
        *FAST,
        "--images",
        phantom / "images",
        "--labels",
        phantom / "labels",
        "--out",
        out,
        "--val-fraction",
        "0.15",
        "--steps",
        "60",
        "--lr",
        "1e-2",
        "--val-every",
        "20",
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_phantom_reaches_high_dice(phantom_run):
    rows = [json.loads(line) for line in (phantom_run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    dice = [r["val_dice"] for r in rows if "val_dice" in r]
    assert len(dice) == 3 and max(dice) > 0.8, dice
    best = load_seg_checkpoint(phantom_run / "checkpoints" / "best.pt")
    assert best["val_dice"] == max(dice) and best["config"].net.num_classes == 2
    assert (phantom_run / "checkpoints" / "last.pt").is_file() and (phantom_run / "config.yaml").is_file()


@pytest.mark.slow
def test_prediction_in_source_geometry(phantom_run, phantom, tmp_path):
    image = sphere_case(7, shape=(40, 44, 30))[0]
    oblique = write_volume(tmp_path / "in" / "oblique.nrrd", image, spacing=(1.2, 1.4, 2.0), direction=OBLIQUE)
    inputs = [phantom / "images" / "case5.nii.gz", oblique]
    result = run(
        "--predict", phantom_run / "checkpoints" / "best.pt", *inputs, "--out", tmp_path / "pred", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    sources, taken = find_volumes(inputs)[0], set()
    written = {s.files[0]: tmp_path / "pred" / output_name(s.id, taken) for s in sources}
    sidecars = [sidecar_path(p) for p in written.values()]  # each label names its values beside it
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(
        p.name for p in [*written.values(), *sidecars]
    )
    assert json.loads(sidecars[0].read_text(encoding="utf-8"))["labels"] == {"0": "background", "1": "class 1"}
    for source in sources:
        image, affine = read_volume(source)
        pred, pred_affine = read_volume(find_volumes([written[source.files[0]]])[0][0])
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred_affine, affine, atol=1e-5)
        assert set(np.unique(pred)) <= {0.0, 1.0}
    truth = sphere_case(5)[1]
    pred = read_volume(find_volumes([written[str(inputs[0])]])[0][0])[0]
    assert 2 * (pred * truth).sum() / (pred.sum() + truth.sum()) > 0.8


def test_output_names_stay_inside_the_folder():
    taken: set[str] = set()
    names = [output_name(i, taken) for i in ("../../etc/x.nii.gz", "a/b.nrrd", "a__b.mha", "ser/ies#1a2b", ".hid")]
    assert names == ["__..__etc__x.nii.gz", "a__b.nii.gz", "a__b_2.nii.gz", "ser__ies.nii.gz", "hid.nii.gz"]
    assert all("/" not in n and not n.startswith(".") for n in names)


@pytest.mark.slow
def test_resume_is_exact(phantom, tmp_path):
    args = [
        *FAST,
        "--images",
        phantom / "images",
        "--labels",
        phantom / "labels",
        "--steps",
        "4",
        "--val-every",
        "2",
        "--lr",
        "1e-3",
    ]
    assert run(*args, "--out", tmp_path / "straight").exit_code == 0
    assert run(*args, "--out", tmp_path / "split", "--stop-at", "2").exit_code == 0
    refused = run(*args, "--out", tmp_path / "split")
    assert refused.exit_code == 2 and "--resume" in refused.output
    assert run(*args, "--out", tmp_path / "split", "--resume").exit_code == 0, "resume failed"
    a = load_seg_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_seg_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    losses = [
        [json.loads(r).get("loss") for r in (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        for d in (tmp_path / "straight", tmp_path / "split")
    ]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_wrong_checkpoint_kinds_are_refused(phantom_run, tiny_checkpoint, phantom, tmp_path):
    result = run("--predict", tiny_checkpoint, phantom / "images" / "case0.nii.gz", "--out", tmp_path / "p")
    assert result.exit_code == 1 and "MAE pretraining checkpoint" in result.output
    result = run(
        phantom_run / "checkpoints" / "best.pt",
        "--images",
        phantom / "images",
        "--labels",
        phantom / "labels",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 1 and "a fine-tuned segmentation checkpoint" in result.output


@pytest.mark.slow
def test_prediction_never_overwrites_an_input(phantom_run, phantom, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / "case0.nii.gz"
    scan.write_bytes((phantom / "images" / "case0.nii.gz").read_bytes())
    before = scan.read_bytes()
    result = run("--predict", phantom_run / "checkpoints" / "best.pt", scan, "--out", scans)
    assert result.exit_code == 1 and "never overwrites inputs" in result.output
    assert scan.read_bytes() == before


ABDOMEN_LABELS = SAMPLE_DATA / "organs" / "abdomen_upper.nii.gz"
TOP_ORGAN = 117  # the largest class present in the bundled organ map (TotalSegmentator v2 "total")


def test_sample_abdomen_organ_map_fits_its_slab_and_names_its_organs():
    """The bundled organ map lies on the held-out abdominal slab's grid and its names file resolves organs by name."""
    from ctmae.seg.label_names import read_names

    (case,) = find_cases([SAMPLE_DATA / "demo" / "heldout" / "abdomen_upper.nii.gz"], [ABDOMEN_LABELS])
    assert check_case(case) == TOP_ORGAN
    (ct, ct_affine), (labels, label_affine) = read_volume(case.image), read_volume(case.label)
    assert ct.shape == labels.shape == (122, 101, 30) and np.allclose(ct_affine, label_affine)
    names = read_names(ABDOMEN_LABELS.parent / "labels.json")
    present = {names[v] for v in np.unique(labels) if v}
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= present and len(present) == 41
    # the slab continues the pretraining slab of the same patient: 82 slices of 3 mm further up
    _, lower_affine = read_volume(find_volumes([SAMPLE_DATA / "demo" / "pretrain" / "abdomen_lower.nii.gz"])[0][0])
    assert np.allclose(ct_affine[:3, 3] - lower_affine[:3, 3], lower_affine[:3, 2] * 82)
