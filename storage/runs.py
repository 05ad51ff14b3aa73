"""The run store: ``runs/<run_id>/`` with its checkpoints, run record and metrics.

    runs/<run_id>/
      run.json                    the run record: what it trains on, its config, status (RunDir.write_run_json)
      metrics.jsonl               one JSON object a line per log interval and evaluation (MetricsLog)
      step-<N>/                   a checkpoint after N optimizer steps, valid only once complete:
        model.safetensors         the trainable model's state
        trainer.pt                optimizer, scheduler, RNG states (torch.save, loaded weights_only)
        checkpoint.json           CheckpointInfo, with the sha256 of both files
        _COMPLETE                 written last; a step-N/ without it does not exist
      .tmp-step-<N>-<token>/      a checkpoint being written (renamed to step-<N>/ once complete)

Every path comes from storage/layout.py. A checkpoint is written under a temporary name and renamed
into place once every file and the marker are in it, so a reader never sees a half-written one, and
an interrupted writer leaves only a ``.tmp-`` folder that ``clear_partial`` removes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import safetensors.torch
import torch
from pydantic import Field

from foresight.schemas.base import StrictModel, validate
from foresight.storage import layout
from foresight.storage.fs import Root

log = logging.getLogger(__name__)


class CheckpointInfo(StrictModel):
    """checkpoint.json of one ``step-N/`` folder: what was trained on what, and the stream position."""

    step: int = Field(description="Optimizer steps completed.")
    run_id: str = Field(description="Run this checkpoint belongs to.")
    kind: str = Field(description="Trainer kind, e.g. 'decoupler', 'action-expert', 'shallow-pi'.")
    export_id: str | None = Field(description="Export the run read (None for in-memory data).")
    target_versions: dict[str, str] = Field(description="Field (or role) -> target version id it was trained on.")
    config: dict[str, Any] = Field(description="The resolved run configuration.")
    world: int = Field(description="Number of DDP ranks that wrote the stream state.")
    stream: dict[str, Any] = Field(description="Per-rank loader state (rank -> ResumableLoader.state_dict()).")
    version_changes: list[dict[str, Any]] = Field(default_factory=list, description="Accepted version changes.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Last logged train and eval metrics.")
    files: dict[str, str] = Field(default_factory=dict, description="File name -> sha256.")
    created: str = Field(default="", description="UTC time the checkpoint was written.")


@dataclass
class RunSpec:
    """Identity of a run: where it lives and what it trains on (recorded in every checkpoint)."""

    root: Root
    run_id: str
    kind: str
    export_id: str | None
    target_versions: dict[str, str]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def default_run_id(kind: str, identity: dict[str, Any]) -> str:
    """``<kind>-<12 hex>`` of what defines a run (not its length): rerunning the same command resumes it."""
    from foresight.schemas.target import content_id

    return content_id(kind, identity)


def utc_now() -> str:
    """The current UTC time as the run store records it (ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunDir:
    """``runs/<run_id>/`` under a data root: complete checkpoints, run.json and metrics.jsonl."""

    def __init__(self, root: Root, run_id: str):
        self.root, self.run_id = root, run_id
        self.rel = layout.run_dir(run_id)

    def step_rel(self, step: int) -> str:
        return layout.step_dir(self.run_id, step)

    def checkpoints(self) -> list[int]:
        """Steps of complete checkpoints, ascending (a folder without ``_COMPLETE`` does not count)."""
        steps = []
        for name in self.root.ls(self.rel):
            step = layout.step_of(name)
            if step is not None and self.root.file_exists(self.rel, name, layout.COMPLETE_MARKER):
                steps.append(step)
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.checkpoints()
        return steps[-1] if steps else None

    def clear_partial(self) -> None:
        """Remove temporary folders of checkpoints that never completed (a crash mid-write)."""
        for name in self.root.ls(self.rel):
            if name.startswith(layout.PARTIAL_STEP_PREFIX):
                self.root.rm(self.rel, name)

    def save(self, info: CheckpointInfo, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> str:
        """Write ``step-N/`` under a temporary name, mark it complete, then rename it into place."""
        final = self.step_rel(info.step)
        if self.root.exists(final, layout.COMPLETE_MARKER):
            return final
        tmp = layout.partial_step_dir(self.run_id, info.step, uuid.uuid4().hex[:8])
        blobs = {layout.CHECKPOINT_MODEL: safetensors.torch.save({k: v.contiguous() for k, v in model_state.items()}),
                 layout.CHECKPOINT_TRAINER: _torch_bytes(trainer_state)}
        for name, data in blobs.items():
            self.root.write_bytes_atomic(f"{tmp}/{name}", data)
        info.files = {name: _sha256(data) for name, data in blobs.items()}
        info.created = utc_now()
        self.root.write_json_atomic(f"{tmp}/{layout.CHECKPOINT_RECORD}", info.model_dump(mode="json"))
        self.root.write_json_atomic(f"{tmp}/{layout.COMPLETE_MARKER}", {"step": info.step})
        if self.root.exists(final):  # an incomplete leftover with the same name
            self.root.rm(final)
        self.root.rename(tmp, final)
        return final

    def info(self, step: int) -> CheckpointInfo:
        name = layout.step_name(step)
        if not self.root.file_exists(self.step_rel(step), layout.COMPLETE_MARKER):
            raise ValueError(f"run {self.run_id}: no complete checkpoint {name} under {self.root.url}")
        where = f"run {self.run_id} {name}/{layout.CHECKPOINT_RECORD}"
        return validate(CheckpointInfo, self.root.read_json(self.step_rel(step), layout.CHECKPOINT_RECORD), where)

    def _read_verified(self, step: int, name: str, info: CheckpointInfo) -> bytes:
        data = self.root.read_bytes(self.step_rel(step), name)
        if _sha256(data) != info.files.get(name):
            raise ValueError(f"run {self.run_id} {layout.step_name(step)}/{name}: sha256 does not match "
                             f"{layout.CHECKPOINT_RECORD}")
        return data

    def load_model(self, step: int | None = None) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
        """(info, model state) of checkpoint ``step`` (default: the newest complete one), checksum verified."""
        step = self.latest() if step is None else step
        if step is None:
            raise ValueError(f"run {self.run_id}: no complete checkpoint under {self.root.url_of(self.rel)}")
        info = self.info(step)
        return info, safetensors.torch.load(self._read_verified(step, layout.CHECKPOINT_MODEL, info))

    def load(self, step: int) -> tuple[CheckpointInfo, dict[str, torch.Tensor], dict[str, Any]]:
        """(info, model state, trainer state) of a complete checkpoint; checksums verified."""
        info, model_state = self.load_model(step)
        data = self._read_verified(step, layout.CHECKPOINT_TRAINER, info)
        trainer_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return info, model_state, trainer_state

    def prune(self, keep_last: int) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints."""
        for step in self.checkpoints()[:-keep_last] if keep_last > 0 else []:
            self.root.rm(self.step_rel(step))

    def write_run_json(self, spec: RunSpec, version_changes: list[dict[str, Any]], status: str) -> None:
        """The run record: what the run trains on, its config, accepted version changes and its status."""
        self.root.write_json_atomic(layout.run_file(self.run_id, layout.RUN_RECORD), {
            "run_id": spec.run_id, "kind": spec.kind, "export_id": spec.export_id,
            "target_versions": spec.target_versions, "config": spec.config, "extra": spec.extra,
            "version_changes": version_changes, "status": status, "updated": utc_now(),
        })

    def read_run_json(self) -> dict[str, Any]:
        if not self.root.file_exists(self.rel, layout.RUN_RECORD):
            raise ValueError(f"run {self.run_id}: no {layout.RUN_RECORD} under {self.root.url_of(self.rel)}")
        return self.root.read_json(self.rel, layout.RUN_RECORD)


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line; on resume, lines past the resumed step are dropped."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int):
        self.run, self.enabled = run, enabled
        self.rel = layout.run_file(run.run_id, layout.RUN_METRICS)
        self.lines: list[str] = []
        if enabled and run.root.exists(self.rel):
            records = metric_lines(run.root.read_bytes(self.rel), run.root.url_of(self.rel))
            kept = [line for line, record in records if record.get("step", 0) <= resume_step]
            self.lines = kept
            run.root.write_bytes_atomic(self.rel, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=True)
        self.lines.append(line)
        if self.run.root.is_local:
            with open(self.run.root.path(self.rel), "a") as handle:
                handle.write(line + "\n")
        else:  # object stores cannot append: republish the (small) file
            self.run.root.write_bytes_atomic(self.rel, "".join(x + "\n" for x in self.lines).encode())


def metric_lines(data: bytes, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a metrics.jsonl. Lines are appended unsynced, so a crash can
    leave the last one torn: it is dropped with a warning. A damaged line before the last is a
    ValueError naming the file and line."""
    lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s: line %d is torn (%s), dropped", where, number, err.msg)
                break
            raise ValueError(f"{where}: line {number} is not a JSON record ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: line {number} is not a JSON object")
        records.append((line, record))
    return records


def read_metrics(root: Root, run_id: str) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (a torn last line dropped)."""
    rel = layout.run_file(run_id, layout.RUN_METRICS)
    if not root.file_exists(rel):
        return []
    return [record for _, record in metric_lines(root.read_bytes(rel), root.url_of(rel))]
