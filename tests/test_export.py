"""``ctmae export`` / ``ctmae info`` / ``ctmae.load_encoder``: the exported encoder is the trained one (MONAI's ViT
from config.json gives ctmae's features), the MONAI bundle runs through ``monai.bundle``, nothing private leaks, bad
inputs are refused in one line, and inputs that break the preprocessing contract are warned about."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR, ViT
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ctmae
from conftest import SAMPLE_DATA, write_dicom_series, write_volume
from ctmae.cli import app
from ctmae.io.discovery import find_volumes
from ctmae.mae.blocks import sincos_embedding_3d
from ctmae.mae.checkpoint import load_checkpoint, model_from_checkpoint
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.contract import input_warnings, preprocessing_of, read_summary
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.runtime.checkpoint import CheckpointError

FEATURE_ATOL = 1e-5  # fp32: MONAI's ViT and ctmae's encoder differ only in the order of floating-point operations
LUNG = SAMPLE_DATA / "ct" / "lung1.nii.gz"
TRAINED = preprocessing_of(PreprocessConfig(crop=64))  # the tiny checkpoint's preprocessing: 1.5 mm, -1000..1000 HU
runner = CliRunner()


def _run(*args: object):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint exported in both formats through the CLI."""
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("safetensors", "monai-bundle"):
        result = _run("export", tiny_checkpoint, "--out", root / fmt, "--format", fmt)
        assert result.exit_code == 0, result.output
    return {"safetensors": root / "safetensors", "monai-bundle": root / "monai-bundle"}


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    """A segmentation checkpoint as finetune-seg writes it (tiny UNETR, weights as initialised)."""
    from ctmae.seg.config import SegConfig, SegNetConfig
    from ctmae.seg.network import build_unetr, save_seg_checkpoint

    net = SegNetConfig(size="tiny", dim=96, heads=4)
    cfg = SegConfig(preprocess=PreprocessConfig(crop=32), net=net, pretrained="mae.pt")
    path = tmp_path_factory.mktemp("seg") / "best.pt"
    state = {"config": cfg.to_dict(), "model": build_unetr(cfg.net, 32).state_dict(), "step": 3, "best_dice": 0.25}
    save_seg_checkpoint({**state, "encoder_tensors": 173}, path)
    return path


