"""The labelled cases of an evaluation: checked once, split once into fixed test cases and a training pool, the
few-shot subsets drawn from the pool, and each case preprocessed once per preprocessing setting.

The split is a pure function of ``--seed`` and the sorted case ids, so every checkpoint and every protocol is scored
on the same test cases, and a resumed evaluation gets the same split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from ctmae.io.checks import InputError
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.transforms import preprocess_transforms
from ctmae.seg.classes import ClassMap, SelectClassesd, check_present, numbered_classes
from ctmae.seg.data import LabelledCase, case_values
from ctmae.seg.label_names import LabelNames


@dataclass(frozen=True)
class EvalCases:
    """Test cases and training pool (disjoint, each sorted by id), the class count (background included) and the
    classes: which label value each is and what it is called."""

    test: tuple[LabelledCase, ...]
    pool: tuple[LabelledCase, ...]
    classes: int
    class_map: ClassMap

    def ids(self) -> dict[str, list[str]]:
        return {"test": [c.id for c in self.test], "train_pool": [c.id for c in self.pool]}

    def describe_classes(self) -> dict[str, Any]:
        """What the classes are, for the journal's header and report.json: names and label values of 1..K."""
        return {
            "classes": self.classes,
            "class_names": self.class_map.labels(),
            "label_values": list(self.class_map.values),
            "chosen": self.class_map.chosen,
        }


def split_cases(cases: Sequence[LabelledCase], test_cases: int | None, train_needed: int, seed: int):
    """(test, pool): a seeded choice of test cases; the rest is the training pool.

    Args:
        cases: all labelled cases.
        test_cases: how many to hold out; None: a fifth of the cases (at least one), leaving ``train_needed``.
        train_needed: training cases the protocols need (the largest few-shot k).
        seed: picks the test cases.

    Raises:
        ValueError: too few cases for ``train_needed`` training cases plus the test cases (a usage error).
    """
    cases = sorted(cases, key=lambda c: c.id)
    n = len(cases)
    if test_cases is None:
        test_cases = min(max(1, round(0.2 * n)), max(1, n - train_needed))
    if n < train_needed + test_cases:
        raise ValueError(
            f"{n} labelled case(s): {train_needed} training case(s) (the largest --shots) plus {test_cases} test "
            f"case(s) need {train_needed + test_cases}; lower --shots or --test-cases, or add labelled cases"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test = set(order[:test_cases])
    return tuple(cases[i] for i in sorted(test)), tuple(c for i, c in enumerate(cases) if i not in test)


def check_cases(
    test: Sequence[LabelledCase],
    pool: Sequence[LabelledCase],
    on_case: Callable[[], None] | None = None,
    classes: ClassMap | None = None,
    names: LabelNames | None = None,
) -> EvalCases:
    """Check every pair's geometry and values (``case_values``) and that the training pool holds every class.

    Args:
        classes: the classes chosen with ``--classes``; None: every label value, as numbered (without gaps).
        names: the labels' names (``LabelNames.of``), which name the classes when none were chosen.

    Raises:
        InputError: one line naming the pair or label at fault: geometry differing from the image, values that
            are not class indices, a class no label holds, or a class that only test cases hold.
    """
    present: dict[str, set[int]] = {}
    for case in (*pool, *test):
        present[case.id] = case_values(case)
        if on_case:
            on_case()
    every = set().union(*present.values())
    if classes is None:
        classes = _numbered(every, names or LabelNames(()))
    check_present(classes, every)
    number = {value: k for k, value in enumerate(classes.values, 1)}
    held = {case_id: {number[v] for v in values if v in number} for case_id, values in present.items()}
    trained = set().union(*(held[c.id] for c in pool))
    for case in test:
        absent = sorted(held[case.id] - trained)
        if absent:
            name = classes.names[absent[0] - 1]
            raise InputError(
                f"{case.label.files[0]}: holds class {absent[0]}{f' ({name})' if name else ''}, which no training "
                f"case holds (test case {case.id!r}); a probe or fine-tuning run cannot learn it; add a training "
                f"case that holds it"
            )
    return EvalCases(tuple(test), tuple(pool), classes.count, classes)


def _numbered(every: set[int], names: LabelNames) -> ClassMap:
    """The labels' own classes 1..top, refused when a value in between appears in no label."""
    top = max(every)
    missing = sorted(set(range(top + 1)) - every)
    if missing:
        held = sorted(every - {0})
        example = ",".join(names.name_of(v) or str(v) for v in held[:2])
        raise InputError(
            f"class {missing[0]} appears in no label (the labels hold {', '.join(map(str, sorted(every)))}); "
            f"choose classes with --classes (e.g. --classes {example}) or number them 1..{len(every) - 1} without gaps"
        )
    return numbered_classes(max(2, top + 1), names)


def shot_subset(pool: Sequence[LabelledCase], k: int, repeat: int, seed: int) -> list[LabelledCase]:
    """The ``k`` training cases of few-shot run ``repeat``: seeded, the same for every checkpoint and baseline."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k * 1_009 + repeat)
    order = torch.randperm(len(pool), generator=gen).tolist()[:k]
    return [pool[i] for i in sorted(order)]


@dataclass
class Prepared:
    """One preprocessed case: image (1, X, Y, Z) float32 in 0..1 (a MetaTensor) and label (1, X, Y, Z) uint8."""

    id: str
    image: MetaTensor
    label: torch.Tensor

    def item(self) -> dict[str, Any]:
        """The dict ``ctmae.seg.train.evaluate`` reads (label as a float MetaTensor, as ``cache_cases`` gives)."""
        return {"image": self.image, "label": MetaTensor(self.label.float())}


@dataclass
class PreparedCases:
    """Each case preprocessed once per setting (spacing, HU window, padding to the crop) and kept in memory, its
    label values turned into the chosen classes (``label_values``; () keeps the labels' numbering)."""

    label_values: tuple[int, ...] = ()
    store: dict[tuple, Prepared] = field(default_factory=dict)

    def get(self, data: PreprocessConfig, cases: Sequence[LabelledCase]) -> list[Prepared]:
        key = (tuple(data.spacing), tuple(data.hu_window), data.crop, self.label_values)
        transform = None
        for case in cases:
            if (key, case.id) not in self.store:
                if transform is None:  # the chosen classes become 1..K after the preprocessing
                    select = SelectClassesd(["label"], self.label_values)
                    transform = Compose([preprocess_transforms(data, label=True), select])
                self.store[key, case.id] = _prepare(case, transform)
        return [self.store[key, c.id] for c in cases]


def _prepare(case: LabelledCase, transform) -> Prepared:
    """Image and label through one chain, so they stay aligned; InputError naming the pair if that fails."""
    try:
        d = transform(case.item())
    except InputError:
        raise
    except Exception as e:  # MONAI wraps reader errors in chains: report the innermost one
        while e.__cause__ is not None:
            e = e.__cause__
        if isinstance(e, InputError):
            raise e from None
        raise InputError(f"{case.image.files[0]}: could not preprocess: {str(e).splitlines()[0]}") from None
    return Prepared(case.id, d["image"], d["label"].as_tensor().round().to(torch.uint8))
