"""The main job (``make demo``): the whole chain on tiny models over a few MetaWorld episodes.

Each stage calls the same flow the CLI calls, so the demo exercises the product as users run it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from foresight.pipelines.viz import SheetRow, contact_sheet, png_bytes
from foresight.storage.episodes import EpisodeStore
from foresight.storage.fs import Root

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
    from foresight.flows.ingest import MetaWorldIngestConfig, ingest_metaworld_flow
    from foresight.flows.runtime import RunnerChoice, run_flow

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
    from foresight.storage.summary import root_summary

    summary = root_summary(state.root)
    for ds in summary["datasets"]:
        state.report(f"  dataset {ds['dataset']}: {ds['episodes']} episodes, {ds['frames']} frames, "
                     f"{ds['bytes'] / 1e6:.1f} MB")


def plan_stage(state: DemoState) -> None:
    """Clips of 8 frames (stride 2) from the demo episodes, at most 6."""
    from foresight.flows.generate import PlanConfig, make_plan

    summary = make_plan(state.root.url, PlanConfig(dataset=DEMO_DATASET, frames=8, stride=2, every=24, limit=6))
    state.ids["plan"] = summary.plan_id
    state.report(f"  plan {summary.plan_id}: {summary.num_clips} clips")


def text_stage(state: DemoState) -> None:
    """CLIP text embeddings of each distinct instruction (tiny CLIP text model)."""
    from foresight.flows.generate import TextConfig, text_flow
    from foresight.flows.runtime import RunnerChoice, run_flow

    summary = run_flow(text_flow, RunnerChoice(), root_url=state.root.url,
                       config=TextConfig(plan=state.ids["plan"], model="tiny", shard_size=4))
    state.ids["text"] = summary.version
    state.report(f"  text version {summary.version}")


def generate_stage(state: DemoState) -> None:
    """Multi-step SVD generation + one-step features with tiny models (4 Euler steps, 64 px)."""
    from foresight.flows.generate import GenerateConfig, generate_flow
    from foresight.flows.runtime import RunnerChoice, run_flow
    from foresight.pipelines.svd.sampler import SVDParams

    config = GenerateConfig(plan=state.ids["plan"], text=state.ids["text"], model="tiny",
                            params=SVDParams(num_frames=8, size=64, steps=4), batch=2, shard_size=4)
    summary = run_flow(generate_flow, RunnerChoice(), root_url=state.root.url, config=config)
    state.ids["video"] = summary.version
    state.report(f"  video version {summary.version}")


def teachers_stage(state: DemoState) -> None:
    """Tiny DINOv2 and Depth Anything 3 teachers over the generated clips and observed frames."""
    from foresight.flows.runtime import RunnerChoice, run_flow
    from foresight.flows.teachers import TeachersConfig, teachers_flow

    for name in ("dinov2", "da3"):
        config = TeachersConfig(video=state.ids["video"], teacher=name, model="tiny", batch=2)
        summary = run_flow(teachers_flow, RunnerChoice(), root_url=state.root.url, config=config)
        state.ids[name] = summary.version
        state.report(f"  {name} teacher version {summary.version}")


def export_stage(state: DemoState) -> None:
    """Webdataset shards of every target (fp8 features), then one batch read back through ShardStream."""
    from torch.utils.data import DataLoader

    from foresight.flows.export import ExportConfig, run_export
    from foresight.trainers.data import ShardStream, collate_samples

    targets = [state.ids["video"], f"dinov2={state.ids['dinov2']}", f"da3={state.ids['da3']}", state.ids["text"]]
    result = run_export(state.root.url, ExportConfig(plan=state.ids["plan"], targets=targets, codec="fp8",
                                                     shard_size="64MB"))
    state.ids["export"] = result.export_id
    state.report(f"  export {result.export_id}: {result.num_samples} samples in {result.num_shards} shards, "
                 f"{result.total_bytes / 1e6:.1f} MB")
    pinned = [state.ids[key] for key in ("video", "dinov2", "da3", "text")]
    stream = ShardStream(state.root, result.export_id, pinned)
    batch = next(iter(DataLoader(stream, batch_size=2, collate_fn=collate_samples)))
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if hasattr(v, "shape"))
    state.report(f"  one batch: {shapes}")


def pi0_stage(state: DemoState) -> None:
    """Tiny 4-layer pi0 teacher targets on 6 observations (2 (t, noise) pairs, attention at layers 1-3)."""
    from foresight.flows.export import ExportConfig, run_export
    from foresight.flows.generate import PlanConfig, make_plan
    from foresight.flows.pi0 import Pi0TargetsConfig, pi0_targets_flow
    from foresight.flows.runtime import RunnerChoice, run_flow

    plan = make_plan(state.root.url, PlanConfig(dataset=DEMO_DATASET, frames=4, stride=1, every=20, limit=6))
    config = Pi0TargetsConfig(plan=plan.plan_id, model="tiny", tiny_layers=4, pairs=2, attn_layers=[1, 2, 3],
                              state_indices=list(range(18)) + [36, 37, 38], shard_size=4)
    result = run_flow(pi0_targets_flow, RunnerChoice(), root_url=state.root.url, config=config)
    state.ids["pi0"] = result.version
    export = run_export(state.root.url, ExportConfig(plan=plan.plan_id, targets=[result.version],
                                                     action_chunk=50))
    state.ids["pi0_export"] = export.export_id
    state.report(f"  pi0 version {result.version}, export {export.export_id} ({export.num_samples} samples)")


TINY_TRAIN_TOML = """# Tiny architectures, a learning rate that shows learning within a few CPU steps.
size = "tiny"

