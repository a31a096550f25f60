"""Config: presets, YAML round trip, and one clear message naming a bad key."""

from __future__ import annotations

import pytest

from ctmae.mae.config import MODEL_PRESETS, RunConfig


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
        ("data:\n  spacing: [1, 2]\n", "data.spacing"),
        ("mask:\n  kind: blocky\n", "blocky"),
        ("optim:\n  lr: 1\n", "optim"),
        ("model:\n  size: huge\n", "huge"),
        ("train:\n  batch_size: true\n", "train.batch_size"),
        ("model:\n  fill_queries: true\n", "fill_sigma"),
        ("model:\n  head: smooth\n", "fill_sigma"),
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
