"""Which classes a segmentation run learns and what they are called: ``--classes`` resolved against the labels'
names, and the transform that turns label values into classes 1..K.

``--classes liver=5,spleen=1`` (or ``liver,spleen``, names looked up in the labels' names files, or values alone,
``5,1``) makes label value 5 class 1 and value 1 class 2; every other value becomes background. Without
``--classes`` the labels are used as numbered (class k is label value k), and named where a names file says so.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ctmae.io.checks import InputError
from ctmae.seg.config import SegConfig
from ctmae.seg.label_names import LabelNames, same_name

MAX_VALUE = 255  # labels are class indices 0..255 (stored as uint8)


@dataclass(frozen=True)
class ClassMap:
    """The classes of a run: class k (1..K) is label value ``values[k-1]``, called ``names[k-1]`` ("" unnamed)."""

    values: tuple[int, ...]
    names: tuple[str, ...]
    chosen: bool = False  # chosen with --classes: every other label value is background

    @property
    def count(self) -> int:
        """Output classes, background included."""
        return len(self.values) + 1

    def labels(self) -> list[str]:
        """How reports name classes 1..K: the name, or "class k" when there is none."""
        return [name or f"class {k}" for k, name in enumerate(self.names, 1)]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per class 1..K: ``{"class", "name", "label_value"}`` (report.json, the prediction sidecar)."""
        return [{"class": k, "name": n, "label_value": v} for k, (n, v) in enumerate(zip(self.names, self.values), 1)]

    def text(self) -> str:
        """One line for reports: "1 liver (label 5), 2 spleen (label 1)"; values shown for chosen classes and where
        they differ from the class."""
        return ", ".join(
            f"{k} {name}" + (f" (label {v})" if self.chosen or v != k else "")
            for k, (name, v) in enumerate(zip(self.labels(), self.values), 1)
        )

    def remap(self) -> tuple[int, ...]:
        """The label values to map to 1..K (``SelectClassesd``), or () when labels are used as numbered."""
        return self.values if self.chosen else ()

    def config(self) -> dict[str, tuple]:
        """The ``SegDataConfig`` fields that record these classes."""
        return {"label_values": self.remap(), "class_names": self.names if any(self.names) else ()}


def parse_classes(spec: str) -> list[tuple[str, int | None]]:
    """``--classes`` as (name, value) pairs: ``liver=5`` -> ("liver", 5), ``liver`` -> ("liver", None), ``5`` ->
    ("", 5).

    Raises:
        ValueError: an empty item, a value that is not a whole number 1..255, or a class given twice (a usage error).
    """
    pairs: list[tuple[str, int | None]] = []
    for item in (i.strip() for i in spec.split(",")):
        name, sign, value = (p.strip() for p in item.partition("="))
        if not sign and name.isdigit():  # a value alone
            name, value = "", name
        if not item or (sign and not (name and value)):
            raise ValueError(f"--classes {spec!r}: each class is NAME=VALUE, NAME or VALUE, comma-separated")
        if value and (not value.isdigit() or not 1 <= int(value) <= MAX_VALUE):
            raise ValueError(f"--classes {item}: a label value is a whole number 1..{MAX_VALUE} (0 is the background)")
        pairs.append((name, int(value) if value else None))
    for i, (name, value) in enumerate(pairs):
        for other, other_value in pairs[:i]:
            if (name and same_name(name, other)) or (value is not None and value == other_value):
                raise ValueError(f"--classes {spec!r}: {name or value} is given twice")
    return pairs


def choose_classes(spec: str, names: LabelNames) -> ClassMap:
    """The classes ``--classes`` chooses, in the order given, names and values completed from ``names``.

    Raises:
        ValueError: a malformed ``spec`` (a usage error).
        InputError: a name no names file knows, names files that disagree, or a value whose name in a names file
            is not the one given.
    """
    values, labels = [], []
    for name, value in parse_classes(spec):
        value = names.value_of(name) if value is None else value
        known, where = names.named(value)  # names files that disagree about this value are refused here
        if name and known and not same_name(name, known):
            raise InputError(
                f"--classes {name}={value}: label value {value} is {known!r} in {where}{_elsewhere(name, names)}"
            )
        if value in values:
            raise ValueError(f"--classes {spec!r}: label value {value} is chosen twice")
        values.append(value)
        labels.append(name or known)
    return ClassMap(tuple(values), tuple(labels), chosen=True)


def _elsewhere(name: str, names: LabelNames) -> str:
    """ ", where liver is 5" when ``name`` has a value in ``names``, else ""."""
    try:
        return f", where {name} is {names.value_of(name)}"
    except InputError:
        return ""


def numbered_classes(count: int, names: LabelNames) -> ClassMap:
    """Classes as the labels number them: class k is value k for k in 1..``count`` - 1, named by ``names``."""
    values = tuple(range(1, count))
    return ClassMap(values, tuple(names.name_of(v) for v in values))


def check_present(classes: ClassMap, present: set[int]) -> None:
    """Refuse a chosen class no label holds (a typo or the wrong labels).

    Raises:
        InputError: naming the class and the values the labels hold.
    """
    if not classes.chosen:  # the labels' own numbering: evaluate checks its gaps itself
        return
    for name, value in zip(classes.labels(), classes.values):
        if value not in present:
            held = sorted(present - {0})
            shown = ", ".join(map(str, held[:12])) + (f", … ({len(held)} values)" if len(held) > 12 else "")
            raise InputError(f"--classes {name}={value}: no label holds value {value} (the labels hold {shown})")


def lookup_table(values: Sequence[int]) -> torch.Tensor:
    """(MAX_VALUE + 1,) float32: label value -> class (``values[k-1]`` -> k, everything else 0)."""
    table = torch.zeros(MAX_VALUE + 1)
    table[list(values)] = torch.arange(1, len(values) + 1, dtype=torch.float32)
    return table


class SelectClassesd(MapTransform):
    """Label values -> classes 1..K by a lookup table; every other value becomes background (0).

    Not MONAI's ``MapLabelValued``: it passes over the volume once per listed value, and sending every unchosen value
    to the background would take up to 255 passes.
    """

    def __init__(self, keys: Sequence[Hashable], values: Sequence[int]) -> None:
        super().__init__(keys)
        self.table = lookup_table(values) if values else None

    def __call__(self, data: dict) -> dict:
        if self.table is None:  # labels used as numbered
            return data
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            raw = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
            mapped = self.table[raw.round().long()].to(raw.dtype)  # (1, X, Y, Z), class indices 0..K
            d[key] = MetaTensor(mapped, meta=label.meta) if isinstance(label, MetaTensor) else mapped
        return d


def classes_of(cfg: SegConfig) -> ClassMap:
    """The classes a fine-tuning config records (``data.label_values`` and ``data.class_names``)."""
    k = cfg.net.num_classes - 1
    values = cfg.data.label_values or tuple(range(1, k + 1))
    return ClassMap(values, cfg.data.class_names or ("",) * k, chosen=bool(cfg.data.label_values))
