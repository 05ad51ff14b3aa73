"""The pictures and the static HTML report of a finished eval, written beside its record.

``evals/<id>/success.png`` (per-task success with 95% CI whiskers), ``rollouts.png`` (a contact sheet
of the recorded rollouts, read back from their MP4s) and ``report.html`` linking them and the videos.
"""

from __future__ import annotations

from foresight.flows.eval import REPORT_NAME as REPORT, VIDEO_STRIDE
from foresight.pipelines.viz import (EvalReportPage, ReportImage, SheetLayout, contact_sheet, mp4_frames, png_bytes,
                           render_eval_html, rollout_row, success_bar_chart)
from foresight.schemas.eval import EpisodeResult, EvalRecord
from foresight.storage.evals import EvalStore
from foresight.storage.provenance import now_iso

BAR_CHART, ROLLOUT_SHEET = "success.png", "rollouts.png"


def write_report(store: EvalStore, record: EvalRecord, episodes: list[EpisodeResult]) -> str:
    """Write the bar chart, the rollout sheet (when videos exist) and report.html; returns its URL."""
    eval_id = record.eval_id
    label = record.key.policy.label()
    rows = [s.model_dump() for s in record.summary]
    images = [ReportImage(caption="success rate per task, 95% Wilson CI", src=BAR_CHART)]
    store.write_file(eval_id, BAR_CHART, png_bytes(success_bar_chart(rows, f"{eval_id}: {label}")))
    recorded = [r for r in episodes if r.video]
    videos = [ReportImage(caption=f"{r.task} seed {r.seed}: {'success' if r.success else 'failure'} "
                                  f"after {r.steps} steps", src=r.video) for r in recorded]
    if recorded:
        sheet_rows = [rollout_row(f"{r.task} seed {r.seed}\n{'success' if r.success else 'failure'}",
                                  mp4_frames(store.read_file(eval_id, r.video)),
                                  r.success_step, VIDEO_STRIDE) for r in recorded]
        sheet = contact_sheet(sheet_rows, SheetLayout(panel_h=96, panel_w=96), title=f"{eval_id}: {label}")
        store.write_file(eval_id, ROLLOUT_SHEET, png_bytes(sheet))
        images.append(ReportImage(caption="recorded rollouts (frames spread over each episode)", src=ROLLOUT_SHEET))
    page = EvalReportPage(
        eval_id=eval_id, generated=now_iso(),
        summary={"policy": label, "status": record.status, "episodes": len(episodes),
                 "overall": f"{record.overall.successes}/{record.overall.episodes}" if record.overall else "",
                 "seeds": record.key.seeds, "step_limits": record.key.step_limits, "camera": record.key.camera,
                 "size": record.key.size, "device": record.key.device, "checkpoint": record.key.policy.checkpoint_sha256,
                 "version_changes": record.version_changes},
        tasks=rows + [g.model_dump() for g in record.groups], latency_ms=record.latency_ms, versions=record.key.policy.versions,
        episodes=[r.model_dump() for r in episodes], images=images, videos=videos)
    return store.write_file(eval_id, REPORT, render_eval_html(page).encode())
