"""`ctmae evaluate` and the in-training monitor: the case split, the probe on a phantom whose answer is known, the
recon fills on a smooth volume, each protocol on real and synthetic scans, the report files, resume, stop signals,
each bad input's one line and exit code, and probe/preview rows written while pretraining."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import SAMPLE_DATA, write_volume
from ctmae.cli import app
from ctmae.experiments.evaluate import EvalSettings, Progress, check_cases, load_subjects, run_evaluation, split_cases
from ctmae.experiments.evaluate.cases import PreparedCases, shot_subset
from ctmae.experiments.evaluate.probe import intensity_featurizer, run_probe
from ctmae.experiments.evaluate.recon import Tally, masked_errors, run_recon
from ctmae.mae.checkpoint import load_checkpoint, model_from_checkpoint
from ctmae.mae.config import MaskConfig, RunConfig
from ctmae.mae.model import build_model
from ctmae.runtime.checkpoint import SEG_FORMAT, save_checkpoint
from ctmae.seg.data import find_cases

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
ISO = (1.5, 1.5, 1.5)
P = 16  # patch edge of the tiny checkpoint
runner = CliRunner()


def rods_and_cubes(seed: int, grid: int = 4, rods: int = 1, cubes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A (grid·16)³ soft-tissue volume (0 HU, noise 20) holding rods (1x1x3 tokens) and cubes (1 token), all +300 HU
    and aligned to the 16³ token grid, no two touching by a face. Label: the rods. A token inside a rod and one
    inside a cube hold the same voxel distribution; only their neighbours tell them apart."""
    rng = np.random.default_rng(seed)
    n = grid * P
    image, label = rng.normal(0.0, 20.0, (n, n, n)), np.zeros((n, n, n), np.uint8)
    taken = np.zeros((grid + 2,) * 3, bool)  # token occupancy with a border of one
    for is_rod in [True] * rods + [False] * cubes:
        for _ in range(500):
            size = [1, 1, 1]
            if is_rod:
                size[rng.integers(3)] = 3
            start = [int(rng.integers(0, grid - s + 1)) for s in size]
            box = tuple(slice(a + 1, a + s + 1) for a, s in zip(start, size))
            faces = [
                tuple(
                    slice(a + 1 + d * (i == ax), a + s + 1 + d * (i == ax)) for i, (a, s) in enumerate(zip(start, size))
                )
                for ax in range(3)
                for d in (-1, 1)
            ]
            if taken[box].any() or any(taken[f].any() for f in faces):
                continue
            taken[box] = True
            voxels = tuple(slice(a * P, (a + s) * P) for a, s in zip(start, size))
            image[voxels] += 300.0
            label[voxels] = 1 if is_rod else 0
            break
    return image, label


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, **geometry) -> None:
    write_volume(root / "images" / f"{name}.nii.gz", image, spacing=ISO, direction=IDENTITY)
    write_volume(
        root / "labels" / f"{name}.nii.gz", label, dtype=np.uint8, **{"spacing": ISO, "direction": IDENTITY, **geometry}
    )


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Six rods-and-cubes cases, images/caseN.nii.gz and labels/caseN.nii.gz."""
    root = tmp_path_factory.mktemp("phantoms")
    for i in range(6):
        write_case(root, f"case{i}", *rods_and_cubes(i))
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Three small rods-and-cubes cases (48³): the command-line tests' dataset."""
    root = tmp_path_factory.mktemp("small")
    for i in range(3):
        write_case(root, f"case{i}", *rods_and_cubes(i, grid=3, cubes=3))
    return root


@pytest.fixture(scope="module")
def lung_pair(tmp_path_factory) -> Path:
    """The sample chest CT and its left-right mirror image (the same patient mirrored, tumour in the other lung),
    with labels: two real labelled cases."""
    root = tmp_path_factory.mktemp("lungs")
    for kind in ("ct", "labels"):
        image = nib.load(SAMPLE_DATA / kind / "lung1.nii.gz")
        folder = root / ("images" if kind == "ct" else "labels")
        folder.mkdir()
        nib.save(image, folder / "lung1.nii.gz")
        mirrored = np.asarray(image.dataobj)[::-1].copy()
        nib.save(nib.Nifti1Image(mirrored, image.affine, image.header), folder / "lung1_mirrored.nii.gz")
    return root


def _cases(root: Path):
    return find_cases([root / "images"], [root / "labels"])


def _evaluate(*args) -> object:
    return runner.invoke(app, ["evaluate", *map(str, args)])


