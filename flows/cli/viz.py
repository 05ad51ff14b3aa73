"""``foresight viz clip`` (contact sheet of one clip) and ``foresight report`` (static HTML page)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import typer

from foresight.flows.cli.common import ROOT_OPTION, fail, get_root, sub_app
from foresight.flows.cli.targets import DEFAULT_STATS_SAMPLE, array_statistics
from foresight.pipelines.audit import spread_indices
from foresight.pipelines.viz import (
    ExtraMap,
    ReportImage,
    ReportPage,
    SheetLayout,
    clip_rows,
    contact_sheet,
    png_bytes,
    render_report_html,
)
from foresight.storage import audit, references
from foresight.storage.fs import Root
from foresight.storage.provenance import now_iso
from foresight.storage.targets import TargetStore

def clip_sheet(root: Root, version_ids: Sequence[str], clip_id: str | None = None, clip_index: int | None = None,
               max_frames: int = 8, layout: SheetLayout | None = None,
               extra_maps: Sequence[ExtraMap] = ()) -> tuple[np.ndarray, audit.ClipMaterial]:
    """Contact sheet (H, W, 3) uint8 of one clip over the given versions (their upstream video versions
    are added), with optional extra maps such as decoupler predictions; returns the material too."""
    material = audit.clip_material(root, version_ids, clip_id=clip_id, clip_index=clip_index)
    rows = clip_rows(material, max_frames=max_frames, extra_maps=extra_maps)
    clip = material.clip
    title = (f"clip {clip.clip_id} (#{material.clip_index} of plan {material.plan_id}): {clip.dataset}/"
             f"{clip.episode_id} {clip.camera} start {clip.start} stride {clip.stride}: {clip.instruction}")
    return contact_sheet(rows, layout, title=title), material


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def cmd_clip(clip: str | None = typer.Option(None, "--clip", help="Clip id from the plan."),
             index: int | None = typer.Option(None, "--index", min=0, help="Plan row of the clip (instead of --clip)."),
             versions: str = typer.Option(..., "--versions", help="Comma-separated version ids (video, teacher...)."),
             out: Path = typer.Option(Path("sheet.png"), "--out", help="PNG file to write."),
             max_frames: int = typer.Option(8, "--max-frames", min=1, help="Frames shown per row (spread over the clip)."),
             panel: int = typer.Option(96, "--panel", min=16, help="Panel size in pixels."),
             root: str | None = ROOT_OPTION) -> None:
    """Observed frame, generated frames, and PCA-RGB of the one-step features and of each teacher map."""
    if (clip is None) == (index is None):
        fail("give --clip ID or --index N (one of them)")
    version_ids = [v.strip() for v in versions.split(",") if v.strip()]
    sheet, material = clip_sheet(get_root(root), version_ids, clip_id=clip, clip_index=index, max_frames=max_frames,
                                 layout=SheetLayout(panel_h=panel, panel_w=panel))
    _write(out, png_bytes(sheet))
    for note in material.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {out} ({sheet.shape[1]}x{sheet.shape[0]})")


def build_report(root: Root, version_id: str, out: Path, clips: int = 3, sample: int | None = DEFAULT_STATS_SAMPLE,
                 verify: bool = False, max_frames: int = 8) -> ReportPage:
    """Write ``out`` (HTML) and its contact sheets under ``<out stem>_files/``; returns the page record."""
    store = TargetStore(root)
    manifest = store.manifest(version_id)
    summary = audit.summarize(store, version_id)
    page = ReportPage(version_id=version_id, generated=now_iso(), summary=summary.model_dump(),
                      manifest=manifest.model_dump(mode="json"),
                      lineage=audit.lineage_tree(root, version_id).model_dump(),
                      events=audit.version_events(root, version_id),
                      users=[u.model_dump() for u in references.users_of(store, version_id)],
                      stats=array_statistics(store.open(version_id), sample),
                      verify=audit.verify_version(store, version_id) if verify else None)
    files = out.parent / f"{out.stem}_files"
    for index in spread_indices(manifest.num_clips, clips):
        try:
            sheet, material = clip_sheet(root, [version_id], clip_index=index, max_frames=max_frames)
        except ValueError as err:
            page.notes.append(f"no contact sheet for clip #{index}: {err}")
            continue
        name = f"clip-{index:06d}.png"
        _write(files / name, png_bytes(sheet))
        page.images.append(ReportImage(caption=f"clip {material.clip.clip_id} (#{index})", src=f"{files.name}/{name}"))
        page.notes.extend(material.notes)
    _write(out, render_report_html(page).encode())
    return page


def cmd_report(version: str = typer.Argument(..., help="Target version id."),
               out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (images beside it)."),
               clips: int = typer.Option(3, "--clips", min=0, help="Contact sheets of this many clips."),
               sample: int = typer.Option(DEFAULT_STATS_SAMPLE, "--sample", min=1, help="Clips for array statistics."),
               verify: bool = typer.Option(False, "--verify", help="Re-hash every shard and show the result."),
               root: str | None = ROOT_OPTION) -> None:
    """A static HTML page: manifest, lineage, users, array statistics and contact sheets of a few clips."""
    page = build_report(get_root(root), version, out, clips=clips, sample=sample, verify=verify)
    typer.echo(f"wrote {out} ({len(page.images)} contact sheets)")


def register(app: typer.Typer) -> None:
    """Add ``viz clip`` and ``report``."""
    viz = sub_app(app, "viz", "Pictures of target versions.")
    viz.command("clip")(cmd_clip)
    app.command("report")(cmd_report)
