"""Progress of a build, read from the store: a tqdm bar on a terminal and a Prefect progress
artifact in a flow run.

A build's shards run in threads, in processes or on Dask workers of other hosts; the one place
that sees all of them is the store, where a shard counts once its ``_done`` record exists. So
:class:`BuildProgress` asks the output which shards are still pending every ``poll_s`` seconds
(one listing of the ``_done`` folder) from a background thread, and moves the bar (clips, shards,
ETA) and the artifact (percent of clips) to match. A look lists every marker, so its cost grows with
the shards: the next look waits at least :data:`LOOK_COST_FACTOR` times as long as the last took,
which keeps the polling thread under ~2% busy (and its listings per shard bounded) at any size. Shards written by another builder of the same
output count too: what the bar shows is how far the output is, not what this process did.

It costs nothing when neither is wanted (stderr not a terminal, or ``FORESIGHT_QUIET``, and no
flow run): then no thread is started.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from foresight.flows.runtime import progress_disabled

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 2.0
"""Seconds between two looks at the pending shards (one listing each), at least."""
LOOK_COST_FACTOR = 50.0
"""The wait after a look is at least this many times the look's own duration."""


def in_flow_run() -> bool:
    """Whether this code runs inside a Prefect flow run (where an artifact can be attached)."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


class BuildProgress:
    """``with BuildProgress(...) as progress:`` around the shard tasks of one build.

    ``pending`` lists the shards not done yet (the output's own view of the store); ``clips_of``
    gives a shard's clip count. Both are called from the polling thread.
    """

    def __init__(self, what: str, pending: Callable[[], list[int]], clips_of: Callable[[int], int], *,
                 poll_s: float = PROGRESS_POLL_S, terminal: bool | None = None, artifact: bool | None = None):
        self.what, self.pending, self.poll_s = what, pending, poll_s
        self.terminal = not progress_disabled() if terminal is None else terminal
        self.artifact = in_flow_run() if artifact is None else artifact
        self.clips: dict[int, int] = {}
        if self.terminal or self.artifact:
            self.clips = {shard: clips_of(shard) for shard in pending()}
        self.total = sum(self.clips.values())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._artifact_id: Any = None

    def __enter__(self) -> BuildProgress:
        if not self.clips:
            return self
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.what, unit="clip", dynamic_ncols=True,
                             postfix=self._postfix(0))
        if self.artifact:
            self._artifact_id = self._create_artifact()
        self._thread = threading.Thread(target=self._poll, name=f"progress {self.what}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.update()
        if self._bar is not None:
            self._bar.close()

    def _poll(self) -> None:
        wait = self.poll_s
        while not self._stop.wait(wait):
            start = time.perf_counter()
            try:
                self.update()
            except Exception as error:  # a failed look (a network blip) must not end the build
                log.debug("%s: progress not updated: %s", self.what, error)
            wait = max(self.poll_s, LOOK_COST_FACTOR * (time.perf_counter() - start))

    def update(self) -> tuple[int, int]:
        """Look at the store once and move the bar and the artifact; returns (shards, clips) done."""
        still = set(self.pending())
        done = [shard for shard in self.clips if shard not in still]
        clips = sum(self.clips[shard] for shard in done)
        if self._bar is not None:
            self._bar.update(clips - self._bar.n)
            self._bar.set_postfix_str(self._postfix(len(done)), refresh=True)
        if self._artifact_id is not None:
            self._update_artifact(clips)
        return len(done), clips

    def _postfix(self, shards: int) -> str:
        return f"{shards}/{len(self.clips)} shards"

    def _create_artifact(self) -> Any:
        from prefect.artifacts import create_progress_artifact

        try:
            return create_progress_artifact(progress=0.0, description=f"{self.what}: clips stored")
        except Exception as error:  # the API is down: the build goes on without an artifact
            log.warning("%s: no Prefect progress artifact (%s)", self.what, error)
            return None

    def _update_artifact(self, clips: int) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self._artifact_id, progress=100.0 * clips / max(self.total, 1))
