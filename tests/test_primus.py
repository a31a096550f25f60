"""nnU-Net's Primus as the MAE's encoder: pretrain, export for nnU-Net, load with nnU-Net's own
``load_pretrained_weights`` into the network its Primus trainers build, train it one step; and the one-line refusals
of everything that cannot take a Primus encoder.

The nnU-Net tests skip, with the reason, where the ``nnunet`` extra (dynamic-network-architectures, nnunetv2) is not
installed or does not import; the refusals and the configuration run everywhere."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_volume
from ctmae.cli import app
from ctmae.mae.config import PRIMUS_PRESETS, ModelConfig, RunConfig
from ctmae.mae.primus import missing_extra
from ctmae.runtime.checkpoint import save_checkpoint

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "ct"
TINY = {"model": {"arch": "primus", "size": "tiny"}, "preprocess": {"crop": 32}}


def _nnunet_problem() -> str | None:
    problem = missing_extra(ModelConfig(arch="primus"))
    if problem:
        return problem
    try:
        import nnunetv2.training.nnUNetTrainer.primus.primus_trainers  # noqa: F401
    except Exception as e:  # not installed, or a dependency that does not load: the reason is the skip's
        return f"nnunetv2 does not import here ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


NNUNET_PROBLEM = _nnunet_problem()
needs_nnunet = pytest.mark.skipif(NNUNET_PROBLEM is not None, reason=f"nnunet extra: {NNUNET_PROBLEM}")


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def primus_state(cfg: RunConfig, model: dict | None = None) -> dict:
    return {"config": cfg.to_dict(), "model": model or {}, "step": 0}


@pytest.fixture
def fake_primus_checkpoint(tmp_path) -> Path:
    """A Primus checkpoint's config with no weights: what the refusals read, written without the extra."""
    path = tmp_path / "primus.pt"
    save_checkpoint(primus_state(RunConfig.from_dict(TINY)), path)
    return path


# --- configuration and refusals: everywhere --------------------------------------------------------------------


@pytest.mark.parametrize("size", ["s", "b", "m", "l"])
def test_presets_have_nnunet_trainers_sizes(size):
    widths = {"s": (396, 12, 6), "b": (792, 12, 12), "m": (864, 16, 12), "l": (1056, 24, 16)}[size]
    m = RunConfig.from_dict({"model": {"arch": "primus", "size": size}}).model
    assert (m.dim, m.depth, m.heads, m.patch, m.mlp_ratio) == (*widths, 8, 4 * 2 / 3)


def test_arch_without_size_takes_its_default_and_bad_settings_are_refused():
    assert RunConfig.from_dict({"model": {"arch": "primus"}}).model.size == "b"
    assert RunConfig.from_dict({"model": {"arch": "primus"}}, base=RunConfig.from_dict(TINY)).model.dim == 96
    with pytest.raises(ValueError, match="8³ patches"):
        RunConfig.from_dict({"model": {"arch": "primus", "size": "tiny", "patch": 16}, "preprocess": {"crop": 32}})
    with pytest.raises(ValueError, match="divisible by 6"):
        RunConfig.from_dict({"model": {"arch": "primus", "size": "tiny", "dim": 128}, "preprocess": {"crop": 32}})
    with pytest.raises(ValueError, match="unknown primus model size 'base'"):
        RunConfig.from_dict({"model": {"arch": "primus", "size": "base"}})


