"""Pictures of targets: PCA-to-RGB of token maps, contact sheets, and the static HTML report.

Pure: functions take arrays and records and return arrays, PNG bytes or HTML text; callers write them.

Contact sheets are grids of labelled rows::

    rows = [SheetRow("episode 0", [first, middle, last], ["first", "middle", "last"]), ...]
    png = png_bytes(contact_sheet(rows, SheetLayout(panel_h=96, panel_w=96), title="demo"))

Token maps become pictures through a PCA fitted per clip over all of its tokens (every frame and
position), so colours are comparable across the frames of a clip. A :class:`PcaBasis` fitted on one
map can colour another (e.g. a decoupler prediction with its teacher's basis).
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from foresight.pipelines.audit import spread_indices
from foresight.schemas.base import StrictModel

if TYPE_CHECKING:  # only the type: pipelines never read stores
    from foresight.storage.audit import ClipMaterial

BACKGROUND = (24, 24, 24)
TEXT = (230, 230, 230)
EXACT_PCA_MAX_CHANNELS = 512
"""Up to this many channels the PCA is exact (eigh of the C x C covariance); above, randomized."""


# PCA to RGB -----------------------------------------------------------------------------------
@dataclass
class PcaBasis:
    """Top-3 principal directions of a set of tokens and the range each maps onto [0, 255]."""

    mean_C: np.ndarray
    components_3C: np.ndarray
    low_3: np.ndarray
    high_3: np.ndarray

    def project(self, tokens_NC: np.ndarray) -> np.ndarray:
        """(N, C) tokens -> (N, 3) coordinates along the three directions."""
        return (np.asarray(tokens_NC, dtype=np.float32) - self.mean_C) @ self.components_3C.T

    def to_rgb(self, tokens_THWC: np.ndarray) -> np.ndarray:
        """(T, h, w, C) tokens -> (T, h, w, 3) uint8 colours."""
        if tokens_THWC.shape[-1] != self.mean_C.shape[0]:
            raise ValueError(f"PCA basis has {self.mean_C.shape[0]} channels, tokens have {tokens_THWC.shape[-1]}")
        coords = self.project(tokens_THWC.reshape(-1, tokens_THWC.shape[-1]))
        span = np.where(self.high_3 > self.low_3, self.high_3 - self.low_3, 1.0)
        unit = np.clip((coords - self.low_3) / span, 0.0, 1.0)
        unit[:, self.high_3 <= self.low_3] = 0.5  # a flat direction is drawn mid-grey, not black
        return (unit * 255.0 + 0.5).astype(np.uint8).reshape(*tokens_THWC.shape[:-1], 3)


def fit_pca(tokens_THWC: np.ndarray, seed: int = 0) -> PcaBasis:
    """PCA over every token of a map; ranges are the 1st-99th percentiles of the projections."""
    tokens_NC = np.asarray(tokens_THWC, dtype=np.float32).reshape(-1, tokens_THWC.shape[-1])
    finite = np.isfinite(tokens_NC).all(axis=1)
    tokens_NC = tokens_NC[finite] if finite.any() else np.zeros((1, tokens_NC.shape[1]), np.float32)
    mean_C = tokens_NC.mean(axis=0)
    centred = tokens_NC - mean_C
    components = _top_components(centred, 3, seed)
    coords = centred @ components.T
    low, high = np.percentile(coords, 1, axis=0), np.percentile(coords, 99, axis=0)
    return PcaBasis(mean_C=mean_C, components_3C=components, low_3=low.astype(np.float32),
                    high_3=high.astype(np.float32))


def _top_components(centred_NC: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(k, C) leading right singular vectors, signs fixed (largest loading positive); zero rows if C < k."""
    channels = centred_NC.shape[1]
    if channels <= EXACT_PCA_MAX_CHANNELS:
        cov = centred_NC.T.astype(np.float64) @ centred_NC.astype(np.float64)
        values, vectors = np.linalg.eigh(cov)
        top = vectors[:, np.argsort(values)[::-1][:k]].T
    else:
        top = _randomized_components(centred_NC, k, seed)
    top = top * np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    out = np.zeros((k, channels), dtype=np.float32)
    out[:len(top)] = top
    return out


