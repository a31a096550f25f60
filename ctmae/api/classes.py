"""Which classes a segmenter learns: chosen by a ``classes`` spec (``liver=5,spleen``) against the labels' names,
or the labels' own numbering, checked against the values the labels hold."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ctmae.api.common import SILENT, OptionError, Reporter


def check_classes_spec(spec: str | None) -> None:
    """Refuse a malformed ``classes`` spec at once, before anything slow (OptionError)."""
    from ctmae.seg.classes import parse_classes

    try:
        if spec is not None:
            parse_classes(spec)
    except ValueError as e:
        raise OptionError(str(e)) from None


def resolve_classes(cases: Sequence, spec: str | None, names_file: str | os.PathLike | None):
    """(the classes ``spec`` chooses or None, the labels' names), checked before any label is read.

    Raises:
        OptionError: a malformed ``spec``.
        InputError: a name no names file knows, or names files that disagree about a chosen class.
    """
    from ctmae.seg.classes import choose_classes
    from ctmae.seg.label_names import LabelNames

    check_classes_spec(spec)
    try:
        names = LabelNames.of([c.label.files[0] for c in cases], names_file)
        return (None if spec is None else choose_classes(spec, names)), names
    except ValueError as e:
        raise OptionError(str(e)) from None


def classes_to_learn(
    cases: Sequence,
    spec: str | None,
    names_file: str | os.PathLike | None,
    num_classes: int | None,
    reporter: Reporter = SILENT,
):
    """The classes to learn (``ctmae.seg.classes``): chosen by ``spec`` (checked against ``num_classes`` and the
    labels' values), or the labels' own numbering up to ``num_classes`` or the largest value; named where the labels'
    names say so. Every label is read once, its geometry and values checked (``reporter`` hears each).

    Raises:
        OptionError: ``num_classes`` that disagrees with ``spec``. InputError: a label with a value ``num_classes``
            does not cover, or a class ``spec`` chooses that no label holds.
    """
    from ctmae.seg.classes import check_present, numbered_classes

    chosen, names = resolve_classes(cases, spec, names_file)
    if chosen is not None and num_classes is not None and num_classes != chosen.count:
        raise OptionError(
            f"--num-classes {num_classes}, but --classes chooses {chosen.count - 1} class(es) ({chosen.count} with "
            f"background); drop --num-classes"
        )
    present = _label_values(cases, num_classes if chosen is None else None, reporter)
    if chosen is None:
        return numbered_classes(num_classes or max(2, max(present) + 1), names)
    check_present(chosen, present)
    return chosen


def _label_values(cases: Sequence, num_classes: int | None, reporter: Reporter) -> set[int]:
    """Check every pair's geometry and values, with progress; returns the label values the cases hold."""
    from ctmae.io.checks import InputError
    from ctmae.seg.data import case_values

    present: set[int] = set()
    reporter.start("checking labels", len(cases))
    for case in cases:
        values = case_values(case)
        if num_classes is not None and max(values) >= num_classes:
            raise InputError(
                f"{case.label.files[0]}: holds class {max(values)}, but --num-classes is {num_classes}; choose "
                f"the classes to learn with --classes (e.g. --classes liver=5), every other value background"
            )
        present |= values
        reporter.advance()
    return present