FAST = ["--device", "cpu", "--crop", "32", "--feature-size", "8", "--steps", "1", "--repeats", "1", "--windows", "1"]


# --- the case split ---------------------------------------------------------------------------------------------


def test_test_cases_are_fixed_by_the_seed_and_disjoint_from_training(phantoms):
    cases = _cases(phantoms)
    test, pool = split_cases(cases, None, 2, seed=3)
    assert (test, pool) == split_cases(list(reversed(cases)), None, 2, seed=3)  # order of the inputs does not matter
    assert len(test) == 1 and len(pool) == 5 and not {c.id for c in test} & {c.id for c in pool}
    assert shot_subset(pool, 2, 1, 0) == shot_subset(pool, 2, 1, 0) and len(shot_subset(pool, 2, 1, 0)) == 2
    with pytest.raises(ValueError, match="lower --shots"):
        split_cases(cases, 2, 5, seed=0)


def test_several_checkpoints_share_their_baselines_and_keep_apart_names(tiny_checkpoint, tmp_path):
    copy = tmp_path / "other" / "last.pt"
    copy.parent.mkdir()
    copy.write_bytes(tiny_checkpoint.read_bytes())
    cfg = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}})
    patch8 = tmp_path / "patch8.pt"
    save_checkpoint({"config": cfg.to_dict(), "model": build_model(cfg.model).state_dict(), "step": 0}, patch8)
    subjects = load_subjects([tiny_checkpoint, copy, patch8], EvalSettings(protocols=("probe",)))
    assert [s.slug for s in subjects] == ["ckpt0", "ckpt1", "ckpt2", "scratch0", "scratch1", "intensity0", "intensity1"]
    labels = [s.label for s in subjects]
    assert len(set(labels)) == len(labels) and labels[1] == "other/last.pt" and labels[2] == "patch8.pt"
    assert subjects[0].sha256 == subjects[1].sha256 and subjects[3].label == "scratch (tiny) like checkpoints/last.pt"


# --- the probe: a phantom whose answer is known -------------------------------------------------------------------


def _context_features(volume: torch.Tensor) -> torch.Tensor:
    """A fixed feature that sees context: each token's mean intensity and how many of its six face neighbours are
    bright (zero padding outside the volume). (2, gx, gy, gz)."""
    mean = intensity_featurizer(P)(volume)[:1]  # (1, gx, gy, gz)
    bright = F.pad((mean > 0.575).float(), (1, 1, 1, 1, 1, 1))  # 0 HU -> 0.5, +300 HU -> 0.65 in window units
    g = mean.shape[1:]
    shifts = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    neighbours = sum(bright[:, 1 + a : 1 + a + g[0], 1 + b : 1 + b + g[1], 1 + c : 1 + c + g[2]] for a, b, c in shifts)
    return torch.cat([mean, neighbours])


def test_intensity_floor_fails_where_features_with_context_succeed(phantoms):
    """Rods (the label) and cubes of the same HU, both aligned to the token grid, so a token inside either holds the
    same voxels. This proves two things about the probe protocol: (a) the raw-intensity floor cannot beat the trivial
    answer "every bright token is a rod" (it cannot tell the structures apart), and (b) the probe machinery itself
    (token class shares, the balanced linear fit, upsampling, per-class Dice on held-out cases) separates them as soon
    as the features carry context, here a fixed feature counting bright neighbours. It does not show that any
    encoder learns such context: that is what the protocol measures."""
    cfg = RunConfig.from_dict({"model": {"size": "tiny"}, "data": {"crop": 64}})
    prepared = PreparedCases().get(cfg.preprocess, _cases(phantoms))
    train, test = prepared[:4], prepared[4:]
    bright = [(c.image.as_tensor()[0] > 0.575) for c in test]
    trivial = np.mean(
        [
            2 * (b & (c.label[0] == 1)).sum().item() / (b.sum() + (c.label == 1).sum()).item()
            for b, c in zip(bright, test)
        ]
    )
    floor = run_probe(intensity_featurizer(P), train, test, 2, P)
    context = run_probe(_context_features, train, test, 2, P)
    assert 0.3 < trivial < 0.5
    assert floor.dice <= trivial + 0.05, (floor.dice, trivial)
    assert context.dice >= 0.75 and context.dice >= floor.dice + 0.3, (context.dice, floor.dice)
    assert set(context.per_case) == {c.id for c in test} and context.features == 2 and floor.features == 7