def _randomized_components(centred_NC: np.ndarray, k: int, seed: int, oversample: int = 8,
                           iterations: int = 4) -> np.ndarray:
    """Subspace iteration (Halko et al.): cost O(N C (k + oversample)) instead of a full SVD."""
    rng = np.random.default_rng(seed)
    width = min(k + oversample, *centred_NC.shape)
    basis, _ = np.linalg.qr(centred_NC @ rng.standard_normal((centred_NC.shape[1], width)).astype(np.float32))
    for _ in range(iterations):
        basis, _ = np.linalg.qr(centred_NC @ (centred_NC.T @ basis))
    _, _, vt = np.linalg.svd(basis.T @ centred_NC, full_matrices=False)
    return vt[:k]


def pca_rgb(tokens_THWC: np.ndarray, basis: PcaBasis | None = None) -> np.ndarray:
    """(T, h, w, C) tokens -> (T, h, w, 3) uint8, with a PCA fitted on these tokens unless given."""
    return (basis or fit_pca(tokens_THWC)).to_rgb(tokens_THWC)


# contact sheets -------------------------------------------------------------------------------
class SheetLayout(StrictModel):
    """Geometry of a contact sheet (pixels)."""

    panel_h: int = Field(default=96, ge=8, description="Height of one panel.")
    panel_w: int = Field(default=96, ge=8, description="Width of one panel.")
    pad: int = Field(default=4, ge=0, description="Gap between panels and around the sheet.")
    label_width: int = Field(default=200, ge=0, description="Width of the row-label column.")
    caption_height: int = Field(default=14, ge=0, description="Caption strip under each panel.")
    title_height: int = Field(default=20, ge=0, description="Title strip, used only when a title is given.")
    font_size: int = Field(default=11, ge=6, description="Text size.")

    def size(self, rows: int, cols: int, titled: bool = False) -> tuple[int, int]:
        """(height, width) of a sheet of ``rows`` x ``cols`` panels."""
        width = self.label_width + cols * (self.panel_w + self.pad) + self.pad
        height = self.pad + rows * (self.panel_h + self.caption_height + self.pad)
        return height + (self.title_height if titled else 0), width

    def panel_origin(self, row: int, col: int, titled: bool = False) -> tuple[int, int]:
        """(top, left) pixel of panel (row, col)."""
        top = (self.title_height if titled else 0) + self.pad + row * (self.panel_h + self.caption_height + self.pad)
        return top, self.label_width + self.pad + col * (self.panel_w + self.pad)


@dataclass
class SheetRow:
    """One row of a contact sheet: a label and images ((H, W, 3) or (H, W) uint8, any size)."""

    label: str
    panels: Sequence[np.ndarray]
    captions: Sequence[str] | None = None


