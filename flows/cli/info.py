"""``foresight info``: what a data root holds."""

from __future__ import annotations

import json

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(ctx: typer.Context,
         positional_root: str = typer.Argument(None, metavar="ROOT", show_default=False,
                                               help="Deprecated: use --root (as every other command)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON."),
         root: str = ROOT_OPTION) -> None:
    """Datasets (episodes, frames, cameras, bytes, quarantined inputs), plans and target versions."""
    from foresight.storage.summary import root_summary

    source = ctx.get_parameter_source("root")
    given_root = None if source is None or source.name == "ENVIRONMENT" else root
    data_root = get_root(_root_url(positional_root, given_root) or root)
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


def _root_url(positional: str | None, option: str | None) -> str | None:
    """The root named by ``--root``, or by the deprecated positional argument (None: neither).

    The positional form still works, with a warning on stderr, and wins over ``$FORESIGHT_ROOT`` as
    it always did; naming two different roots on the command line is a usage error (exit 2).
    """
    if positional is None:
        return option
    if option is not None and option != positional:
        raise typer.BadParameter(f"names root {positional!r} but --root names "
                                 f"{option!r}: give one", param_hint="ROOT")
    typer.echo(f"warning: `foresight info {positional}` is deprecated: use `foresight info --root {positional}`",
               err=True)
    return positional
