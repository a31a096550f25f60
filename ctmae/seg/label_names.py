"""What the values of a label map are called: the names file beside or above the labels, read in the forms datasets
ship, and the agreement of every label's names before cases are pooled or compared.

Names files (JSON) hold a ``labels`` mapping in one of two forms: nnU-Net v2's name -> value
(``{"background": 0, "liver": 1}``) or MSD's value -> name (``{"0": "background", "1": "liver"}``), as in
``dataset.json`` of both layouts and a TotalSegmentator-style ``labels.json``. They are looked for beside each label
file and up to ``SEARCH_UP`` folders above (an nnU-Net or MSD root sits above ``labelsTr/``); a file named
explicitly (``--label-names``) may also be the mapping itself.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctmae.io.checks import InputError

NAME_FILES = ("labels.json", "dataset.json")  # in this order of preference within one folder
SEARCH_UP = 2  # folders above a label's own folder searched for a names file
_SHOWN = 8  # names listed in a message


def read_names(path: str | os.PathLike, explicit: bool = True) -> dict[int, str] | None:
    """Label value -> name (background 0 left out) from a names file.

    Args:
        path: a JSON file with a ``labels`` mapping in either form (or, when ``explicit``, the mapping itself).
        explicit: the user named the file: anything unusable is an error. Otherwise a file that is not JSON or holds
            no ``labels`` mapping is no names file (None), and only a ``labels`` mapping in no known form is one.

    Raises:
        InputError: one line naming the file and what is wrong with it.
    """
    if explicit and not Path(path).is_file():
        raise InputError(f"{path}: names file does not exist")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if not explicit:
            return None
        raise InputError(f"{path}: unreadable names file ({type(e).__name__}); expected JSON") from None
    mapping = data.get("labels", data if explicit else None) if isinstance(data, dict) else None
    if not isinstance(mapping, dict):
        if not explicit:
            return None
        raise InputError(f'{path}: holds no label names; expected a \'labels\' mapping, e.g. {{"1": "liver"}}')
    names: dict[int, str] = {}
    for key, value in mapping.items():
        if isinstance(value, list) and len(value) == 1:  # nnU-Net v2 region of one label
            value = value[0]
        if isinstance(value, str) and key.strip().isdigit():  # MSD / TotalSegmentator: value -> name
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: name -> value
            number, name = value, key
        elif isinstance(value, list):  # a region of several labels: no single value to choose
            continue
        else:
            raise InputError(
                f'{path}: label names must map values to names ({{"1": "liver"}}) or names to values '
                f'({{"liver": 1}}); found {key!r}: {value!r}'
            )
        if number:
            names.setdefault(number, name.strip())
    return names


def _names_near(folder: str) -> tuple[str, tuple[tuple[int, str], ...]] | None:
    """(file, its names) of the first names file in ``folder`` or up to SEARCH_UP folders above, or None."""
    path = Path(folder)
    for _ in range(SEARCH_UP + 1):
        for name in NAME_FILES:
            candidate = path / name
            if candidate.is_file():
                names = read_names(candidate, explicit=False)
                if names is not None:
                    return str(candidate), tuple(sorted(names.items()))
        if path.parent == path:
            break
        path = path.parent
    return None


def same_name(a: str, b: str) -> bool:
    """Names that differ only in case, spaces, hyphens or underscores are one name ("Kidney left" = "kidney_left")."""
    return _key(a) == _key(b)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


@dataclass(frozen=True)
class LabelNames:
    """The names files of a set of labels (each with its names), checked to agree wherever a value is asked for."""

    files: tuple[tuple[str, dict[int, str]], ...]  # (file, value -> name), one entry per distinct file

    @classmethod
    def of(cls, label_files: Sequence[str | os.PathLike], names_file: str | os.PathLike | None = None) -> LabelNames:
        """The names for ``label_files``: ``names_file`` for all of them, or each label's nearest names file."""
        if names_file is not None:
            return cls(((os.fspath(names_file), read_names(names_file) or {}),))
        folders = {os.path.dirname(os.path.abspath(f)) for f in label_files}
        found = {_names_near(folder) for folder in folders}
        return cls(tuple((path, dict(names)) for path, names in sorted(f for f in found if f is not None)))

    @property
    def known(self) -> bool:
        return any(names for _, names in self.files)

    def name_of(self, value: int) -> str:
        """The name every names file gives ``value`` ("" when none names it).

        Raises:
            InputError: two names files name ``value`` differently (the labels number their classes differently).
        """
        return self.named(value)[0]

    def named(self, value: int) -> tuple[str, str]:
        """(the name every names file gives ``value``, the first file naming it); ("", "") when none does.

        Raises:
            InputError: two names files name ``value`` differently (the labels number their classes differently).
        """
        named = [(path, names[value]) for path, names in self.files if value in names]
        for path, name in named[1:]:
            if not same_name(name, named[0][1]):
                raise InputError(
                    f"label value {value} is {named[0][1]!r} in {named[0][0]} but {name!r} in {path}: these labels "
                    f"number their classes differently; pool or compare only labels numbered alike"
                )
        return (named[0][1], named[0][0]) if named else ("", "")

    def value_of(self, name: str) -> int:
        """The label value of class ``name`` in every names file that names it.

        Raises:
            InputError: no names file, no class of that name, or two files giving it different values.
        """
        if not self.known:
            raise InputError(
                f"--classes {name}: no label names found (no {' or '.join(NAME_FILES)} beside or above the labels); "
                f"pass --label-names FILE, or give the value: --classes {name}=VALUE"
            )
        found = [(path, v) for path, names in self.files for v, n in sorted(names.items()) if same_name(n, name)]
        if not found:
            every = sorted({n for _, names in self.files for n in names.values()})
            close = difflib.get_close_matches(name, every, n=3)
            shown = ", ".join(every[:_SHOWN]) + (f", … ({len(every)} names)" if len(every) > _SHOWN else "")
            hint = f"did you mean {' or '.join(close)}?" if close else f"it names {shown}"
            files = ", ".join(path for path, _ in self.files)
            raise InputError(f"--classes {name}: no class of that name in {files} ({hint})")
        for path, value in found[1:]:
            if value != found[0][1]:
                raise InputError(
                    f"class {name!r} is label value {found[0][1]} in {found[0][0]} but {value} in {path}: these "
                    f"labels number their classes differently; pool or compare only labels numbered alike"
                )
        return found[0][1]
