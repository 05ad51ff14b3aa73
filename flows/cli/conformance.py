"""``foresight conformance DIR``: foresight's implementation against a reference fixture folder."""

from __future__ import annotations

from pathlib import Path

import typer

from foresight.flows.cli.common import EXIT_FAILED, fail

EXIT_NOT_A_FIXTURE = 2
"""The folder is not a conformance fixture (no io.npz/config.json, or none of the known groups)."""


def register(app: typer.Typer) -> None:
    app.command("conformance")(conformance)


def conformance(
    fixture: Path = typer.Argument(..., help="Fixture folder (svam_tiny or da3_tiny format): io.npz, config.json, "
                                             "weights."),
    group: list[str] = typer.Option(None, "--group", "-g", help="Only this group (repeatable): extract, "
                                                                "decoupler, glue, denoiser, da3."),
) -> None:
    """Recompute every array of the fixture with foresight's code; one line per array (group, name,
    max abs error, atol, rtol, ok/FAIL). Exit 1 when any array is out of tolerance, 2 for a folder
    that is not a fixture."""
    from foresight.pipelines.conformance import GROUP_MODULES, check_fixture, load_fixture

    unknown = sorted(set(group or []) - set(GROUP_MODULES))
    if unknown:
        fail(f"--group {', '.join(unknown)}: unknown; groups: {', '.join(GROUP_MODULES)}")
    try:
        load_fixture(fixture)
    except (ValueError, OSError) as err:
        fail(f"{fixture}: not a conformance fixture ({' '.join(str(err).split())})", EXIT_NOT_A_FIXTURE)
    results = check_fixture(fixture, list(group) if group else None)
    if not results:
        fail(f"{fixture}: holds none of the groups {', '.join(GROUP_MODULES)}", EXIT_NOT_A_FIXTURE)
    for r in results:
        status = "ok" if r.passed else "FAIL"
        detail = f"  {r.detail}" if r.detail else ""
        typer.echo(f"{r.group:<10} {r.name:<36} {r.max_abs_err:>11.3e} atol {r.atol:<8.1e} rtol {r.rtol:<8.1e} "
                   f"{status}{detail}")
    failed = sum(not r.passed for r in results)
    typer.echo(f"{len(results) - failed}/{len(results)} arrays within tolerance")
    if failed:
        raise typer.Exit(EXIT_FAILED)
