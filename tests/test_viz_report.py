"""``foresight report``: a static page whose images are files at relative paths (opens without a server)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.pipelines.viz import ReportImage, ReportPage, check_relative_link, render_report_html
from foresight.schemas import refs
from foresight.storage.fs import Root
from foresight.storage.lineage import emit
from test_audit_store import build_world, make_version, write_export


class Links(HTMLParser):
    """Every URL-bearing attribute of a page (src, href) and the tags that could fetch from a server."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.urls.append((tag, value))


def page_links(html_path: Path) -> list[tuple[str, str]]:
    parser = Links()
    parser.feed(html_path.read_text())
    return parser.urls


def test_report_links_existing_images_relatively(tmp_path):
    world = build_world(tmp_path)
    root = Root(world["root"])
    write_export(root, "export-eeeeeeeeeeee", {"dinov2.target": world["teacher"]})
    emit(root, "teachers.dinov2", "run-7", inputs=[refs.version(world["video"])],
         outputs=[refs.version(world["teacher"])], facets={"model": "tiny"})
    out = tmp_path / "site" / "report.html"
    result = CliRunner().invoke(app, ["report", world["teacher"], "--out", str(out), "--clips", "2", "--verify",
                                      "--root", world["root"]])
    assert result.exit_code == 0, result.output
    links = page_links(out)
    images = [url for tag, url in links if tag == "img"]
    assert len(images) == 2 and {tag for tag, _ in links} == {"img"}  # no scripts, stylesheets or remote links
    for src in images:
        assert not src.startswith("/") and "://" not in src
        picture = out.parent / src
        assert picture.is_file() and np.asarray(Image.open(picture)).std() > 10
    text = out.read_text()
    for needle in (world["teacher"], world["video"], world["plan"], "export-eeeeeeeeeeee", "teachers.dinov2",
                   "Every shard matches", "reference", "demo"):
        assert needle in text, needle


def test_report_of_a_version_without_pictures(tmp_path):
    world = build_world(tmp_path)
    root = Root(world["root"])
    text_id = make_version(root, "text", {"text": np.ones((6, 5, 8), np.float16)}, {"plan": world["plan"]})
    out = tmp_path / "text.html"
    result = CliRunner().invoke(app, ["report", text_id, "--out", str(out), "--root", world["root"]])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<th>kind</th><td>text</td>" in html and "<td>[6, 5, 8]</td>" in html  # summary and stats rows
    # No spatial arrays: each sheet shows the clip's observed frame (and its instruction in the title).
    images = [url for _, url in page_links(out)]
    assert len(images) == 3 and all((out.parent / src).is_file() for src in images)


def test_render_refuses_absolute_links():
    page = ReportPage(version_id="video-000000000000", generated="now", summary={}, manifest={},
                      lineage={"type": "version", "id": "video-000000000000"},
                      images=[ReportImage(caption="x", src="/etc/sheet.png")])
    with pytest.raises(ValueError, match="relative path"):
        render_report_html(page)
    for bad in ("http://host/a.png", "../a.png", ""):
        with pytest.raises(ValueError):
            check_relative_link(bad)
    assert check_relative_link("report_files/clip-000000.png") == "report_files/clip-000000.png"
