"""``deepmask weights``: the weights folders there are, their presets and what each was measured at."""

from __future__ import annotations

import json

import click
from rich.table import Table

from deepmask_cli.cli.common import err, esc, fail, out
from deepmask_cli.core.errors import UserError


@click.command()
@click.argument("folders", nargs=-1, type=click.Path())
def weights(folders) -> None:
    """List the shipped weights (or FOLDERS) with their presets (propose
    --preset NAME; the first is the default), recall and time per photo.

    \b
    deepmask weights
    deepmask weights runs/train-3/weights
    """
    from deepmask_cli.pipeline.loading import describe_weights

    try:
        rows = describe_weights(list(folders) or None)
    except UserError as e:
        fail(str(e))
    for w in rows:
        table = Table(title=esc(f"{w['name']}{' (default)' if w['default'] else ''}"), caption=esc(w["on"] or ""),
                      title_justify="left")
        for name in ("preset", "settings", "mask AR@100", "box AR@100", "s/photo"):
            table.add_column(name, justify="left" if name in ("preset", "settings") else "right")
        for p in w["presets"]:
            m = p["measured"]
            table.add_row(esc(p["name"]), esc(json.dumps(p["settings"]) if p["settings"] else "its defaults"),
                          *(f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "-"
                            for k in ("mask_AR@100", "box_AR@100", "seconds_per_photo")))
        out.print(table)
    if not rows:
        err.print("[red]✗[/] no weights found")
