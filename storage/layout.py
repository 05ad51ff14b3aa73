"""The on-disk tree of a data root, in one place (see docs/ARCHITECTURE.md, Store layout)."""

from __future__ import annotations

import re

from foresight.schemas.refs import Ref

COMPLETE_MARKER = "_COMPLETE"
DATASET_INFO = "dataset.json"
EPISODE_RECORD = "episode.json"
FRAMES = "frames.zarr"
LOWDIM = "lowdim.parquet"
SEGMENTS = "segments.parquet"
QUARANTINE = "quarantine.jsonl"
STAGING = ".staging"
TRASH = ".trash"
PLAN_CLIPS = "clips.parquet"
PLAN_INFO = "plan.json"
MANIFEST = "manifest.json"
TARGET_SHARDS = "shards.npy"
"""A complete target version's shard table (checksums of every shard object as columns), named and
checksummed by its manifest.json."""
DONE_DIR = "_done"
CLAIMS_DIR = "_claims"
LINEAGE = "lineage.jsonl"
"""Events of earlier versions, one JSON line each (read, no longer written)."""
LINEAGE_EVENTS = "lineage"
"""Folder of the OpenLineage run events, one object each (storage.lineage)."""
EXPORT_INDEX = "index.json"
EXPORT_BUILD = "_build.json"
EXPORT_SAMPLES = "samples.npy"
"""An export's sample table (one row per sample: clip, byte offset, sha256, xxh3), named and checksummed
by index.json."""

DATASETS = "datasets"
PLANS = "plans"
TARGETS = "targets"
EXPORTS = "exports"
RUNS = "runs"
EVALS = "evals"
"""The top-level folders of a root, one per kind of stored thing."""
LOGS = "logs"
"""``logs/<flow-run>.log``: the log and traceback of each flow run that logged."""

FRAME_SHARD = 64
"""Frames per zarr shard of an episode camera array: bounded memory while streaming long episodes."""

_SAFE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_id(kind: str, value: str) -> str:
    """Ids become folder names and webdataset keys: letters, digits, '-' and '_' only."""
    if not is_safe_id(value):
        raise ValueError(f"{kind} id {value!r}: only letters, digits, '-' and '_' are allowed")
    return value


def is_safe_id(value: str) -> bool:
    """True for a name foresight could have written as an id (not '.staging', not a temporary)."""
    return bool(_SAFE_ID.match(value))


def dataset_dir(name: str) -> str:
    return f"{DATASETS}/{check_id('dataset', name)}"


def episodes_dir(dataset: str) -> str:
    return f"{dataset_dir(dataset)}/episodes"


def episode_dir(dataset: str, episode_id: str) -> str:
    return f"{episodes_dir(dataset)}/{check_id('episode', episode_id)}"


def plan_dir(plan_id: str) -> str:
    return f"{PLANS}/{check_id('plan', plan_id)}"


def plan_file(plan_id: str, name: str) -> str:
    """A file of a plan: PLAN_INFO or PLAN_CLIPS."""
    return f"{plan_dir(plan_id)}/{name}"


def target_dir(version_id: str) -> str:
    return f"{TARGETS}/{check_id('target version', version_id)}"


def target_manifest(version_id: str) -> str:
    return f"{target_dir(version_id)}/{MANIFEST}"


def target_file(version_id: str, name: str) -> str:
    """A file of a target version's folder (manifest.json, the shard table)."""
    return f"{target_dir(version_id)}/{name}"


def target_array(version_id: str, array: str) -> str:
    return f"{target_dir(version_id)}/{array}.zarr"


def target_done(version_id: str, shard_index: int) -> str:
    """The marker of a finished shard of a building version."""
    return f"{target_dir(version_id)}/{DONE_DIR}/{int(shard_index)}"


def export_dir(export_id: str) -> str:
    return f"{EXPORTS}/{check_id('export', export_id)}"


def export_file(export_id: str, name: str) -> str:
    """A file of an export: EXPORT_INDEX, EXPORT_BUILD or a shard."""
    return f"{export_dir(export_id)}/{name}"


def export_done(export_id: str, shard_index: int) -> str:
    """The record of a finished shard of a building export."""
    return f"{export_dir(export_id)}/{DONE_DIR}/{int(shard_index)}.json"


RUN_RECORD = "run.json"
RUN_METRICS = "metrics.jsonl"
STEP_PREFIX = "step-"
CHECKPOINT_RECORD = "checkpoint.json"
CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_TRAINER = "trainer.pt"
PARTIAL_STEP_PREFIX = ".tmp-"
"""Prefix of a checkpoint folder still being written (renamed to ``step-<N>`` once complete)."""


def run_dir(run_id: str) -> str:
    return f"{RUNS}/{check_id('run', run_id)}"


def run_file(run_id: str, name: str) -> str:
    """A file directly in a run's folder (run.json, metrics.jsonl)."""
    return f"{run_dir(run_id)}/{name}"


def step_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"{STEP_PREFIX}{int(step)}"


def step_dir(run_id: str, step: int) -> str:
    return f"{run_dir(run_id)}/{step_name(step)}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name ``step-<N>``; None for any other name."""
    digits = name[len(STEP_PREFIX):] if name.startswith(STEP_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def partial_step_dir(run_id: str, step: int, token: str) -> str:
    """Where a checkpoint is written before it is complete (``token`` keeps concurrent writers apart)."""
    return f"{run_dir(run_id)}/{PARTIAL_STEP_PREFIX}{step_name(step)}-{token}"


EVAL_RECORD = "eval.json"
EVAL_EPISODES = "episodes"
EVAL_VIDEOS = "videos"


def eval_dir(eval_id: str) -> str:
    return f"{EVALS}/{check_id('eval', eval_id)}"


def eval_episode(eval_id: str, task: str, seed: int) -> str:
    """One finished episode's result: its presence is what makes an eval resumable."""
    return f"{eval_dir(eval_id)}/{EVAL_EPISODES}/{check_id('task', task)}/{int(seed)}.json"


REF_FOLDERS = {"dataset": DATASETS, "plan": PLANS, "version": TARGETS, "export": EXPORTS, "run": RUNS, "eval": EVALS}
"""The top-level folder of each kind of stored thing a reference can name."""
_REF_KINDS = {folder: kind for kind, folder in REF_FOLDERS.items()}


def ref_path(ref: Ref) -> str:
    """``<folder>/<id>`` of a stored thing ('plans/plan-...', 'targets/video-...'); a source as given."""
    if ref.kind == "source":
        return ref.id
    if ref.kind not in REF_FOLDERS:
        raise ValueError(f"{ref.kind} reference '{ref.id}' names nothing stored; it has no path")
    return f"{REF_FOLDERS[ref.kind]}/{check_id(ref.kind, ref.id)}"


def parse_ref_path(name: str) -> Ref:
    """The reference a path names: '<folder>/<id>' by its folder, a bare id by its prefix (events written
    before references were typed), anything else a source."""
    folder, _, rest = name.rstrip("/").partition("/")
    if rest and folder in _REF_KINDS and is_safe_id(rest):
        return Ref(kind=_REF_KINDS[folder], id=rest)
    if not rest and is_safe_id(folder):
        inferred = Ref.infer(folder)
        return inferred if inferred.kind != "value" else Ref(kind="source", id=folder)
    return Ref(kind="source", id=name)
