"""``foresight demo``: the main job on tiny models (what ``make demo`` runs)."""

from __future__ import annotations

import os

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(root: str = ROOT_OPTION,
         out: str = typer.Option(None, help="Folder for pictures (default <root>/demo).")) -> None:
    """Ingest a few MetaWorld episodes and run every stage of the chain on tiny models."""
    from foresight.flows.demo import run_demo

    data_root = get_root(root, writable=True)
    if not data_root.is_local:
        raise ValueError("foresight demo writes pictures locally: use a local --root")
    run_demo(data_root, out or os.path.join(data_root.url, "demo"), typer.echo)
