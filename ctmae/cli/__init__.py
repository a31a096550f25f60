"""The ``ctmae`` command line: one module per subcommand, each options -> config -> one library call.

This package is the only place that prints; ``common`` holds the app, consoles and error handling they share.
"""

from __future__ import annotations

import sys

from ctmae.runtime import openmp

openmp.decide()  # first: OpenMP's wait policy must be in the environment before any import loads torch
from ctmae.cli import (  # noqa: E402, F401
    embed,
    evaluate,  # noqa: F401
    export,  # noqa: F401
    finetune,  # noqa: F401
    info,  # noqa: F401
    mask_check,  # noqa: F401
    prepare,  # noqa: F401
    pretrain,  # noqa: F401  (registers the subcommand)
    reconstruct,
    segment,  # noqa: F401
    study,  # noqa: F401
)
from ctmae.cli.common import app  # noqa: E402


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 terminal shows escapes instead of crashing on "³" or "━"
        stream.reconfigure(errors="backslashreplace")
    app(prog_name="ctmae")
