"""``foresight presets``: the named release recipes and every setting they fix, with sources."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("presets")(presets)


def presets(markdown: bool = typer.Option(False, "--markdown", help="Print docs/RECIPES.md (all tables).")) -> None:
    """List the presets (svam-calvin, svam-metaworld, vpp) with the settings each fixes per stage."""
    from foresight.schemas.presets import PRESET_NAMES, STAGE_MODULES, preset_table
    from foresight.schemas.presets.docs import recipes_markdown

    if markdown:
        typer.echo(recipes_markdown(), nl=False)
        return
    for name in PRESET_NAMES:
        typer.echo(name)
        for stage in STAGE_MODULES:
            table = preset_table(name, stage)
            if table:
                settings = ", ".join(f"{key}={item.value!r}" for key, item in table.items())
                typer.echo(f"  {stage}: {settings}")
