"""``foresight info``: what a data root holds."""

from __future__ import annotations

import json

import typer

from flows.cli.common import get_root


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(root: str = typer.Argument(None, envvar="FORESIGHT_ROOT", help="Data root (default ./foresight-data)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Datasets (episodes, frames, cameras, bytes, quarantined inputs), plans and target versions."""
    from storage.summary import root_summary

    data_root = get_root(root)
    if not data_root.exists(""):
        raise ValueError(f"data root {data_root.url} does not exist")
    summary = root_summary(data_root)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"root: {summary['root']}")
    for ds in summary["datasets"]:
        cams = ", ".join(f"{c} {'x'.join(map(str, s))}" for c, s in ds["cameras"].items())
        typer.echo(f"dataset {ds['dataset']} ({ds['source']}, {ds['fps']:g} fps): {ds['episodes']} episodes, "
                   f"{ds['frames']} frames, {ds['bytes'] / 1e6:.1f} MB, cameras [{cams}], "
                   f"{ds['quarantined']} quarantined, {ds['segments']} language segments")
        if ds["source_bytes"]:
            codecs = ", ".join(f"{c} {codec}" for c, codec in ds["frame_codecs"].items())
            typer.echo(f"  store {ds['bytes'] / 1e6:.2f} MB vs source {ds['source_bytes'] / 1e6:.2f} MB: "
                       f"{ds['store_vs_source']:.2f}x (frames: {codecs or 'raw'})")
        typer.echo(f"  tasks: {', '.join(ds['tasks'])}")
        for col, st in ds["stats"].items():
            mean = ", ".join(f"{v:.3g}" for v in st["mean"][:8])
            typer.echo(f"  stats {col}: mean [{mean}{', ...' if len(st['mean']) > 8 else ''}]")
    for plan in summary["plans"]:
        typer.echo(f"plan {plan['plan']}: dataset {plan['dataset']}, {plan['clips']} clips")
    for version in summary["targets"]:
        if version["status"] == "unreadable":
            typer.echo(f"target {version['version']}: unreadable ({version['error']})")
            continue
        typer.echo(f"target {version['version']}: {version['status']}, {version['clips']} clips, "
                   f"model {version['model']}")
    for export in summary["exports"]:
        typer.echo(f"export {export}")