def fit_panel(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize into a (height, width, 3) box keeping the aspect ratio; small token grids stay blocky."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"panel must be uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    scale = min(height / image.shape[0], width / image.shape[1])
    new_h, new_w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    box = np.empty((height, width, 3), np.uint8)
    box[:] = BACKGROUND
    top, left = (height - new_h) // 2, (width - new_w) // 2
    box[top:top + new_h, left:left + new_w] = resized
    return box


def contact_sheet(rows: Sequence[SheetRow], layout: SheetLayout | None = None, title: str | None = None) -> np.ndarray:
    """A grid of labelled rows of panels as one (H, W, 3) uint8 image (size: ``layout.size``)."""
    layout = layout or SheetLayout()
    if not rows:
        raise ValueError("contact sheet: no rows to draw")
    cols = max(len(row.panels) for row in rows)
    height, width = layout.size(len(rows), max(cols, 1), titled=title is not None)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=layout.font_size)
    if title is not None:
        draw.text((layout.pad, layout.pad // 2), title, fill=TEXT, font=font)
    for r, row in enumerate(rows):
        top, _ = layout.panel_origin(r, 0, titled=title is not None)
        _draw_label(draw, font, row.label, layout, top)
        for c, panel in enumerate(row.panels):
            top, left = layout.panel_origin(r, c, titled=title is not None)
            canvas.paste(Image.fromarray(fit_panel(panel, layout.panel_h, layout.panel_w)), (left, top))
            if row.captions is not None and c < len(row.captions) and layout.caption_height:
                draw.text((left, top + layout.panel_h + 1), row.captions[c], fill=TEXT, font=font)
    return np.asarray(canvas)


def _draw_label(draw: ImageDraw.ImageDraw, font: Any, label: str, layout: SheetLayout, top: int) -> None:
    """Row label, wrapped to the label column (ids are long: break anywhere)."""
    if layout.label_width <= layout.pad:
        return
    chars = max(4, (layout.label_width - 2 * layout.pad) * 2 // layout.font_size)
    lines = [part[i:i + chars] for part in label.split("\n") for i in range(0, max(len(part), 1), chars)]
    draw.multiline_text((layout.pad, top), "\n".join(lines), fill=TEXT, font=font, spacing=2)


def frames_row(label: str, frames_THWC: np.ndarray, max_frames: int = 8) -> SheetRow:
    """A row of up to ``max_frames`` frames spread over the clip, captioned with their index."""
    picks = spread_indices(len(frames_THWC), max_frames)
    return SheetRow(label, [frames_THWC[i] for i in picks], [f"t={i}" for i in picks])


def png_bytes(image_HWC: np.ndarray) -> bytes:
    """PNG encoding of a (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image_HWC, dtype=np.uint8)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# the contact sheet of one clip ----------------------------------------------------------------
@dataclass
class ExtraMap:
    """An additional (T, h, w, C) map for a clip sheet, e.g. a decoupler prediction.

    ``basis_of`` names a map row label (e.g. ``"dinov2 (teacher-...) target"``) whose PCA basis colours
    this map, so a prediction and its teacher target share colours; None fits its own PCA.
    """

    label: str
    tokens_THWC: np.ndarray
    basis_of: str | None = None


def clip_rows(material: "ClipMaterial", max_frames: int = 8, extra_maps: Sequence[ExtraMap] = ()) -> list[SheetRow]:
    """Rows of one clip's sheet from its material (read by ``storage.audit.clip_material``): observed frame, generated frames,
    PCA-RGB of every token map (reference map first when the version has one), then ``extra_maps``."""
    rows: list[SheetRow] = []
    if material.observed is not None:
        rows.append(SheetRow("observed frame", [material.observed], [f"t={material.clip.start}"]))
    bases: dict[str, PcaBasis] = {}
    for version in material.versions:
        for name, frames in version.frames.items():
            rows.append(frames_row(f"{version.label}\n{name}", frames, max_frames))
        for name, tokens in version.maps.items():
            label = f"{version.label}\n{name}"
            rows.append(_map_row(label, tokens, version.references.get(name), max_frames, bases))
    for extra in extra_maps:
        basis = bases.get(extra.basis_of) if extra.basis_of else None
        if extra.basis_of and basis is None:
            raise ValueError(f"extra map '{extra.label}': no map row labelled '{extra.basis_of}' (have {sorted(bases)})")
        rows.append(_map_row(extra.label, extra.tokens_THWC, None, max_frames, bases, basis))
    return rows


def _map_row(label: str, tokens_THWC: np.ndarray, reference_1HWC: np.ndarray | None, max_frames: int,
             bases: dict[str, PcaBasis], basis: PcaBasis | None = None) -> SheetRow:
    """PCA-RGB row: the basis is fitted over the clip's tokens and its reference tokens together."""
    everything = tokens_THWC if reference_1HWC is None else np.concatenate([reference_1HWC, tokens_THWC])
    basis = basis or fit_pca(everything)
    bases[label.replace("\n", " ")] = basis
    picks = spread_indices(len(tokens_THWC), max_frames)
    panels = [basis.to_rgb(tokens_THWC[i:i + 1])[0] for i in picks]
    captions = [f"t={i}" for i in picks]
    if reference_1HWC is not None:
        panels, captions = [basis.to_rgb(reference_1HWC)[0], *panels], ["ref", *captions]
    return SheetRow(f"{label} (PCA)", panels, captions)


# the HTML report ------------------------------------------------------------------------------
class ReportImage(StrictModel):
    caption: str
    src: str = Field(description="Path relative to the report file, so the page opens without a server.")


class ReportPage(StrictModel):
    """Everything the static report of one version shows (plain JSON types)."""

    version_id: str
    generated: str = Field(description="ISO time the report was made.")
    summary: dict[str, Any]
    manifest: dict[str, Any]
    lineage: dict[str, Any] = Field(description="A LineageNode as a dict: type, id, role, details, children.")
    events: list[dict[str, Any]] = Field(default_factory=list)
    users: list[dict[str, Any]] = Field(default_factory=list, description="Exports and runs that use it.")
    stats: list[dict[str, Any]] = Field(default_factory=list, description="Per array: name, shape, dtype, stats.")
    verify: list[str] | None = Field(default=None, description="Integrity problems; None when not checked.")
    images: list[ReportImage] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:13px;vertical-align:top}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
ul.tree{font-size:13px}code{font-size:12px}.bad{color:#b00}.ok{color:#070}figure{margin:12px 0}
img{max-width:100%;image-rendering:pixelated}"""


def render_report_html(page: ReportPage) -> str:
    """The whole report as one self-contained HTML page (inline CSS, relative image links only)."""
    for image in page.images:
        check_relative_link(image.src)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(page.version_id)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Target version <code>{_e(page.version_id)}</code></h1>",
             f"<p>Report generated {_e(page.generated)}.</p>",
             "<h2>Summary</h2>", _kv_table(page.summary),
             "<h2>Integrity</h2>", _verify_html(page.verify),
             "<h2>Lineage</h2>", f"<ul class='tree'>{_tree_html(page.lineage)}</ul>",
             "<h2>Used by</h2>", _table(page.users, ["kind", "id", "direct"]) if page.users else "<p>No export or run uses it.</p>",
             "<h2>Array statistics</h2>", _stats_html(page.stats),
             "<h2>Contact sheets</h2>", _images_html(page.images, page.notes),
             "<h2>Lineage events</h2>", _events_html(page.events),
             "<h2>Manifest</h2>", f"<pre>{_e(json.dumps(page.manifest, indent=2, sort_keys=True))}</pre>",
             "</body></html>"]
    return "\n".join(parts)


def check_relative_link(src: str) -> str:
    """ValueError unless ``src`` is a relative path inside the report's folder."""
    if not src or "://" in src or src.startswith(("/", "\\")) or ".." in src.split("/"):
        raise ValueError(f"report image link {src!r}: must be a relative path below the report's folder")
    return src


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _kv_table(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_short(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_short(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verify_html(problems: list[str] | None) -> str:
    if problems is None:
        return "<p>Not checked (run <code>foresight targets verify</code> or pass <code>--verify</code>).</p>"
    if not problems:
        return "<p class='ok'>Every shard matches its recorded sha256.</p>"
    return "<ul class='bad'>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"


def _tree_html(node: dict[str, Any]) -> str:
    role = f"{_e(node.get('role'))}: " if node.get("role") else ""
    details = ", ".join(f"{_e(k)}={_e(_short(v))}" for k, v in node.get("details", {}).items())
    children = "".join(_tree_html(child) for child in node.get("children", []))
    nested = f"<ul>{children}</ul>" if children else ""
    return f"<li>{role}<b>{_e(node.get('type'))}</b> <code>{_e(node.get('id'))}</code> <small>{details}</small>{nested}</li>"


def _stats_html(stats: list[dict[str, Any]]) -> str:
    if not stats:
        return "<p>No array statistics.</p>"
    columns = ["array", "shape", "dtype", "clips", "mean", "std", "min", "max", "abs_mean", "zero_fraction", "nonfinite"]
    rows = [{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()} for row in stats]
    return _table(rows, columns)


def _images_html(images: list[ReportImage], notes: list[str]) -> str:
    figures = "".join(f"<figure><img src='{_e(quote(i.src))}' alt='{_e(i.caption)}'><figcaption>{_e(i.caption)}"
                      "</figcaption></figure>" for i in images)
    remarks = "".join(f"<p><i>{_e(n)}</i></p>" for n in notes)
    return (figures or "<p>No contact sheets.</p>") + remarks


def _events_html(events: list[dict[str, Any]]) -> str:
    if not events:
        return "<p>No lineage events name this version.</p>"
    rows = [{"time": e.get("eventTime"), "job": e.get("job", {}).get("name"), "run": e.get("run", {}).get("runId"),
             "inputs": [i.get("name") for i in e.get("inputs", [])],
             "outputs": [o.get("name") for o in e.get("outputs", [])],
             "facets": e.get("run", {}).get("facets", {})} for e in events]
    return _table(rows, ["time", "job", "run", "inputs", "outputs", "facets"])


# closed-loop evaluations: videos, rollout sheets, success bar chart, the eval report ------------
MP4_CODECS = ("libx264", "h264", "mpeg4")
"""Tried in order: H.264 plays in every browser; MPEG-4 part 2 is the fallback of a minimal FFmpeg."""


def mp4_bytes(frames_THWC: Sequence[np.ndarray], fps: float) -> bytes:
    """An MP4 of uint8 (H, W, 3) frames (PyAV). Odd sides are padded by one pixel (yuv420p needs even)."""
    import av

    if not len(frames_THWC):
        raise ValueError("mp4: no frames to encode")
    height, width = frames_THWC[0].shape[:2]
    even_h, even_w = height + height % 2, width + width % 2
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = next((c for c in MP4_CODECS if c in av.codecs_available), None)
        if codec is None:
            raise ValueError(f"mp4: this PyAV build has none of the encoders {MP4_CODECS}")
        stream = container.add_stream(codec, rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
        for frame in frames_THWC:
            padded = np.zeros((even_h, even_w, 3), np.uint8)
            padded[:height, :width] = frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def mp4_frames(data: bytes) -> np.ndarray:
    """Every frame of an MP4 as uint8 (T, H, W, 3)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def rollout_row(label: str, frames_THWC: np.ndarray, success_step: int | None, stride: int = 1,
                max_frames: int = 8) -> SheetRow:
    """A contact-sheet row of one rollout whose frames are every ``stride``-th env step: frames spread
    over the episode, captioned with their env step, from the success step on marked 'ok'."""
    picks = spread_indices(len(frames_THWC), max_frames)
    captions = [f"t={i * stride}" + (" ok" if success_step is not None and i * stride >= success_step else "")
                for i in picks]
    return SheetRow(label, [frames_THWC[i] for i in picks], captions)


BAR_OK, BAR_WHISKER = (76, 175, 80), (230, 230, 230)


def success_bar_chart(rows: Sequence[dict[str, Any]], title: str, bar_w: int = 36, plot_h: int = 180) -> np.ndarray:
    """A bar per row (keys ``task``, ``rate``, ``ci_low``, ``ci_high``): success rate with its 95% CI
    whisker, task names under the bars. Returns (H, W, 3) uint8."""
    if not rows:
        raise ValueError("success bar chart: no tasks")
    pad, label_h, axis_w, title_h = 8, 84, 36, 20
    width = max(axis_w + len(rows) * (bar_w + pad) + pad, 2 * pad + 6 * len(title))
    height = title_h + plot_h + label_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    draw.text((pad, 2), title, fill=TEXT, font=font)
    top, bottom = title_h, title_h + plot_h

    def y_of(rate: float) -> int:
        return round(bottom - rate * (plot_h - 4))

    for tick in (0.0, 0.5, 1.0):
        draw.line([(axis_w - 4, y_of(tick)), (width - pad, y_of(tick))], fill=(70, 70, 70))
        draw.text((2, y_of(tick) - 6), f"{tick:.0%}", fill=TEXT, font=font)
    for i, row in enumerate(rows):
        left = axis_w + pad + i * (bar_w + pad)
        draw.rectangle([left, y_of(row["rate"]), left + bar_w, bottom], fill=BAR_OK)
        centre = left + bar_w // 2
        draw.line([(centre, y_of(row["ci_high"])), (centre, y_of(row["ci_low"]))], fill=BAR_WHISKER, width=2)
        for y in (y_of(row["ci_high"]), y_of(row["ci_low"])):
            draw.line([(centre - 5, y), (centre + 5, y)], fill=BAR_WHISKER, width=2)
        label = Image.new("RGB", (label_h, bar_w), BACKGROUND)
        ImageDraw.Draw(label).text((2, bar_w // 2 - 6), str(row["task"])[:14], fill=TEXT, font=font)
        canvas.paste(label.rotate(90, expand=True), (left, bottom + 2))
    assert top < bottom
    return np.asarray(canvas)


class EvalReportPage(StrictModel):
    """Everything the static report of one eval shows (plain JSON types)."""

    eval_id: str
    generated: str
    summary: dict[str, Any] = Field(description="Policy, run, checkpoint, status, episodes, overall rate.")
    tasks: list[dict[str, Any]] = Field(description="Per-task TaskSummary dicts.")
    latency_ms: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict, description="Field -> target version id.")
    episodes: list[dict[str, Any]] = Field(default_factory=list)
    images: list[ReportImage] = Field(default_factory=list)
    videos: list[ReportImage] = Field(default_factory=list)


def render_eval_html(page: EvalReportPage) -> str:
    """The eval report as one self-contained HTML page (relative links to its pictures and videos)."""
    for item in (*page.images, *page.videos):
        check_relative_link(item.src)
    tasks = [{**t, "rate": f"{t['rate']:.0%}", "ci95": f"[{t['ci_low']:.0%}, {t['ci_high']:.0%}]",
              "mean_steps": f"{t['mean_steps']:.1f}"} for t in page.tasks]
    latency = {k: f"{v:.2f} ms" for k, v in page.latency_ms.items()}
    videos = "".join(f"<figure><video src='{_e(quote(v.src))}' controls loop muted></video>"
                     f"<figcaption>{_e(v.caption)}</figcaption></figure>" for v in page.videos)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(page.eval_id)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Evaluation <code>{_e(page.eval_id)}</code></h1>", f"<p>Report generated {_e(page.generated)}.</p>",
             "<h2>Summary</h2>", _kv_table(page.summary),
             "<h2>Success per task (Wilson 95% CI)</h2>",
             _table(tasks, ["task", "difficulty", "episodes", "successes", "rate", "ci95", "mean_steps"]),
             "<h2>Pictures</h2>", _images_html(page.images, []),
             "<h2>Videos</h2>", videos or "<p>No rollout was recorded (pass <code>--video</code>).</p>",
             "<h2>Latency per policy call</h2>", _kv_table(latency) if latency else "<p>Not measured.</p>",
             "<h2>Target versions of the policy</h2>",
             _kv_table(page.versions) if page.versions else "<p>A built-in policy: no target versions.</p>",
             "<h2>Episodes</h2>", _table(page.episodes, ["task", "seed", "success", "steps", "policy_calls", "wall_s"]),
             "</body></html>"]
    return "\n".join(parts)