def test_pretrain_without_the_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dynamic_network_architectures.architectures.primus", None)  # import fails
    result = cli("pretrain", SAMPLE, "--out", tmp_path / "run", "--arch", "primus", "--model", "tiny", "--crop", 32)
    assert result.exit_code == 2, result.output
    assert "pip install 'ctmae[nnunet]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_vit_export_formats_refuse_a_primus_checkpoint(fake_primus_checkpoint, tmp_path):
    result = cli("export", fake_primus_checkpoint, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "use --format nnunet" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_nnunet_export_refuses_a_vit_checkpoint_and_bad_sizes(tiny_checkpoint, fake_primus_checkpoint, tmp_path):
    result = cli("export", tiny_checkpoint, "--format", "nnunet", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "ctmae pretrain --arch primus" in result.output, result.output
    for size, why in [("60", "multiples of Primus's 8³"), ("64,64", "one number or three"), ("a", "numbers")]:
        result = cli(
            "export", fake_primus_checkpoint, "--format", "nnunet", "--out", tmp_path / "o", "--patch-size", size
        )
        assert result.exit_code == 2 and why in result.output, result.output
    result = cli("export", fake_primus_checkpoint, "--format", "nnunet", "--out", tmp_path / "o", "--num-classes", 1)
    assert result.exit_code == 2 and "at least 2" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_finetune_seg_refuses_a_primus_checkpoint_naming_the_nnunet_export(fake_primus_checkpoint, tmp_path):
    image = np.zeros((24, 24, 24), np.float32)
    image[8:16, 8:16, 8:16] = 200.0
    write_volume(tmp_path / "images" / "case0.nii.gz", image, spacing=(1.5,) * 3)
    write_volume(tmp_path / "labels" / "case0.nii.gz", (image > 0).astype(np.uint8), spacing=(1.5,) * 3)
    args = ["--images", tmp_path / "images", "--labels", tmp_path / "labels", "--out", tmp_path / "seg"]
    result = cli("finetune-seg", fake_primus_checkpoint, *args)
    assert result.exit_code == 1, result.output
    assert "nnU-Net's Primus" in result.output and "ctmae export CHECKPOINT --format nnunet" in result.output
    assert "Traceback" not in result.output


def test_evaluate_skips_fewshot_for_a_primus_checkpoint_naming_the_nnunet_export(fake_primus_checkpoint):
    from ctmae.experiments.evaluate.settings import EvalSettings
    from ctmae.experiments.evaluate.subjects import load_subjects

    subjects = load_subjects([fake_primus_checkpoint], EvalSettings(protocols=("fewshot",)))
    problem = subjects[0].fewshot_problem
    assert "few-shot fine-tuning skipped" in problem and "--format nnunet" in problem


# --- the model and the nnU-Net round trip: with the extra ---------------------------------------------------------


@needs_nnunet
def test_primus_mae_shapes_gradients_and_nnunet_axis_order():
    """Every parameter learns; on all tokens the encoder equals nnU-Net's Primus on the volume with reversed axes."""
    from einops import rearrange

    from ctmae.mae.masking import MaskConfig, sample_mask
    from ctmae.mae.model import build_model
    from ctmae.mae.primus import to_nnunet_ids

    torch.manual_seed(0)
    model = build_model(RunConfig.from_dict(TINY).model)
    x = torch.rand(2, 1, 32, 32, 32)
    mask = sample_mask(MaskConfig(), 2, (4, 4, 4), torch.Generator().manual_seed(0), torch.device("cpu"))
    loss, pred, _ = model(x, mask)
    loss.backward()
    assert pred.shape == (2, mask.ids_pred.shape[1], 8**3) and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    enc = model.encoder.eval()
    with torch.no_grad():
        tokens = rearrange(enc.down_projection(x.permute(0, 1, 4, 3, 2)), "b c z y x -> b (z y x) c")
        theirs, _ = enc.eva(tokens)  # (B, L, D) in nnU-Net's (Z, Y, X) raster order
        ours = model.encode(x)
    assert torch.allclose(ours, theirs[:, to_nnunet_ids(torch.arange(64), 4)], atol=1e-5)


def _trainer_network(size: str, patch_size: list[int], num_classes: int):
    """The network nnU-Net's Primus trainer of ``size`` builds, by the trainer's own method; for tiny, which no nnU-Net
    trainer has, the same ``Primus`` call with tiny widths (the trainers' arguments are checked against ctmae's by
    ``test_nnunet_trainers_build_what_the_export_builds``)."""
    from dynamic_network_architectures.architectures.primus import Primus
    from nnunetv2.training.nnUNetTrainer.primus import primus_trainers
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    if size == "tiny":
        return Primus(
            1, 96, (8, 8, 8), num_classes, 4, 2, patch_size, drop_path_rate=0.2, scale_attn_inner=True, init_values=0.1
        )
    trainer = getattr(primus_trainers, f"nnUNet_Primus_{size.upper()}_Trainer")
    configuration = ConfigurationManager({"patch_size": patch_size, "architecture": {}})
    return trainer.build_network_architecture(None, configuration, 1, num_classes, False)


@needs_nnunet
@pytest.mark.parametrize("size", ["s", "b", "m", "l"])
def test_nnunet_trainers_build_what_the_export_builds(size, monkeypatch):
    """nnUNet_Primus_{S,B,M,L}_Trainer and ctmae's export call Primus with the same arguments (recorded, not built)."""
    from dynamic_network_architectures.architectures import primus
    from nnunetv2.training.nnUNetTrainer.primus import primus_trainers

    from ctmae.mae.primus import primus_network
    from ctmae.share.nnunet import FINETUNE_DROP_PATH

    calls = []
    signature = inspect.signature(primus.Primus)

    def record(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: tuple(v) if isinstance(v, list) else v for k, v in bound.arguments.items()})

    monkeypatch.setattr(primus_trainers, "Primus", record)
    monkeypatch.setattr(primus, "Primus", record)
    _trainer_network(size, (64, 64, 96), 3)
    primus_network(
        RunConfig.from_dict({"model": {"arch": "primus", "size": size}}).model, (64, 64, 96), 3, FINETUNE_DROP_PATH
    )
    assert calls[0] == calls[1]


def sphere_pair(folder: Path, size: int = 40) -> None:
    """A labelled scan for the in-training probe: a bright sphere in soft tissue, 1.5 mm voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    label = (((grid - size / 2) ** 2).sum(-1) < (size / 4) ** 2).astype(np.uint8)
    body = ((grid - size / 2) ** 2).sum(-1) < (size / 2.2) ** 2
    noise = np.random.default_rng(0).normal(0, 20, label.shape)
    write_volume(folder / "images" / "case0.nii.gz", np.where(body, 40.0, -1000.0) + 200.0 * label + noise, (1.5,) * 3)
    write_volume(folder / "labels" / "case0.nii.gz", label, spacing=(1.5,) * 3, dtype=np.uint8)


def _pretrain_export(tmp_path: Path, size: str, crop: int, patch_size: int) -> tuple[Path, Path]:
    """Pretrain a Primus for two steps on the sample scan (probe and previews on), export it for nnU-Net."""
    run = tmp_path / "run"
    sphere_pair(tmp_path / "probe")
    args = ["--arch", "primus", "--model", size, "--crop", crop, "--steps", 2, "--batch-size", 2, "--workers", 0]
    args += ["--probe-images", tmp_path / "probe" / "images", "--probe-labels", tmp_path / "probe" / "labels"]
    result = cli("pretrain", SAMPLE, "--out", run, "--cache-dir", tmp_path / "cache", "--probe-every", 2, *args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("probe_dice" in r for r in rows)  # the in-training probe and previews run on a Primus MAE too
    assert any((run / "previews").iterdir())
    out = tmp_path / "nnunet"
    ckpt = run / "checkpoints" / "last.pt"
    result = cli("export", ckpt, "--format", "nnunet", "--out", out, "--patch-size", patch_size, "--num-classes", 2)
    assert result.exit_code == 0, result.output
    assert ("position table was resampled" in result.output) == (crop != patch_size)
    return ckpt, out


ROUND_TRIPS = [
    pytest.param(("tiny", 32, 64), id="tiny-crop32-patch64"),
    pytest.param(("s", 64, 64), id="S-crop64-patch64", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=ROUND_TRIPS)
def exported(request, tmp_path_factory) -> tuple[str, int, int, Path, Path]:
    """(size, crop, patch size, checkpoint, export folder): one pretraining and export per size for both tests."""
    if NNUNET_PROBLEM is not None:
        pytest.skip(f"nnunet extra: {NNUNET_PROBLEM}")
    size, crop, patch_size = request.param
    return (size, crop, patch_size, *_pretrain_export(tmp_path_factory.mktemp(size), size, crop, patch_size))


def test_export_loads_with_nnunets_load_pretrained_weights(exported, capsys):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from ctmae.mae.checkpoint import load_checkpoint
    from ctmae.share.nnunet import resample_positions

    size, crop, patch_size, ckpt, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "plans_fragment.json",
        "pretrained_weights.pth",
    ]
    net = _trainer_network(size, [patch_size] * 3, 2)
    fresh_decoder = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("up_projection.")}
    load_pretrained_weights(net, str(out / "pretrained_weights.pth"))
    assert "Loading pretrained weights" in capsys.readouterr().out
    mae = load_checkpoint(ckpt)
    encoder = {k.removeprefix("encoder."): v for k, v in mae["model"].items() if k.startswith("encoder.")}
    loaded = net.state_dict()
    assert set(encoder) == {k for k in loaded if k.startswith(("down_projection.", "eva."))}
    for key, value in encoder.items():
        if key == "eva.pos_embed" and crop != patch_size:
            value = resample_positions(value, crop // 8, (patch_size,) * 3, 8)
        assert torch.equal(loaded[key], value), key
    assert any(not torch.equal(loaded[k], v) for k, v in fresh_decoder.items())  # the export's decoder init, not ours
    fragment = json.loads((out / "plans_fragment.json").read_text(encoding="utf-8"))
    assert fragment["configurations"]["3d_fullres"]["patch_size"] == [patch_size] * 3
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "-pretrained_weights pretrained_weights.pth" in card and "CTNormalization" in card


def test_loaded_network_trains_one_step(exported):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    size, _, patch_size, _, out = exported
    net = _trainer_network(size, [patch_size] * 3, 2)
    load_pretrained_weights(net, str(out / "pretrained_weights.pth"))
    x = torch.rand(1, 1, patch_size, patch_size, patch_size)
    logits = net(x)
    assert logits.shape == (1, 2, patch_size, patch_size, patch_size)
    target = (x > 0.5).long()[:, 0]
    torch.nn.functional.cross_entropy(logits, target).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@needs_nnunet
def test_ctnormalization_with_the_fragment_is_ctmaes_hu_scaling(tmp_path):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    from ctmae.share.nnunet import plans_fragment

    cfg = RunConfig.from_dict(TINY)
    props = plans_fragment(cfg, (64, 64, 64))["foreground_intensity_properties_per_channel"]["0"]
    hu = np.linspace(-2000, 3000, 101, dtype=np.float32)[None]
    ours = (np.clip(hu, *cfg.preprocess.hu_window) - cfg.preprocess.hu_window[0]) / np.diff(cfg.preprocess.hu_window)
    theirs = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(hu.copy())
    assert np.allclose(theirs, ours, atol=1e-6)


def test_plans_fragment_merges_into_nnunet_plans(tmp_path):
    from ctmae.share.nnunet import apply_plans, plans_fragment

    cfg = RunConfig.from_dict(TINY).replace(preprocess={"spacing": (0.8, 0.9, 2.0)})
    plans = {"transpose_forward": [2, 0, 1], "configurations": {"3d_fullres": {"batch_size": 2, "spacing": [1, 1, 1]}}}
    (tmp_path / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    (tmp_path / "fragment.json").write_text(json.dumps(plans_fragment(cfg, (64, 64, 96))), encoding="utf-8")
    merged = apply_plans(tmp_path / "plans.json", tmp_path / "fragment.json")
    full = merged["configurations"]["3d_fullres"]
    assert full["batch_size"] == 2 and full["spacing"] == [2.0, 0.9, 0.8] and full["patch_size"] == [64, 64, 96]
    assert merged["transpose_forward"] == [0, 1, 2] and merged["image_reader_writer"] == "NibabelIOWithReorient"
    assert json.loads((tmp_path / "plans.json").read_text(encoding="utf-8")) == merged


@pytest.mark.parametrize("size", list(PRIMUS_PRESETS))
def test_every_preset_builds_a_rotary_encoding(size):
    m = RunConfig.from_dict({"model": {"arch": "primus", "size": size}}).model
    assert (m.dim // m.heads) % 6 == 0 and m.dim % m.heads == 0