def test_probe_runs_on_real_scans_with_a_checkpoint(lung_pair, tiny_checkpoint):
    """Real CT: the probe fits on one case and scores the mirrored one, for the encoder and the floor."""
    from ctmae.experiments.evaluate.probe import encoder_featurizer
    from ctmae.infer.sliding import load_model

    loaded = load_model(tiny_checkpoint, "cpu")
    train, test = PreparedCases().get(loaded.cfg.preprocess, _cases(lung_pair))
    for featurize, width in ((encoder_featurizer(loaded, 4), loaded.cfg.model.dim), (intensity_featurizer(P), 7)):
        result = run_probe(featurize, [train], [test], 2, P, steps=50)
        assert 0.0 <= result.dice <= 1.0 and result.features == width
        assert result.tokens == int(np.prod([-(-n // P) for n in train.image.shape[1:]]))
        assert list(result.per_case) == [test.id]


# --- recon --------------------------------------------------------------------------------------------------------


def _smooth(seed: int, crop: int = 32) -> torch.Tensor:
    """(1, 1, c, c, c) values in 0..1 varying smoothly over ~8 voxels (upsampled noise)."""
    noise = torch.rand(1, 1, crop // 8 + 3, crop // 8 + 3, crop // 8 + 3, generator=torch.Generator().manual_seed(seed))
    up = F.interpolate(noise, size=(crop + 24,) * 3, mode="trilinear", align_corners=True)
    return up[..., 12 : 12 + crop, 12 : 12 + crop, 12 : 12 + crop]


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_fill_beats_mean_fill_on_a_smooth_volume_more_under_random_masks(seed):
    """Under random masks a hidden 8³ patch has visible neighbours, so interpolation fills it well (3 dB over the
    mean); under block masks of 2³ patches its gain is smaller: block masking is not solved by interpolation."""
    volume, gain = _smooth(seed), {}
    for kind in ("random", "block"):
        tally = Tally()
        for s in range(3):
            tally.add(masked_errors(volume, MaskConfig(kind=kind, ratio=0.75, block=2), s, patch=8))
        gaussian = max(tally.psnr(f"gaussian_{sigma:g}") for sigma in (1, 2, 4, 8))
        gain[kind] = gaussian - tally.psnr("mean")
        assert tally.voxels == 3 * round(0.75 * 64) * 8**3  # exactly the hidden tokens' voxels
    assert gain["random"] > 2.0 and gain["random"] > gain["block"] + 0.5, gain


def test_recon_protocol_scores_the_mae_and_the_fills_under_the_same_masks(small, tiny_checkpoint):
    state = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(state).eval()
    test = PreparedCases().get(state["config"].preprocess, _cases(small)[:1])
    result = run_recon(model, state["config"].mask, test, windows=1, seed=0, device=torch.device("cpu"))
    for kind in ("block", "random"):
        figures = result[kind]
        assert figures["voxels"] == round(0.75 * 64) * P**3  # one 64³ crop of 4³ tokens, 48 hidden
        assert all(isinstance(figures[m], float) for m in ("mae", "gaussian", "mean"))
        assert figures["gaussian"] == max(v for v in figures["gaussian_by_sigma"].values())
    assert set(result["per_case"]) == {c.id for c in test}


def test_recon_protocol_gives_a_fill_context_model_the_scan_around_each_crop():
    """A model pretrained with fill context is scored as reconstruct runs it: each crop comes with the scan around
    it (hidden in blocks like the crop), which its fills and the gaussian fills read, so a block cut by the crop's
    edge is filled from both sides; the hidden voxels scored are those of any checkpoint of the same crop size."""
    from monai.data import MetaTensor

    from ctmae.experiments.evaluate.cases import Prepared

    model_cfg = {"size": "tiny", "patch": 8, "depth": 2, "fill_sigma": 8.0, "fill_queries": True}
    cfg = RunConfig.from_dict({"model": {**model_cfg, "fill_context": 16}, "preprocess": {"crop": 32}})
    torch.manual_seed(0)
    context = build_model(cfg.model).eval()  # untrained: its residual head starts at 0, so it is its own fill
    plain = build_model(cfg.replace(model={"fill_context": 0}).model).eval()
    plain.load_state_dict(context.state_dict())  # the same weights, fills from the crop alone
    ramp = torch.linspace(0, 1, 96)
    volume = 0.5 * ramp[:, None, None] + 0.3 * ramp[None, :, None] + 0.2 * ramp[None, None, :]  # (96, 96, 96)
    case = Prepared("ramp", MetaTensor(volume[None]), torch.zeros(1, 96, 96, 96, dtype=torch.uint8))
    mask = MaskConfig(kind="block", ratio=0.75, block=2)
    scores = {
        name: run_recon(m, mask, [case], windows=3, seed=0, device=torch.device("cpu"))["block"]
        for name, m in (("context", context), ("plain", plain))
    }
    assert scores["context"]["voxels"] == scores["plain"]["voxels"] == 3 * round(0.75 * 64) * 8**3
    # interpolated across a hidden block, not extrapolated from one side (+4 to +6 dB measured)
    assert scores["context"]["gaussian"] > scores["plain"]["gaussian"] + 2.0, scores
    assert scores["context"]["mae"] > scores["plain"]["mae"] + 2.0, scores


# --- the command: report, resume, stop ----------------------------------------------------------------------------


def test_evaluate_writes_the_report_and_resume_skips_finished_units(small, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "report"
    result = _evaluate(
        tiny_checkpoint,
        "--images",
        small / "images",
        "--labels",
        small / "labels",
        "--out",
        out,
        "--protocols",
        "probe,recon",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    test_ids = [c.id for c in split_cases(_cases(small), None, 1, 0)[0]]
    assert report["complete"] and report["cases"]["test"] == test_ids and len(report["cases"]["train_pool"]) == 2
    assert [s["kind"] for s in report["subjects"]] == ["pretrained", "scratch", "intensity"]
    assert report["subjects"][0]["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert set(report["probe"]) == {"ckpt0", "scratch0", "intensity0"} and set(report["recon"]) == {"ckpt0"}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Frozen probe" in md and "## Reconstruction" in md and f"{report['probe']['ckpt0']['dice']:.3f}" in md
    assert "tokens: the training cases' patch tokens the linear probe was fitted on" in " ".join(md.split())
    rows = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "protocol,encoder,shots,repeat,case,measure,value" and len(rows) == 1 + 3 + 2 * 3
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "report.png")))
    assert png.ndim == 3 and png.shape[2] == 3 and len(np.unique(png.reshape(-1, 3), axis=0)) > 4

    journal = (out / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "journal.jsonl").write_text(
        "\n".join(journal[:-2]) + "\n", encoding="utf-8"
    )  # as if killed before the last two units
    ran = []
    from ctmae.experiments.evaluate import runner as runner_module

    original = runner_module._Worker.run
    monkeypatch.setattr(
        runner_module._Worker, "run", lambda self, unit, tick: ran.append(unit.id) or original(self, unit, tick)
    )
    result = _evaluate(
        tiny_checkpoint,
        "--images",
        small / "images",
        "--labels",
        small / "labels",
        "--out",
        out,
        "--protocols",
        "probe,recon",
        "--resume",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert ran == [json.loads(line)["unit"] for line in journal[-2:]]
    assert (out / "journal.jsonl").read_text(encoding="utf-8").splitlines()[:-2] == journal[:-2]
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["probe"] == report["probe"]


def test_a_stop_signal_keeps_finished_units_and_resume_finishes(small, tiny_checkpoint, tmp_path):
    """SIGTERM in the middle of a unit: it is dropped, earlier units stay, the report says incomplete, --resume ends."""
    settings = EvalSettings(protocols=("probe",), device="cpu")
    subjects = load_subjects([tiny_checkpoint], settings)
    test, pool = split_cases(_cases(small), None, 1, 0)
    cases = check_cases(test, pool)
    ticks = []

    def tick(n: int) -> None:
        ticks.append(n)
        if len(ticks) == 5:  # within the second unit (three cases each)
            os.kill(os.getpid(), signal.SIGTERM)

    report = run_evaluation(settings, subjects, cases, tmp_path, progress=Progress(tick=tick))
    assert report["stopped"] == "SIGTERM" and not report["interrupted"]
    assert not report["complete"] and list(report["probe"]) == ["ckpt0"]
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["units_done"] == 1
    report = run_evaluation(settings, subjects, cases, tmp_path, resume=True)
    assert report["complete"] and report["stopped"] is None and len(report["probe"]) == 3


def test_the_scratch_probe_is_the_mean_over_several_random_encoders(small, tiny_checkpoint, tmp_path):
    """One random initialisation is a noisy yardstick: the scratch row averages probe_draws of them, draw 0 being
    the single draw's encoder, and says their range; the pretrained row stays one probe."""
    test, pool = split_cases(_cases(small), None, 1, 0)
    cases = check_cases(test, pool)
    reports = {}
    for draws in (1, 3):
        settings = EvalSettings(protocols=("probe",), device="cpu", probe_draws=draws)
        subjects = load_subjects([tiny_checkpoint], settings)
        reports[draws] = run_evaluation(settings, subjects, cases, tmp_path / str(draws))
    one, three = reports[1]["probe"]["scratch0"], reports[3]["probe"]["scratch0"]
    assert one["draws"] == [] and len(set(three["draws"])) == 3 and three["draws"][0] == pytest.approx(one["dice"])
    assert three["dice"] == pytest.approx(sum(three["draws"]) / 3)
    assert reports[3]["probe"]["ckpt0"] == reports[1]["probe"]["ckpt0"]
    low, high = min(three["draws"]), max(three["draws"])
    md = (tmp_path / "3" / "report.md").read_text(encoding="utf-8")
    assert f"scratch (tiny), mean of 3 draws (each {low:.3f} to {high:.3f}) | {three['dice']:.3f} |" in md


@pytest.mark.slow
def test_fewshot_runs_pretrained_and_scratch_on_identical_subsets(small, tiny_checkpoint, tmp_path):
    """Two test cases: the run's own validation (mean over them) agrees with the per-case scores of its last model."""
    out = tmp_path / "report"
    args = ["--images", small / "images", "--labels", small / "labels", "--out", out, "--test-cases", "2"]
    result = _evaluate(tiny_checkpoint, *args, "--protocols", "fewshot", "--shots", "1", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    test_ids = report["cases"]["test"]
    assert set(report["fewshot"]) == {"ckpt0", "scratch0"} and len(test_ids) == 2
    pre, scratch = (report["fewshot"][s]["1"] for s in ("ckpt0", "scratch0"))
    for entry in (pre, scratch):
        run = entry["runs"][0]
        assert entry["n"] == 1 and entry["sd"] is None and 0.0 <= entry["mean"] <= 1.0
        assert run["train_cases"] == report["cases"]["train_pool"] and sorted(run["per_case"]) == test_ids
        per_case_mean = np.mean([d[0] for d in run["per_case"].values()])
        assert per_case_mean == pytest.approx(run["dice_per_class"][0], abs=1e-5)
    assert pre["runs"][0]["train_cases"] == scratch["runs"][0]["train_cases"]
    run_dir = out / "fewshot" / "ckpt0" / "k1_r0"
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "checkpoints").exists()
    assert "## Few-shot fine-tuning" in (out / "report.md").read_text(encoding="utf-8")


# --- bad inputs: one line, exit code, partial work kept ------------------------------------------------------------


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_too_few_cases_for_the_shots_is_a_usage_error(small, tiny_checkpoint, tmp_path):
    result = _evaluate(
        tiny_checkpoint,
        "--images",
        small / "images",
        "--labels",
        small / "labels",
        "--out",
        tmp_path / "r",
        "--shots",
        "1,3",
        *FAST,
    )
    assert result.exit_code == 2 and "3 labelled case(s)" in _one_error_line(result)
    assert not (tmp_path / "r").exists()


def test_label_geometry_differing_from_the_image_is_named(tmp_path, tiny_checkpoint):
    for i in range(3):
        write_case(tmp_path, f"case{i}", *rods_and_cubes(i), spacing=(1.5, 1.5, 2.0) if i == 1 else ISO)
    result = _evaluate(
        tiny_checkpoint,
        "--images",
        tmp_path / "images",
        "--labels",
        tmp_path / "labels",
        "--out",
        tmp_path / "r",
        "--protocols",
        "probe",
        *FAST,
    )
    line = _one_error_line(result)
    assert result.exit_code == 1 and "'case1'" in line and "spacing" in line and "differs" in line


def test_a_class_only_test_cases_hold_is_refused(tmp_path, tiny_checkpoint):
    names = [f"case{i}" for i in range(3)]
    test_name = split_cases([type("C", (), {"id": n})() for n in names], None, 1, 0)[0][0].id
    for i, name in enumerate(names):
        image, label = rods_and_cubes(i)
        write_case(tmp_path, name, image, np.where(label == 1, 2 if name == test_name else 1, 0).astype(np.uint8))
    result = _evaluate(
        tiny_checkpoint,
        "--images",
        tmp_path / "images",
        "--labels",
        tmp_path / "labels",
        "--out",
        tmp_path / "r",
        "--protocols",
        "probe",
        *FAST,
    )
    line = _one_error_line(result)
    assert result.exit_code == 1 and f"{test_name}.nii.gz: holds class 2, which no training case holds" in line


def test_a_segmentation_checkpoint_is_refused(small, tmp_path):
    seg = tmp_path / "best.pt"
    save_checkpoint({"config": {}, "model": {}, "step": 1}, seg, fmt=SEG_FORMAT)
    result = _evaluate(seg, "--images", small / "images", "--labels", small / "labels", "--out", tmp_path / "r")
    line = _one_error_line(result)
    assert result.exit_code == 1 and "segmentation checkpoint, not an MAE pretraining checkpoint" in line


def test_an_encoder_unetr_cannot_hold_skips_fewshot_but_keeps_probe_and_recon(small, tmp_path):
    cfg = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}})
    ckpt = tmp_path / "patch8.pt"
    save_checkpoint({"config": cfg.to_dict(), "model": build_model(cfg.model).state_dict(), "step": 0}, ckpt)
    out = tmp_path / "r"
    result = _evaluate(
        ckpt,
        "--images",
        small / "images",
        "--labels",
        small / "labels",
        "--out",
        out,
        "--protocols",
        "probe,fewshot,recon",
        *FAST,
    )
    assert (
        result.exit_code == 1 and "16³" in _one_error_line(result) and "few-shot fine-tuning skipped" in result.output
    )
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["complete"] and not report["fewshot"] and set(report["probe"]) == {"ckpt0", "scratch0", "intensity0"}
    assert report["recon"]["ckpt0"]["block"]["mae"] is not None and report["problems"]


def test_resume_with_other_settings_and_a_nonempty_folder_are_usage_errors(small, tiny_checkpoint, tmp_path):
    out = tmp_path / "r"
    base = [tiny_checkpoint, "--images", small / "images", "--labels", small / "labels", "--out", out]
    assert _evaluate(*base, "--protocols", "recon", *FAST).exit_code == 0
    result = _evaluate(*base, "--protocols", "recon", *FAST)
    assert result.exit_code == 2 and "not empty" in _one_error_line(result)
    result = _evaluate(*base, "--protocols", "recon", "--resume", "--seed", "1", *FAST)
    assert result.exit_code == 2 and "other" in _one_error_line(result)


# --- the in-training monitor ----------------------------------------------------------------------------------------


def _pretrain(*args) -> object:
    return runner.invoke(app, ["pretrain", *map(str, args)])


PRETRAIN = ["--model", "tiny", "--crop", "64", "--steps", "4", "--batch-size", "1", "--device", "cpu", "--workers", "0"]


@pytest.mark.slow
def test_pretraining_logs_probe_dice_and_previews_without_changing_training(small, tmp_path):
    cache = ["--cache-dir", tmp_path / "cache"]
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    result = _pretrain(
        small / "images",
        "--out",
        watched,
        *PRETRAIN,
        *cache,
        "--probe-images",
        small / "images",
        "--probe-labels",
        small / "labels",
        "--probe-every",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert _pretrain(small / "images", "--out", plain, *PRETRAIN, *cache, "--preview-every", "0").exit_code == 0
    rows = [json.loads(line) for line in (watched / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    probes = [r for r in rows if "probe_dice" in r]
    assert [r["step"] for r in probes] == [2, 4] and all(0.0 <= r["probe_dice"] <= 1.0 for r in probes)
    assert all("preview_psnr_masked" in r for r in probes)
    assert sorted(p.name for p in (watched / "previews").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses == [
        json.loads(line)["loss"] for line in (plain / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert not (plain / "previews").exists()


def test_a_preview_of_the_first_training_scan_by_default(small, tmp_path):
    """No labels: a preview every ``train.ckpt_every`` steps; no probe rows."""
    from ctmae.experiments.monitor import TrainingMonitor
    from ctmae.io.discovery import find_volumes
    from ctmae.mae.train import pretrain
    from ctmae.preprocess.build_cache import build_cache

    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny"},
            "data": {"crop": 64, "workers": 0, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 2, "batch_size": 1, "ckpt_every": 1, "log_every": 1, "device": "cpu"},
        }
    )
    sources, _ = build_cache(find_volumes([str(small / "images" / "case0.nii.gz")])[0], cfg.preprocess)
    monitor = TrainingMonitor.for_run(cfg, tmp_path / "run", sources[0])
    pretrain(cfg, sources, tmp_path / "run", monitor=monitor)
    assert sorted(p.name for p in (tmp_path / "run" / "previews").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "preview_psnr_masked" in r] == [1, 2] and not any(
        "probe_dice" in r for r in rows
    )