@pytest.fixture(scope="module")
def lung_crop(tiny_checkpoint) -> tuple[torch.Tensor, torch.nn.Module]:
    """The sample scan preprocessed by the checkpoint's chain: its central 64³ crop (1, 1, 64, 64, 64); the MAE."""
    state = load_checkpoint(tiny_checkpoint)
    volume = preprocess_transforms(state["config"].preprocess)({"image": [str(LUNG)]})["image"].as_tensor()
    starts = [(n - 64) // 2 for n in volume.shape[1:]]
    crop = volume[:, starts[0] : starts[0] + 64, starts[1] : starts[1] + 64, starts[2] : starts[2] + 64]
    return crop[None].contiguous(), model_from_checkpoint(state).eval()


# --- the exported encoder is the trained one -----------------------------------------------------------------------


def test_vit_built_from_config_json_gives_ctmae_encoder_features(lung_crop, exports):
    folder = exports["safetensors"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vit = ViT(**config["architecture"]).eval()
    vit.load_state_dict(load_file(folder / "encoder.safetensors"))  # strict: every tensor, nothing else
    crop, mae = lung_crop
    with torch.no_grad():
        ours = mae.encoder.forward_features(mae.patchify(crop))  # (1, 64, 96)
        theirs, _ = vit(crop)
    assert theirs.shape == (1, 64, 96)
    torch.testing.assert_close(theirs, ours, atol=FEATURE_ATOL, rtol=0)
    assert config["preprocessing"]["spacing"] == [1.5, 1.5, 1.5] and config["preprocessing"]["crop"] == 64
    assert config["training"]["step"] == 4 and config["training"]["mask"]["kind"] == "block"
    assert isinstance(config["training"]["final_loss"], float)  # from the run's metrics.jsonl
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert config["weights"]["sha256"] in card and "HU window -1000..1000" in card


@pytest.mark.parametrize("source", ["checkpoint", "safetensors", "monai-bundle"])
def test_load_encoder_and_unetr_from_each_source(tiny_checkpoint, exports, lung_crop, source):
    path = tiny_checkpoint if source == "checkpoint" else exports[source]
    crop, mae = lung_crop
    vit = ctmae.load_encoder(path)
    assert isinstance(vit, ViT) and not vit.training
    with torch.no_grad():
        torch.testing.assert_close(vit(crop)[0], mae.encoder.forward_features(mae.patchify(crop)), atol=1e-5, rtol=0)
    unetr = ctmae.load_unetr(path, num_classes=3)
    assert isinstance(unetr, UNETR)
    for key, value in vit.state_dict().items():
        assert torch.equal(unetr.vit.state_dict()[key], value), key
    if source == "safetensors":  # one forward pass is enough: the networks are the same (32³ to keep it cheap)
        with torch.no_grad():
            assert ctmae.load_unetr(path, 2, img_size=32)(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_load_encoder_for_another_crop_recomputes_the_position_table(exports):
    vit = ctmae.load_encoder(exports["safetensors"], img_size=32)
    table = vit.patch_embedding.position_embeddings
    assert torch.equal(table, sincos_embedding_3d(2, 96))
    assert vit(torch.rand(1, 1, 32, 32, 32))[0].shape == (1, 8, 96)


@pytest.mark.slow
def test_bundle_runs_through_monai_bundle_on_the_sample_scan(tiny_checkpoint, exports, tmp_path):
    from monai.bundle import ConfigParser, run

    from ctmae.infer.embed import token_features
    from ctmae.infer.sliding import load_model, preprocess

    bundle = exports["monai-bundle"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    assert isinstance(parser.get_parsed_content("network"), ViT)
    out = tmp_path / "tokens.npy"
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        bundle_root=str(bundle),
        input_image=str(LUNG),
        output_path=str(out),
    )
    tokens = np.load(out)
    loaded = load_model(tiny_checkpoint, "cpu")
    sources, _ = find_volumes([LUNG])
    volume = preprocess(sources[0], preprocess_transforms(loaded.cfg.preprocess)).as_tensor()
    expected = token_features(loaded, volume, 2)
    # (D, gx, gy, gz): the RAS body box of lung1 at 1.5 mm (195 x 145 x 158 voxels) padded to whole 16³ patches
    assert tokens.shape == tuple(expected.shape) == (96, 13, 10, 10)
    np.testing.assert_allclose(tokens, expected.numpy(), atol=1e-4)  # MONAI's nibabel reader vs ctmae's SimpleITK


@pytest.mark.slow
def test_export_of_a_dicom_trained_model_holds_no_dicom_tags(tmp_path):
    from ctmae.mae.config import RunConfig
    from ctmae.mae.train import pretrain
    from ctmae.preprocess.build_cache import build_cache

    name, pid = "Doe^Jane", "PID-48151623"
    body = np.full((40, 40, 36), -1000, np.int16)
    body[4:36, 4:36, 3:33] = np.random.default_rng(0).integers(-200, 300, (32, 32, 30))
    write_dicom_series(tmp_path / "series", body, spacing=(1.5, 1.5, 1.5), patient_name=name, patient_id=pid)
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny"},
            "data": {"crop": 32, "workers": 0, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 2, "batch_size": 1, "log_every": 1},
        }
    )
    good, problems = build_cache(find_volumes([tmp_path / "series"])[0], cfg.preprocess)
    assert good and not problems
    pretrain(cfg, good, tmp_path / "run")
    files = []
    for fmt in ("safetensors", "monai-bundle"):
        result = _run("export", tmp_path / "run" / "checkpoints" / "last.pt", "--out", tmp_path / fmt, "--format", fmt)
        assert result.exit_code == 0, result.output
        files += [p for p in (tmp_path / fmt).rglob("*") if p.is_file()]
    assert len(files) == 8
    for path in files:
        data = path.read_bytes()
        for secret in (name, "Doe", pid, "ctmae test series", str(tmp_path)):
            assert secret.encode() not in data, (path, secret)


def test_probe_and_evaluation_figures_reach_the_card_but_case_ids_do_not(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run_dir / "checkpoints" / "last.pt")
    rows = (tiny_checkpoint.parent.parent / "metrics.jsonl").read_text(encoding="utf-8")
    probe = {"step": 4, "probe_dice": 0.41, "probe_dice_1": 0.41, "preview_psnr_masked": 12.5}
    rows += json.dumps(probe) + "\n" + json.dumps({"step": 9, "loss": 7.0}) + "\n"
    (run_dir / "metrics.jsonl").write_text(
        rows, encoding="utf-8"
    )  # the row after the checkpoint's step 4 is not its figure
    report = {  # the layout of ctmae evaluate's report.json, with per-case figures keyed by case id
        "settings": {"seed": 0, "shots": [1, 2]},
        "cases": {"test": ["smith_john", "case7.nii.gz"]},
        "probe": {"ckpt0": {"dice": 0.41, "per_case": {"smith_john": 0.5, "case7.nii.gz": 0.3}}},
        "fewshot": {"ckpt0": {"1": {"runs": [{"repeat": 0, "dice": 0.2}], "n": 1, "mean": 0.2, "sd": None}}},
    }
    (run_dir / "report.json").write_text(json.dumps(report), encoding="utf-8")
    result = _run("export", run_dir / "checkpoints" / "last.pt", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["evaluation"] == {
        "probe_dice": {"step": 4, "probe_dice": 0.41, "probe_dice_1": 0.41},
        "report": {"probe": {"ckpt0": {"dice": 0.41}}, "fewshot": {"ckpt0": {"1": {"n": 1, "mean": 0.2}}}},
    }
    assert config["training"]["final_loss"] != 7.0 and config["training"]["final_loss_step"] == 4
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "Frozen-encoder probe Dice at step 4" in card and '"mean": 0.2' in card
    for path in (tmp_path / "out").iterdir():
        assert b"smith_john" not in path.read_bytes() and b"case7" not in path.read_bytes()


# --- refusals ------------------------------------------------------------------------------------------------------


def test_refusals_name_the_problem_in_one_line(tiny_checkpoint, seg_checkpoint, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint", encoding="utf-8")
    cases = [
        (("export", foreign, "--out", tmp_path / "a"), 1, "not a ctmae checkpoint (written by another program)"),
        (("export", text, "--out", tmp_path / "b"), 1, "not a ctmae checkpoint"),
        (("export", seg_checkpoint, "--out", tmp_path / "c"), 1, "segmentation checkpoint, not an MAE pretraining"),
        (("export", tiny_checkpoint, "--out", tmp_path / "d", "--format", "onnx"), 2, "--format must be one of"),
        (("info", foreign), 1, "not a ctmae checkpoint"),
        (("info", tmp_path), 1, "not a ctmae export folder"),
    ]
    for args, code, message in cases:
        result = _run(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert "ctmae segment" in _run("export", seg_checkpoint, "--out", tmp_path / "c").output
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing is created for a refused export


def test_non_empty_export_folder_needs_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    result = _run("export", tiny_checkpoint, "--out", out)
    assert result.exit_code == 2 and "not empty; pass --overwrite" in result.output
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me"
    result = _run("export", tiny_checkpoint, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "encoder.safetensors"]


def test_weights_that_do_not_match_config_json_are_one_error(exports, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exports["safetensors"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    json.dump({**config, "architecture": {**config["architecture"], "hidden_size": 48, "mlp_dim": 192}},
              open(folder / "config.json", "w"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"has shape \(.*96.*needs \(.*48.*do not belong together"):
        ctmae.load_encoder(folder)
    result = _run("info", folder)
    assert result.exit_code == 1 and "do not belong together" in result.output and "Traceback" not in result.output

    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tensors = load_file(folder / "encoder.safetensors")
    tensors["norm.bias"] = tensors["norm.bias"] + 1e-3
    save_file(tensors, folder / "encoder.safetensors")
    with pytest.raises(CheckpointError, match="differ from the SHA-256 in config.json"):
        ctmae.load_encoder(folder)


# --- ctmae info ----------------------------------------------------------------------------------------------------


def test_info_describes_each_kind(tiny_checkpoint, seg_checkpoint, exports, monkeypatch):
    from ctmae.cli.common import console

    monkeypatch.setattr(console, "width", 200)  # one table row per line, whatever the terminal
    expected = {
        tiny_checkpoint: ["MAE pretraining checkpoint", "finetune-seg UNETR", "ctmae finetune-seg", "last loss"],
        seg_checkpoint: [
            "segmentation checkpoint",
            "monai.networks.nets.UNETR",
            "ctmae segment",
            "best validation Dice",
        ],
        exports["safetensors"]: ["encoder export (safetensors)", "hidden_size", "ctmae.load_unetr", "hu_window"],
        exports["monai-bundle"]: ["encoder export (MONAI bundle)", "monai.bundle", "ctmae.load_encoder"],
    }
    for path, phrases in expected.items():
        result = _run("info", path)
        assert result.exit_code == 0, result.output
        for phrase in phrases:
            assert phrase in result.output, (path, phrase, result.output)


# --- the preprocessing contract ------------------------------------------------------------------------------------


def _body(values: np.ndarray) -> np.ndarray:
    return np.pad(values, 2, constant_values=values.min())


@pytest.mark.parametrize(
    "name, array, spacing, dtype, expected",
    [
        ("ct", _body(np.random.default_rng(1).integers(-1000, 1500, (30, 30, 20))), (1.0, 1.0, 2.5), np.int16, None),
        ("mr", _body(np.random.default_rng(2).integers(0, 1800, (30, 30, 20))), (1.0, 1.0, 2.5), np.int16, "like MR"),
        ("unit", np.random.default_rng(3).random((30, 30, 20)), (1.5, 1.5, 1.5), np.float32, "scaled to 0..1"),
        ("byte", np.random.default_rng(4).integers(0, 256, (30, 30, 20)), (1.5, 1.5, 1.5), np.uint8, "8-bit 0..255"),
        (
            "thick",
            _body(np.random.default_rng(5).integers(-1000, 1500, (30, 30, 6))),
            (0.7, 0.7, 8.0),
            np.int16,
            "5.3x coarser than the training spacing 1.5x1.5x1.5 mm",
        ),
        (
            "fine",
            _body(np.random.default_rng(6).integers(-1000, 1500, (30, 30, 20))),
            (0.3, 0.3, 1.0),
            np.int16,
            "5.0x finer",
        ),
    ],
)
def test_contract_warns_about_inputs_unlike_the_training_data(tmp_path, name, array, spacing, dtype, expected):
    path = write_volume(tmp_path / f"{name}.nii.gz", array, spacing=spacing, dtype=dtype)
    summary = read_summary(find_volumes([path])[0][0])
    lines = input_warnings(TRAINED, summary, f"{name}.nii.gz")
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith(f"{name}.nii.gz: "), lines


def test_the_sample_scans_fit_the_contract():
    sources, _ = find_volumes([SAMPLE_DATA / "ct", SAMPLE_DATA / "dicom"])  # 1.5 x 1.5 x 5 mm chest CT, both forms
    assert len(sources) == 2
    for source in sources:
        assert input_warnings(TRAINED, read_summary(source), source.id) == []


def test_contract_names_a_non_ct_dicom_series(tmp_path):
    body = np.random.default_rng(0).integers(-1000, 1000, (20, 20, 6))
    write_dicom_series(tmp_path / "pet", body, spacing=(1.5, 1.5, 2.0), modality="PT")
    lines = input_warnings(TRAINED, read_summary(find_volumes([tmp_path])[0][0]), "x")
    assert lines == ["x: DICOM modality PT, not CT; the encoder was pretrained on CT in HU"]


def test_embed_and_reconstruct_print_contract_warnings(tiny_checkpoint, tmp_path):
    mr = _body(np.random.default_rng(2).integers(0, 1800, (40, 40, 30)))
    path = write_volume(tmp_path / "scans" / "mr.nii.gz", mr, spacing=(1.5, 1.5, 1.5))
    result = runner.invoke(app, ["embed", str(tiny_checkpoint), str(path), "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 0, result.output
    assert "warning: mr.nii.gz: values 0.." in result.output and "and no air" in result.output
    result = runner.invoke(app, ["reconstruct", str(tiny_checkpoint), str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "looks like MR" in result.output


def test_preprocessing_overrides_of_a_pretrained_encoder_are_refused(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run_dir / "checkpoints" / "last.pt")
    config = tmp_path / "cfg.yaml"
    config.write_text("preprocess:\n  spacing: [2.0, 2.0, 2.0]\n", encoding="utf-8")
    common = ("pretrain", LUNG, "--out", run_dir, "--resume")
    result = _run(*common, "--config", config)
    assert result.exit_code == 2, result.output
    expected = "preprocess.spacing 2x2x2 mm differs from the 1.5x1.5x1.5 mm the encoder was pretrained with"
    assert expected in result.output
    config.write_text("data:\n  hu_window: [-200.0, 300.0]\n", encoding="utf-8")  # the flat layout too
    result = _run(*common, "--config", config)
    assert result.exit_code == 2 and "preprocess.hu_window -200..300 HU differs" in result.output
    result = _run(*common, "--crop", "32")
    assert result.exit_code == 2 and "preprocess.crop 32 differs from the 64" in result.output

    labels = SAMPLE_DATA / "labels"
    result = _run("finetune-seg", tiny_checkpoint, "--images", LUNG.parent, "--labels", labels, "--out",
                  tmp_path / "seg", "--spacing", "3")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--spacing 3: preprocess.spacing 3x3x3 mm differs from the 1.5x1.5x1.5 mm" in result.output
    assert len(result.output.strip().splitlines()) == 1


def readme_bundle_command() -> list[str]:
    """README's ``python -m monai.bundle run ...`` command, its continuation lines joined, its comment dropped."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^python -m monai\.bundle run (?:.*\\\n)*.*$", readme, re.M)
    assert found, "README shows no `python -m monai.bundle run` command"
    return shlex.split(found[0].replace("\\\n", " "), comments=True)


@pytest.mark.slow
def test_readme_bundle_command_runs_as_written(exports, tmp_path):
    """README's command in a subprocess, from a folder laid out as README's: runs/bundle (a tiny export) and
    sample_data/; MONAI's bundle command line needs fire (the bundle and test extras)."""
    command = readme_bundle_command()
    assert command[:4] == ["python", "-m", "monai.bundle", "run"]
    shutil.copytree(exports["monai-bundle"], tmp_path / "runs" / "bundle")
    (tmp_path / "sample_data").symlink_to(SAMPLE_DATA)
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(tmp_path / "runs" / "tokens.npy").shape == (96, 13, 10, 10)  # the tiny encoder's D is 96 too


def test_the_bundle_extra_brings_what_monai_bundle_run_needs():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    extras = project["project"]["optional-dependencies"]
    for extra in ("bundle", "test"):
        assert any(re.match(r"fire\b", requirement) for requirement in extras[extra]), extra
    assert "pip install 'ctmae[bundle]'" in (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
