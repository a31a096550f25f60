"""The ``ctmae`` command line: one module per subcommand, each options -> config -> one library call.

This package is the only place that prints; ``common`` holds the app, consoles and error handling they share.
"""

from __future__ import annotations

from ctmae.cli import pretrain  # noqa: F401  (registers the subcommand)
from ctmae.cli import reconstruct, embed  # noqa: F401
from ctmae.cli.common import app


def main() -> None:
    app(prog_name="ctmae")
