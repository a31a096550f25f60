"""The study's grid: ``KEY=V1,V2`` options or a YAML file, keys resolved to ``section.key`` of ``RunConfig`` and every
point checked by ``RunConfig`` itself, so an unknown key or a bad value is named before anything runs."""

from __future__ import annotations

import dataclasses
import itertools
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from ctmae.mae.config import RunConfig
from ctmae.preprocess.config import FLAT_KEYS

# shorthands for the settings a masking study varies; any ``section.key`` of RunConfig works too
ALIASES = {
    "mask": "mask.kind",
    "mask_ratio": "mask.ratio",
    "ratio": "mask.ratio",
    "block": "mask.block",
    "predict_ratio": "mask.predict_ratio",
    "noise_std": "mask.noise_std",
    "dec_depth": "model.dec_depth",
    "dec_dim": "model.dec_dim",
    "dec_heads": "model.dec_heads",
    "norm_pix_loss": "model.norm_pix_loss",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
}
# the preprocessing keys' older names (grid files and study manifests written before the preprocess section)
FLAT_ALIASES = {f"data.{k}": f"preprocess.{k}" for k in FLAT_KEYS}
ALIASES |= FLAT_ALIASES
# keys the study fixes for every point (they define what is compared, or come from the study's own options)
FIXED = ("train.seed", "train.steps", "train.epochs", "train.device", "preprocess.cache_dir", "model.size")
# short names used in point folder names
SHORT = {"mask.kind": "", "mask.ratio": "r", "mask.block": "b", "mask.predict_ratio": "pr", "model.dec_depth": "dd"}


class GridError(ValueError):
    """A grid that cannot run: an unknown key, a bad value, a point the config refuses (one line)."""


def _fields() -> dict[str, Any]:
    """``section.key`` -> type hint, for every field of RunConfig's sections."""
    out = {}
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        for key, hint in typing.get_type_hints(cls).items():
            out[f"{section.name}.{key}"] = hint
    return out


def resolve_key(key: str) -> str:
    """The ``section.key`` a grid key names; GridError naming it when it names none."""
    full = ALIASES.get(key.strip(), key.strip())
    fields = _fields()
    if full not in fields:
        known = ", ".join(sorted(ALIASES))
        raise GridError(f"--grid: unknown key {key!r}; use one of {known} or any section.key of the config")
    if full in FIXED:
        raise GridError(f"--grid: {key!r} cannot vary in a study (every point shares it); set it with the options")
    return full


def _value(text: Any, key: str) -> Any:
    """A grid value as the config field wants it: YAML scalars, strings kept for str fields, a number repeated for
    a tuple field (``preprocess.spacing=1.5`` -> (1.5, 1.5, 1.5))."""
    hint = _fields()[key]
    if isinstance(text, str):
        text = text.strip()
        if hint is str or (typing.get_origin(hint) is None and hint is str):
            return text
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
    else:
        value = text
    if typing.get_origin(hint) is tuple and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * len(typing.get_args(hint))
    return value


def parse_grid(options: list[str]) -> dict[str, list[Any]]:
    """``["mask=none,block", "mask_ratio=0.5,0.75"]`` -> ``{"mask.kind": ["none", "block"], "mask.ratio": [...]}``."""
    grid: dict[str, list[Any]] = {}
    for option in options:
        key, sep, values = option.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise GridError(f"--grid takes KEY=V1,V2,..., got {option!r}")
        full = resolve_key(key)
        if full in grid:
            raise GridError(f"--grid: {key!r} given twice")
        grid[full] = [_value(v, full) for v in values.split(",") if v.strip()]
    return grid


def load_grid_file(path: str | os.PathLike) -> dict[str, list[Any]]:
    """A YAML mapping of grid keys to a list of values (or one value); GridError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise GridError(f"{path}: cannot read the grid ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise GridError(f"{path}: a grid file is a mapping of keys to lists of values, e.g. 'mask: [random, block]'")
    grid: dict[str, list[Any]] = {}
    for key, values in data.items():
        try:
            full = resolve_key(str(key))
        except GridError as e:
            raise GridError(f"{path}: {e}") from None
        values = values if isinstance(values, list) else [values]
        if not values:
            raise GridError(f"{path}: grid key {key!r} has no values")
        grid[full] = [_value(v, full) for v in values]
    return grid


def nested(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"mask.kind": "block"}`` -> ``{"mask": {"kind": "block"}}`` (RunConfig.from_dict's layout)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def expand(grid: dict[str, list[Any]], base: RunConfig) -> list[tuple[dict[str, Any], RunConfig]]:
    """Every point of the grid (the cartesian product, in the order the keys were given) and its checked config.

    Raises:
        GridError: a value the config refuses, naming the point and the config's reason.
    """
    points = []
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo))
        try:
            cfg = base.replace(**nested(overrides))
        except ValueError as e:
            shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
            raise GridError(f"--grid point {shown}: {e}") from None
        points.append((overrides, cfg))
    return points


def point_name(overrides: dict[str, Any]) -> str:
    """A folder-safe name for a point: ``block-r0.75-b2``."""
    parts = []
    for key, value in overrides.items():
        short = SHORT.get(key, key.split(".", 1)[1].replace("_", ""))
        text = "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{short}{text}")
    name = "-".join(parts)
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in name)[:80]
