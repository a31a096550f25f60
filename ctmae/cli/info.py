"""``ctmae info``: a table of what a checkpoint or export folder holds and which commands and networks it feeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ctmae.cli.common import app, console, run_command


@app.command()
def info(
    path: Annotated[
        Path,
        typer.Argument(help="An MAE or segmentation checkpoint (.pt), or a ctmae export folder.", show_default=False),
    ],
) -> None:
    """Show a checkpoint's or export's architecture, preprocessing, training summary and what it can feed."""

    def body() -> None:
        from ctmae.share.info import describe

        found = describe(path)
        table = Table(title=escape(f"{found.path}: {found.kind}"), show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for title, rows in found.sections.items():
            table.add_section()
            table.add_row(f"[cyan]{title}[/cyan]", "")
            for key, value in rows:
                table.add_row(escape(key), escape(value))
        table.add_section()
        table.add_row("[cyan]feeds[/cyan]", "")
        for line in found.feeds:
            what, _, how = line.partition(": ")
            table.add_row(escape(what), escape(how))
        console.print(table)

    run_command(body)
