"""``python -m ctmae`` (and ``torchrun -m ctmae``) runs the CLI."""

from ctmae.cli import main

main()
