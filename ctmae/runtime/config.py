"""Config sections: frozen dataclasses with one API for every run kind (pretraining, fine-tuning).

A run config is a frozen dataclass whose fields are section dataclasses (``data``, ``model``, ...) and plain values.
``to_dict`` gives the plain-dict form that ``config.yaml`` and checkpoints hold; ``from_dict`` builds a config from a
(possibly partial) dict over a base, type-checking each value and naming the offending key; ``replace`` is
``from_dict`` over ``self``, so every change goes through the same checks and coercions.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
C = TypeVar("C", bound="Sections")


class Sections:
    """Mixin for a run config dataclass: ``to_dict``, ``from_dict``, ``replace``, ``load_yaml``, ``save_yaml``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to config.yaml and checkpoints."""
        return plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def expand(cls: type[C], d: dict[str, Any], base: C) -> tuple[dict[str, Any], C]:
        """Hook for shorthands that set several fields at once (e.g. a model size preset); returns (d, base)."""
        return d, base

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], base: C | None = None) -> C:
        """Build a config from a (possibly partial) nested dict over ``base``; raises ValueError naming a bad key."""
        base = base if base is not None else cls()
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping of sections, got {type(d).__name__}")
        d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
        d, base = cls.expand(d, base)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            current = getattr(base, f.name)
            if dataclasses.is_dataclass(current):
                values[f.name] = update_section(current, d.get(f.name) or {}, f.name)
            elif f.name in d:
                values[f.name] = coerce(d[f.name], hints[f.name], f.name)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown config section {sorted(unknown)[0]!r}; known: {', '.join(values)}")
        return dataclasses.replace(base, **values)  # type: ignore[type-var]

    def replace(self: C, **sections: Any) -> C:
        """Copy with some fields changed, e.g. ``cfg.replace(train={"steps": 5})``; checked like ``from_dict``."""
        return type(self).from_dict(sections, base=self)

    @classmethod
    def load_yaml(cls: type[C], path: str | os.PathLike, base: C | None = None) -> C:
        """Read a config file (same layout as a run's config.yaml) over ``base``; ValueError names the file, key."""
        try:
            d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            return cls.from_dict(d, base)
        except (OSError, yaml.YAMLError, ValueError) as e:
            raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None

    def save_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def check_common(train: Any) -> None:
    """Checks shared by pretraining and fine-tuning configs' train sections: device, precision, schedule."""
    if train.precision not in PRECISIONS or train.device not in DEVICES:
        raise ValueError(f"precision must be one of {PRECISIONS} and device one of {DEVICES}")
    if (train.steps is not None and train.steps < 1) or (train.epochs is not None and train.epochs <= 0):
        raise ValueError(f"steps and epochs must be positive, got steps={train.steps} epochs={train.epochs}")


def update_section(base: Any, d: dict[str, Any], name: str) -> Any:
    """``base`` (a config dataclass) with the fields in ``d`` replaced, each type-checked; ValueError names the key."""
    if not isinstance(d, dict):
        raise ValueError(f"config section {name!r} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(type(base))
    values = {}
    for key, value in d.items():
        if key not in hints:
            raise ValueError(f"unknown config key '{name}.{key}'; known: {', '.join(hints)}")
        values[key] = coerce(value, hints[key], f"{name}.{key}")
    return dataclasses.replace(base, **values)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted for floats, lists for tuples."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        return None if value is None else coerce(value, next(a for a in args if a is not type(None)), key)
    origin = typing.get_origin(hint)
    if origin is tuple and args[-1] is Ellipsis:  # tuple[X, ...]: any length
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(coerce(v, args[0], key) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config key '{key}' must be a list of {len(args)} numbers, got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ValueError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def plain(x: Any) -> Any:
    """Tuples to lists, recursively: the YAML- and checkpoint-friendly form of ``dataclasses.asdict``."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