[optim]
lr = 0.003
warmup_steps = 2
"""


def cli(*args: str) -> None:
    """Run one foresight command in this process, exactly as a user would type it."""
    from foresight.flows.cli import app

    code = app(list(args), standalone_mode=False)
    if isinstance(code, int) and code != 0:
        raise ValueError(f"demo: 'foresight {' '.join(args)}' exited with {code}")


def train_stage(state: DemoState) -> None:
    """Decouplers for both teachers (one stopped at step 10 and resumed), then the action expert."""
    config = os.path.join(state.out, "tiny-train.toml")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(TINY_TRAIN_TOML)
    common = ["--config", config, "--steps", "20", "--batch-size", "2", "--workers", "0", "--device", "cpu",
              "--root", state.root.url]
    export = ["--export", state.ids["export"]]
    cli("train", "decoupler", *export, "--teacher", "dinov2", "--run-id", "demo-decoupler-dinov2", *common)
    cli("train", "decoupler", *export, "--teacher", "da3", "--run-id", "demo-decoupler-da3", "--stop-at", "10",
        *common)
    state.report("  stopped the da3 decoupler at step 10; resuming it from its checkpoint")
    cli("train", "decoupler", *export, "--teacher", "da3", "--run-id", "demo-decoupler-da3", *common)
    cli("train", "action-expert", *export, "--decouplers", "demo-decoupler-dinov2,demo-decoupler-da3",
        "--run-id", "demo-action-expert", *common)


def predict_stage(state: DemoState) -> None:
    """An action chunk from the action expert; decoupler predictions beside the teacher maps."""
    root = ["--root", state.root.url]
    cli("predict", "--run", "demo-action-expert", *root)
    for teacher in ("dinov2", "da3"):
        sheet = os.path.join(state.out, f"decoupler-{teacher}.png")
        cli("predict", "--run", f"demo-decoupler-{teacher}", "--sheet", sheet,
            "--out", os.path.join(state.out, f"decoupler-{teacher}.npy"), *root)
        state.report(f"  wrote {sheet}")


DEMO_EVAL_TASKS = "reach,button-press"
DEMO_EVAL_STEPS = 30
"""Step cap of the demo's closed-loop eval (MetaWorld allows 500): rendering dominates its time on a
CPU, and a tiny random-ish action expert is not expected to succeed anyway."""


def eval_stage(state: DemoState) -> None:
    """The tiny action expert in closed loop: 2 easy tasks x 2 episodes through the whole S-VAM stack."""
    cli("eval", "metaworld", "--run", "demo-action-expert", "--tasks", DEMO_EVAL_TASKS, "--episodes", "2",
        "--max-steps", str(DEMO_EVAL_STEPS), "--video", "--root", state.root.url)


def shallow_pi_stage(state: DemoState) -> None:
    """A 2-layer student distilled online (the default) from the 4-layer tiny pi0 teacher."""
    cli("train", "shallow-pi", "--export", state.ids["pi0_export"], "--layers", "2", "--attn-layers", "1",
        "--steps", "4", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--run-id", "demo-shallow-pi",
        "--root", state.root.url)


def audit_stage(state: DemoState) -> None:
    """Verify every version, show the teacher's lineage, and write a contact sheet and an HTML report."""
    root = ["--root", state.root.url]
    cli("targets", "list", *root)
    cli("targets", "verify", "--all", *root)
    cli("targets", "show", state.ids["dinov2"], *root)
    sheet = os.path.join(state.out, "clip0.png")
    cli("viz", "clip", "--index", "0", "--versions", f"{state.ids['dinov2']},{state.ids['da3']}", "--out", sheet,
        *root)
    report = os.path.join(state.out, "report.html")
    cli("report", state.ids["dinov2"], "--out", report, *root)
    state.report(f"  wrote {sheet} and {report}")


STAGES: list[tuple[str, Callable[[DemoState], None]]] = [
    ("ingest MetaWorld demonstrations", ingest_stage),
    ("store summary", info_stage),
    ("episode contact sheet", episode_sheet_stage),
    ("clip plan", plan_stage),
    ("text embeddings", text_stage),
    ("SVD generation + one-step features", generate_stage),
    ("teacher maps", teachers_stage),
    ("export + read back", export_stage),
    ("pi0 teacher targets", pi0_stage),
    ("train decouplers + action expert", train_stage),
    ("predict", predict_stage),
    ("closed-loop MetaWorld eval", eval_stage),
    ("train Shallow-pi student", shallow_pi_stage),
    ("audit: verify, lineage, pictures", audit_stage),
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
