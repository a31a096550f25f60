"""Config: presets, YAML round trip, one clear message naming a bad key, and the flat layout of older files."""

from __future__ import annotations

import pytest
import torch

from ctmae.mae.config import MODEL_PRESETS, ModelConfig, RunConfig
from ctmae.preprocess.config import PreprocessConfig
from ctmae.seg.config import SegConfig, SegNetConfig


def test_dict_round_trip_and_presets(tmp_path):
    cfg = RunConfig.from_dict({"model": {"size": "small"}, "data": {"crop": 128}, "mask": {"kind": "random"}})
    assert cfg.model.dim == MODEL_PRESETS["small"]["dim"] and cfg.model.img_size == 128
    cfg.save_yaml(tmp_path / "c.yaml")
    assert RunConfig.load_yaml(tmp_path / "c.yaml") == cfg
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  stepz: 3\n", "train.stepz"),
        ("train:\n  steps: three\n", "train.steps"),
        ("preprocess:\n  spacing: [1, 2]\n", "preprocess.spacing"),
        ("preprocess:\n  hu_window: [400, -1000]\n", "hu_window"),
        ("preprocess:\n  crop: 64\ndata:\n  crop: 32\n", "data.crop"),  # one setting in both layouts
        ("mask:\n  kind: blocky\n", "blocky"),
        ("optim:\n  lr: 1\n", "optim"),
        ("model:\n  size: huge\n", "huge"),
        ("train:\n  batch_size: true\n", "train.batch_size"),
        ("model:\n  fill_queries: true\n", "fill_sigma"),
        ("model:\n  head: smooth\n", "fill_sigma"),
        ("model:\n  fill_context: 16\n", "fill_context"),
        ("model:\n  fill_sigma: 8\n  fill_context: 12\n", "fill_context"),  # not a multiple of the patch
        ("data:\n  zoom: 1.5\n", "data.zoom"),
        ("data:\n  contrast: -0.1\n", "data.contrast"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        RunConfig.load_yaml(path)
    message = str(err.value)
    assert key in message and str(path) in message and "\n" not in message


def test_crop_must_fit_patches():
    with pytest.raises(ValueError, match="multiple of the patch"):
        RunConfig.from_dict({"data": {"crop": 100}})


def _flat(d: dict) -> dict:
    """A run config dict in the layout older ctmae versions wrote (config.yaml, checkpoints): no ``preprocess``
    section; spacing, hu_window, crop and (pretraining's) cache_dir among the ``data`` keys."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    d["data"] = {**d.pop("preprocess"), **d["data"]}
    return d


def test_the_preprocess_section_round_trips_and_both_run_configs_hold_it(tmp_path):
    pre = PreprocessConfig(spacing=(2.0, 2.0, 2.5), hu_window=(-900.0, 500.0), crop=32, cache_dir=str(tmp_path))
    mae = RunConfig(preprocess=pre, model=ModelConfig(img_size=32, patch=8))
    seg = SegConfig(preprocess=pre, net=SegNetConfig(dim=96, heads=4))
    for cfg in (mae, seg):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["preprocess"]["spacing"] == [2.0, 2.0, 2.5]
        assert "spacing" not in cfg.to_dict()["data"] and cfg.preprocess == pre
    assert RunConfig.from_dict({"preprocess": {"crop": 64}}).model.img_size == 64  # one crop for both


@pytest.mark.parametrize("kind", [RunConfig, SegConfig])
def test_a_dict_in_the_flat_layout_loads_into_the_preprocess_section(kind):
    old = {
        "data": {"spacing": [2.0, 2.0, 3.0], "hu_window": [-1000, 400], "crop": 32, "cache_dir": "/x", "workers": 1},
        **({"model": {"size": "tiny", "patch": 8}} if kind is RunConfig else {}),
    }
    cfg = kind.from_dict(old)
    assert cfg.preprocess == PreprocessConfig(
        spacing=(2.0, 2.0, 3.0), hu_window=(-1000.0, 400.0), crop=32, cache_dir="/x"
    )
    assert cfg.data.workers == 1  # the loader setting stays a data setting
    assert kind.from_dict(_flat(cfg.to_dict())) == cfg
    assert cfg.replace(data={"spacing": [1.0, 1.0, 1.0]}).preprocess.spacing == (1.0, 1.0, 1.0)  # --config files too


def test_a_checkpoint_saved_in_the_flat_layout_loads(tiny_checkpoint, tmp_path):
    """A pretraining checkpoint written before the preprocess section (its config rewritten by hand into the flat
    layout, saved as ctmae saves) loads to the same config, rebuilds its model and states its contract."""
    from ctmae.infer.sliding import load_model
    from ctmae.mae.checkpoint import load_checkpoint
    from ctmae.preprocess.contract import checkpoint_preprocessing
    from ctmae.share.describe import describe_checkpoint

    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({**state, "config": _flat(state["config"])}, old)
    assert "preprocess" not in torch.load(old, weights_only=True)["config"]
    assert load_checkpoint(old)["config"] == load_checkpoint(tiny_checkpoint)["config"]
    assert checkpoint_preprocessing(old) == checkpoint_preprocessing(tiny_checkpoint) is not None
    assert checkpoint_preprocessing(old)["crop"] == 64 and checkpoint_preprocessing(old)["spacing"] == [1.5] * 3
    loaded = load_model(old, "cpu")
    assert loaded.cfg.preprocess.crop == 64 and loaded.step == state["step"]
    assert describe_checkpoint(old)[0]["preprocessing"] == describe_checkpoint(tiny_checkpoint)[0]["preprocessing"]


def test_a_segmentation_checkpoint_saved_in_the_flat_layout_loads(tmp_path):
    from ctmae.seg.network import build_unetr, load_seg_checkpoint, save_seg_checkpoint, segmenter_from_checkpoint

    cfg = SegConfig(preprocess=PreprocessConfig(spacing=(2.0,) * 3, crop=32), net=SegNetConfig(dim=96, heads=4))
    old = _flat(cfg.to_dict())
    del old["data"]["cache_dir"]  # fine-tuning configs held no cache folder
    unetr = build_unetr(cfg.net, 32)
    save_seg_checkpoint({"config": old, "model": unetr.state_dict(), "step": 1}, tmp_path / "best.pt")
    state = load_seg_checkpoint(tmp_path / "best.pt")
    assert state["config"].preprocess.spacing == (2.0,) * 3 and state["config"].preprocess.crop == 32
    rebuilt = segmenter_from_checkpoint(state)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), unetr.state_dict().values()))


def test_the_shipped_recipes_load_and_config_reads_them_by_name(tmp_path):
    from ctmae.mae.config import RECIPES, recipe_path

    demo, gpu = (RunConfig.load_yaml(recipe_path(name)) for name in RECIPES)
    assert (demo.model.size, demo.preprocess.crop, demo.data.crops_per_volume, demo.data.zoom) == ("tiny", 64, 8, 0.25)
    assert (demo.model.fill_sigma, demo.mask.predict_ratio, demo.train.steps, demo.train.lr) == (8.0, 0.75, 900, 3e-3)
    assert (demo.model.fill_context, demo.data.contrast) == (16, 0.25)
    assert (gpu.model.size, gpu.preprocess.crop, gpu.train.batch_size, gpu.train.steps) == ("base", 96, 4, 100000)
    assert gpu.model.dim == MODEL_PRESETS["base"]["dim"] and gpu.train.device == "auto"
    mine = tmp_path / "gpu"  # a file of that name in the working folder is read, not the recipe
    mine.write_text("train:\n  steps: 7\n", encoding="utf-8")
    assert RunConfig.load_yaml(recipe_path(mine)).train.steps == 7
    with pytest.raises(ValueError, match=r"tpu: no such config file, and not a recipe \(demo, gpu\)"):
        recipe_path("tpu")


def test_import_ctmae_is_cheap_and_exports_the_configs_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, ctmae; assert 'torch' not in sys.modules, 'torch at import'; "
        "cfg = ctmae.PretrainConfig.recipe('demo'); assert cfg.model.size == 'tiny'; "
        "assert ctmae.FinetuneConfig().preprocess == ctmae.PreprocessConfig()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr
