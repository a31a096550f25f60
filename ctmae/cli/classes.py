"""The ``--classes`` and ``--label-names`` options that finetune-seg, evaluate and study share, and their
resolution against the labels' names before any label is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from ctmae.cli.common import UsageError

ClassesOption = Annotated[
    Optional[str],
    typer.Option(
        "--classes",
        help="Classes to segment, comma-separated, as NAME=VALUE (liver=5), NAME (looked up in a dataset.json or "
        "labels.json beside or above the labels, or --label-names) or VALUE; they become classes 1..K in this "
        "order and every other label value background [default: every label value, as numbered]",
        show_default=False,
    ),
]
LabelNamesOption = Annotated[
    Optional[Path],
    typer.Option(
        "--label-names",
        help='JSON naming the label values (value to name, "1": "liver", or name to value, "liver": 1; alone or '
        'under "labels" as in a dataset.json), instead of the dataset.json / labels.json found beside or above the '
        "labels",
        show_default=False,
    ),
]


def check_classes_option(spec: Optional[str]) -> None:
    """Refuse a malformed ``--classes`` at once, before anything slow (UsageError)."""
    from ctmae.seg.classes import parse_classes

    try:
        if spec is not None:
            parse_classes(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_classes(cases: Sequence, spec: Optional[str], names_file: Optional[Path]):
    """(the classes ``--classes`` chooses or None, the labels' names), checked before any label is read.

    Raises:
        UsageError: a malformed ``--classes``.
        InputError: a name no names file knows, or names files that disagree about a chosen class.
    """
    from ctmae.seg.classes import choose_classes
    from ctmae.seg.label_names import LabelNames

    check_classes_option(spec)
    try:
        names = LabelNames.of([c.label.files[0] for c in cases], names_file)
        return (None if spec is None else choose_classes(spec, names)), names
    except ValueError as e:
        raise UsageError(str(e)) from None
