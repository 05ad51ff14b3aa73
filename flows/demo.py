"""The main job (``make demo``): the whole chain on tiny models over a few MetaWorld episodes.

Each stage calls the same flow the CLI calls, so the demo exercises the product as users run it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipelines.viz import SheetRow, contact_sheet, frames_row, png_bytes
from storage.episodes import EpisodeStore
from storage.fs import Root

log = logging.getLogger(__name__)

DEMO_DATASET = "demo-metaworld"
DEMO_TASKS = ["reach", "button-press", "drawer-open"]


@dataclass
class DemoState:
    """Ids produced by earlier stages, read by later ones."""

    root: Root
    out: str
    report: Callable[[str], None]
    ids: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def ingest_stage(state: DemoState) -> None:
    """Collect 3 easy tasks x 2 episodes at 128x128 with the scripted experts."""
    from flows.ingest import MetaWorldIngestConfig, ingest_metaworld_flow
    from flows.runtime import RunnerChoice, run_flow

    config = MetaWorldIngestConfig(dataset=DEMO_DATASET, tasks=DEMO_TASKS, episodes_per_task=2, size=128)
    results = run_flow(ingest_metaworld_flow, RunnerChoice(), root_url=state.root.url, config=config)
    for name, result in results.items():
        state.report(f"  {name}: {result.succeeded}/{result.attempted} successful expert rollouts")


def episode_sheet_stage(state: DemoState) -> None:
    """Contact sheet: first, middle and last frame of every episode."""
    store = EpisodeStore(state.root, DEMO_DATASET)
    camera = next(iter(store.info().cameras))
    rows = []
    for record in store.records():
        picks = [0, record.length // 2, record.length - 1]
        frames = store.read_frames(record.episode_id, camera, picks)
        rows.append(SheetRow(f"{record.episode_id}\n{record.instructions[0]}", list(frames),
                             ["first", "middle", "last"]))
    path = f"{state.out}/episodes.png"
    state.root.fs.makedirs(state.out, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(png_bytes(contact_sheet(rows, title=f"{DEMO_DATASET}: first / middle / last frame")))
    state.report(f"  wrote {path}")


def info_stage(state: DemoState) -> None:
    from storage.summary import root_summary

    summary = root_summary(state.root)
    for ds in summary["datasets"]:
        state.report(f"  dataset {ds['dataset']}: {ds['episodes']} episodes, {ds['frames']} frames, "
                     f"{ds['bytes'] / 1e6:.1f} MB")


STAGES: list[tuple[str, Callable[[DemoState], None]]] = [
    ("ingest MetaWorld demonstrations", ingest_stage),
    ("store summary", info_stage),
    ("episode contact sheet", episode_sheet_stage),
]


def run_demo(root: Root, out: str, report: Callable[[str], None]) -> DemoState:
    """Run every demo stage in order, reporting progress and timings through ``report``."""
    state = DemoState(root=root, out=out, report=report)
    for name, stage in STAGES:
        started = time.perf_counter()
        report(f"[{name}]")
        stage(state)
        state.timings[name] = time.perf_counter() - started
    report("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in state.timings.items()))
    return state
