"""The eval store: ``evals/<eval_id>/`` with eval.json, one JSON file per finished episode, videos.

``eval.json`` is written when an eval starts (status ``running``, its key in the clear) and rewritten
once every episode is in (status ``complete`` with the summary). Each episode file is published
atomically when its rollout ends, so an interrupted eval keeps what it finished and a rerun of the
same eval id runs only the missing (task, seed) pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from foresight.schemas.base import validate, validate_stored
from foresight.schemas.eval import EpisodeResult, EvalKey, EvalRecord
from foresight.storage import layout
from foresight.storage.fs import Root, open_root
from foresight.storage.provenance import git_commit, host, now_iso, package_versions


class EvalStore:
    """Read and write the evals of one data root."""

    def __init__(self, root: Root | str | None):
        self.root = open_root(root)

    # ------------------------------------------------------------- records
    def exists(self, eval_id: str) -> bool:
        return self.root.file_exists(layout.eval_dir(eval_id), layout.EVAL_RECORD)

    def record(self, eval_id: str) -> EvalRecord:
        """eval.json of ``eval_id``; ValueError naming the file when absent or malformed."""
        rel = f"{layout.eval_dir(eval_id)}/{layout.EVAL_RECORD}"
        if not self.root.file_exists(rel):
            raise ValueError(f"eval '{eval_id}': no {self.root.url_of(rel)}")
        return validate_stored(EvalRecord, self.root.read_json(rel), self.root.url_of(rel))

    def begin(self, key: EvalKey, version_changes: list[dict]) -> EvalRecord:
        """The record of ``key``'s eval: the stored one when it exists, else a new ``running`` one."""
        eval_id = key.eval_id()
        if self.exists(eval_id):
            return self.record(eval_id)
        record = EvalRecord(eval_id=eval_id, status="running", key=key, version_changes=version_changes,
                            created=now_iso(), git_commit=git_commit(), host=host(), packages=package_versions())
        self._write(record)
        return record

    def finish(self, record: EvalRecord) -> EvalRecord:
        """Publish the complete record (summary filled in by the caller)."""
        record = record.model_copy(update={"status": "complete", "finished": now_iso()})
        self._write(record)
        return record

    def _write(self, record: EvalRecord) -> None:
        self.root.write_json_atomic(f"{layout.eval_dir(record.eval_id)}/{layout.EVAL_RECORD}",
                                    record.model_dump(mode="json"))

    def ids(self) -> list[str]:
        """Every eval id with an eval.json, sorted."""
        return [name for name in self.root.ls(layout.EVALS) if layout.is_safe_id(name) and self.exists(name)]

    def records(self) -> Iterator[EvalRecord]:
        for eval_id in self.ids():
            yield self.record(eval_id)

    def using_version(self, version_id: str) -> list[EvalRecord]:
        """The evals whose policy was built from target version ``version_id``."""
        return [record for record in self.records() if version_id in record.versions]

    # ------------------------------------------------------------- episodes
    def has_episode(self, eval_id: str, task: str, seed: int) -> bool:
        return self.root.file_exists(layout.eval_episode(eval_id, task, seed))

    def write_episode(self, eval_id: str, result: EpisodeResult) -> None:
        self.root.write_bytes_atomic(layout.eval_episode(eval_id, result.task, result.seed),
                                     json.dumps(result.model_dump(mode="json"), sort_keys=True).encode())

    def episodes(self, eval_id: str) -> list[EpisodeResult]:
        """Every finished episode of an eval, by task then seed."""
        results = []
        base = f"{layout.eval_dir(eval_id)}/{layout.EVAL_EPISODES}"
        for task in self.root.ls(base):
            for name in self.root.ls(base, task):
                if name.endswith(".json") and not name.startswith("."):
                    rel = f"{base}/{task}/{name}"
                    results.append(validate(EpisodeResult, self.root.read_json(rel), self.root.url_of(rel)))
        return sorted(results, key=lambda r: (r.task, r.seed))

    def missing(self, key: EvalKey) -> list[tuple[str, int]]:
        """(task, seed) pairs of ``key`` without a finished episode, in task then seed order."""
        eval_id = key.eval_id()
        return [(task, seed) for task in key.tasks for seed in key.seeds if not self.has_episode(eval_id, task, seed)]

    # ------------------------------------------------------------- files beside the record
    def video_rel(self, task: str, seed: int) -> str:
        """Path of an episode's MP4 relative to the eval folder."""
        return f"{layout.EVAL_VIDEOS}/{layout.check_id('task', task)}-{int(seed)}.mp4"

    def write_file(self, eval_id: str, rel: str, data: bytes) -> str:
        """Publish a file under the eval folder; returns its URL."""
        self.root.write_bytes_atomic(f"{layout.eval_dir(eval_id)}/{rel}", data)
        return self.root.url_of(layout.eval_dir(eval_id), rel)

    def read_file(self, eval_id: str, rel: str) -> bytes:
        return self.root.read_bytes(layout.eval_dir(eval_id), rel)

    def url(self, eval_id: str, rel: str = "") -> str:
        return self.root.url_of(layout.eval_dir(eval_id), rel)
