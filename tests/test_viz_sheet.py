"""Contact sheets and PCA-to-RGB: sizes, content in every panel, and the clip sheet of real stores."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.flows.cli.viz import clip_sheet
from foresight.pipelines.viz import (
    ExtraMap,
    SheetLayout,
    SheetRow,
    contact_sheet,
    fit_pca,
    fit_panel,
    frames_row,
    pca_rgb,
    png_bytes,
)
from foresight.storage.fs import Root
from test_audit_store import FRAME_HW, GRID, T, TEACHER_C, build_world


def panel_pixels(sheet: np.ndarray, layout: SheetLayout, row: int, col: int, titled: bool) -> np.ndarray:
    top, left = layout.panel_origin(row, col, titled)
    return sheet[top:top + layout.panel_h, left:left + layout.panel_w]


def assert_every_panel_varies(sheet: np.ndarray, layout: SheetLayout, counts: list[int], titled: bool) -> None:
    for r, count in enumerate(counts):
        for c in range(count):
            pixels = panel_pixels(sheet, layout, r, c, titled)
            assert pixels.reshape(-1, 3).std(axis=0).max() > 1.0, f"panel ({r}, {c}) is constant"


def test_contact_sheet_size_and_panels():
    rng = np.random.default_rng(0)
    layout = SheetLayout(panel_h=40, panel_w=56, pad=3, label_width=90, caption_height=12)
    rows = [SheetRow("episode 0", [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)],
                     ["first", "middle", "last"]),
            SheetRow("gray episode", [rng.integers(0, 256, (100, 60), dtype=np.uint8)])]
    sheet = contact_sheet(rows, layout, title="demo")
    assert sheet.dtype == np.uint8 and sheet.shape == (*layout.size(2, 3, titled=True), 3)
    assert sheet.shape == (20 + 3 + 2 * (40 + 12 + 3), 90 + 3 * (56 + 3) + 3, 3)
    assert_every_panel_varies(sheet, layout, [3, 1], titled=True)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(sheet))))
    np.testing.assert_array_equal(decoded, sheet)
    with pytest.raises(ValueError, match="no rows"):
        contact_sheet([])


def test_fit_panel_keeps_aspect_and_blocky_grids():
    grid = np.zeros((2, 2, 3), np.uint8)
    grid[0, 0] = 255
    panel = fit_panel(grid, 8, 8)
    assert panel.shape == (8, 8, 3) and panel[:4, :4].min() == 255 and panel[4:, 4:].max() == 0
    wide = fit_panel(np.full((10, 40, 3), 200, np.uint8), 40, 40)
    assert wide[0, 0, 0] != 200 and wide[20, 20, 0] == 200  # letterboxed, centred


def test_pca_rgb_shapes_basis_and_randomized_path():
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((3, 4, 5, 16)).astype(np.float16)
    rgb = pca_rgb(tokens)
    assert rgb.shape == (3, 4, 5, 3) and rgb.dtype == np.uint8 and rgb.std() > 10
    # A low-rank signal: the randomized path (C > 512) finds the same directions as the exact one.
    signal = rng.standard_normal((300, 3)) @ np.diag([9.0, 6.0, 3.0]) @ rng.standard_normal((3, 520))
    noisy = (signal + rng.standard_normal((300, 520)) * 0.1).astype(np.float32).reshape(3, 10, 10, 520)
    approx = fit_pca(noisy).components_3C
    exact = np.linalg.svd(noisy.reshape(-1, 520) - noisy.reshape(-1, 520).mean(0), full_matrices=False)[2][:3]
    assert np.abs((approx * exact).sum(axis=1)) == pytest.approx(np.ones(3), abs=1e-3)
    flat = pca_rgb(np.ones((2, 3, 3, 2), np.float32))
    assert (flat == 128).all()  # constant tokens give mid-grey, not an error


def test_frames_row_spreads_frames():
    frames = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((10, 4, 4, 3), np.uint8)
    row = frames_row("clip", frames, max_frames=3)
    assert row.captions == ["t=0", "t=4", "t=9"] and [int(p[0, 0, 0]) for p in row.panels] == [0, 4, 9]


def test_clip_sheet_of_teacher_version(tmp_path):
    world = build_world(tmp_path)
    layout = SheetLayout(panel_h=32, panel_w=32, label_width=120)
    prediction = np.random.default_rng(2).standard_normal((T, *GRID, TEACHER_C)).astype(np.float32)
    basis_label = f"dinov2 ({world['teacher']}) target"
    sheet, material = clip_sheet(Root(world["root"]), [world["teacher"]], clip_id="ep1_s1", layout=layout,
                                 extra_maps=[ExtraMap("decoupler prediction", prediction, basis_of=basis_label)])
    assert material.clip_index == 1 and material.observed.shape == (24, 32, 3)
    assert [v.version_id for v in material.versions] == [world["video"], world["teacher"]]
    # rows: observed, video frames, onestep PCA, teacher target PCA (ref + T), prediction
    counts = [1, T, T, 1 + T, T]
    assert sheet.shape == (*layout.size(len(counts), max(counts), titled=True), 3)
    assert_every_panel_varies(sheet, layout, counts, titled=True)
    with pytest.raises(ValueError, match="no clip 'nope'"):
        clip_sheet(Root(world["root"]), [world["teacher"]], clip_id="nope")
    assert material.versions[0].frames["frames"].shape == (T, *FRAME_HW, 3)


def test_viz_clip_command_writes_png(tmp_path):
    world = build_world(tmp_path)
    out = tmp_path / "pics" / "sheet.png"
    result = CliRunner().invoke(app, ["viz", "clip", "--clip", "ep0_s2", "--versions", f"{world['video']},{world['teacher']}",
                                      "--out", str(out), "--panel", "48", "--root", world["root"]])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    layout = SheetLayout(panel_h=48, panel_w=48)
    assert image.shape == (*layout.size(4, 1 + T, titled=True), 3)
    by_index = CliRunner().invoke(app, ["viz", "clip", "--index", "2", "--versions", world["teacher"], "--out", str(out),
                                        "--panel", "48", "--root", world["root"]])
    assert by_index.exit_code == 0 and np.array_equal(np.asarray(Image.open(out)), image)  # row 2 is ep0_s2
    neither = CliRunner().invoke(app, ["viz", "clip", "--versions", world["teacher"], "--root", world["root"]])
    assert neither.exit_code == 1
