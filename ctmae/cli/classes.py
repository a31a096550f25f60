"""The ``--classes`` and ``--label-names`` options that finetune-seg, evaluate and study share (resolved against
the labels' names by ``ctmae.api.classes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
