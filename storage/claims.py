"""Shard claims: so that two builders of one version write each shard once, on any fsspec store.

A claim is a sequence of *generations* under ``targets/<version>/_claims/<shard>/``: files
``00000000``, ``00000001``, ... each holding one JSON :class:`ClaimRecord`. The newest generation
says who holds the shard. Every change (take a free shard, take over an expired claim, release)
creates the *next* generation with an exclusive create, so of two builders racing for the same
change exactly one wins. The only primitive needed is "create this object unless it exists":

- local disks: write a temporary file, then ``os.link`` it to the name (fails if it exists);
- S3 (AWS, MinIO, moto) through s3fs: ``PUT`` with ``If-None-Match: *``;
- other fsspec stores: ``pipe_file(mode="create")``, atomic where the backend makes it so.

A holder renews its record from a heartbeat thread. A claim is free when it was released, when
its expiry has passed (a claimer on another host died), or at once when its claimer ran on this
host (same host, boot and pid namespace) and that process no longer exists.

Builders take claims through a :class:`ClaimSet` (flows/build.py does, for every stage), and
:func:`wait_for_shards` in the flow, after its tasks, for shards another builder still holds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.refs import Ref
from foresight.storage import layout
from foresight.storage.fs import DiskFullError, Root, free_bytes, open_root, temp_name
from foresight.storage.process import machine_id, process_alive, process_start

log = logging.getLogger(__name__)

TTL_ENV = "FORESIGHT_CLAIM_TTL_S"
DEFAULT_TTL_S = 120.0
GENERATION_DIGITS = 8
MAX_ACQUIRE_ROUNDS = 16


class ClaimRecord(StrictModel):
    """One generation of a shard claim."""

    state: Literal["held", "released"] = Field(description="held: a builder works on the shard.")
    owner: str = Field(description="Random token of the claiming builder (one per claim).")
    host: str = Field(description="Host name of the claimer.")
    machine: str = Field(description="Host, boot id and pid namespace: where `pid` is meaningful.")
    pid: int = Field(description="Process id of the claimer.")
    pid_start: str = Field(description="Start time of that process (/proc), to tell a reused pid.")
    acquired: float = Field(description="Unix time the claim was taken.")
    expires: float = Field(description="Unix time after which anyone may take the shard over.")


def default_ttl() -> float:
    """Claim lifetime in seconds: ``$FORESIGHT_CLAIM_TTL_S`` or 120."""
    value = os.environ.get(TTL_ENV)
    if not value:
        return DEFAULT_TTL_S
    ttl = float(value)
    if ttl <= 0:
        raise ValueError(f"{TTL_ENV}={value!r}: must be a positive number of seconds")
    return ttl


def claimer_alive(record: ClaimRecord, now: float | None = None) -> bool:
    """Whether a held claim still protects its shard."""
    now = time.time() if now is None else now
    if record.state != "held" or record.expires <= now:
        return False
    if record.machine != machine_id():
        return True  # another machine: only the expiry can tell
    return process_alive(record.pid, record.pid_start)


def owner_dir(version_id: str) -> str:
    """Folder of the target version or export whose shards are claimed."""
    if Ref.infer(version_id).kind == "export":
        return layout.export_dir(version_id)
    return layout.target_dir(version_id)


def claims_dir(version_id: str, shard_index: int) -> str:
    """Folder (relative to the root) of the claim generations of one shard."""
    return f"{owner_dir(version_id)}/{layout.CLAIMS_DIR}/{int(shard_index)}"


def _generation_name(generation: int) -> str:
    return f"{generation:0{GENERATION_DIGITS}d}"


def create_exclusive(root: Root, rel: str, data: bytes) -> bool:
    """Publish ``data`` at ``rel`` unless something is there; True when this call created it."""
    path = root.path(rel)
    parent = path.rsplit("/", 1)[0]
    root.fs.makedirs(parent, exist_ok=True)
    if root.is_local:
        tmp = f"{parent}/{temp_name()}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # atomic, fails when the name exists; readers see all or nothing
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskFullError(path, len(data), free_bytes(path)) from None
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    root.require_conditional_create()  # probed once per process and bucket: a claim here must be exclusive
    try:
        root.fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    root.fs.invalidate_cache(parent)
    return True


def _generations(root: Root, version_id: str, shard_index: int) -> list[int]:
    folder = claims_dir(version_id, shard_index)
    root.fs.invalidate_cache(root.path(folder))
    return sorted(int(name) for name in root.ls(folder) if name.isdigit())


def _read_record(root: Root, version_id: str, shard_index: int, generation: int) -> ClaimRecord | None:
    rel = f"{claims_dir(version_id, shard_index)}/{_generation_name(generation)}"
    try:
        return ClaimRecord.model_validate(json.loads(root.read_bytes(rel)))
    except FileNotFoundError:
        return None


def current_claim(root: Root | str, version_id: str, shard_index: int) -> tuple[int, ClaimRecord | None]:
    """The newest generation number (-1 when none) and its record."""
    root = open_root(root)
    generations = _generations(root, version_id, shard_index)
    if not generations:
        return -1, None
    return generations[-1], _read_record(root, version_id, shard_index, generations[-1])


def active_claims(root: Root | str, version_id: str) -> dict[int, ClaimRecord]:
    """Shards of a version currently held by a live claimer, with their records."""
    root = open_root(root)
    held = {}
    for name in root.ls(owner_dir(version_id), layout.CLAIMS_DIR):
        if name.isdigit():
            _, record = current_claim(root, version_id, int(name))
            if record is not None and claimer_alive(record):
                held[int(name)] = record
    return held


class ShardClaim:
    """This process's claim on one shard: acquire, renew from a heartbeat thread, release."""

    def __init__(self, root: Root | str, version_id: str, shard_index: int, ttl_s: float | None = None):
        self.root = open_root(root)
        self.version_id, self.shard_index = version_id, int(shard_index)
        self.ttl_s = default_ttl() if ttl_s is None else float(ttl_s)
        self.owner = uuid.uuid4().hex
        self.acquired = time.time()
        self.generation: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self, state: str) -> ClaimRecord:
        now = time.time()
        pid = os.getpid()
        return ClaimRecord(state=state, owner=self.owner, host=socket.gethostname(), machine=machine_id(),
                           pid=pid, pid_start=process_start(pid), acquired=self.acquired, expires=now + self.ttl_s)

    def _rel(self, generation: int) -> str:
        return f"{claims_dir(self.version_id, self.shard_index)}/{_generation_name(generation)}"

    def acquire(self) -> bool:
        """Take the shard when it is free; False when a live claimer holds it."""
        for _ in range(MAX_ACQUIRE_ROUNDS):
            generation, record = current_claim(self.root, self.version_id, self.shard_index)
            if record is None and generation >= 0:
                continue  # the newest generation vanished (claims cleared): look again
            if record is not None and claimer_alive(record):
                return False
            if record is not None and record.state == "held":
                log.warning("%s shard %d: taking over the claim of %s pid %d (expired or dead)",
                            self.version_id, self.shard_index, record.host, record.pid)
            self.acquired = time.time()
            payload = self._record("held").model_dump_json().encode()
            if create_exclusive(self.root, self._rel(generation + 1), payload):
                self.generation = generation + 1
                self._start_heartbeat()
                return True
        # Every round lost a race to another claimer that is therefore alive and holding it.
        return False

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_loop, daemon=True,
                                           name=f"claim-{self.version_id}-{self.shard_index}")
        self._heartbeat.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except OSError as err:  # a transient store error: the next beat tries again
                log.warning("%s shard %d: claim renewal failed: %s", self.version_id, self.shard_index, err)

    def renew(self) -> None:
        """Push the expiry forward; marks the claim lost when a newer generation exists."""
        assert self.generation is not None, "renew() before acquire()"
        newest = _generations(self.root, self.version_id, self.shard_index)
        if newest and newest[-1] != self.generation:
            self.lost = True
            self._stop.set()
            log.warning("%s shard %d: claim was taken over (this builder stalled past its expiry)",
                        self.version_id, self.shard_index)
            return
        self.root.write_bytes_atomic(self._rel(self.generation), self._record("held").model_dump_json().encode())

    def release(self) -> None:
        """Stop renewing and publish a 'released' generation, so the shard is free at once."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.generation is None or self.lost:
            return
        if not self.root.exists(claims_dir(self.version_id, self.shard_index)):
            self.generation = None  # the build finished and removed its claims: nothing to release
            return
        released = self._record("released").model_dump_json().encode()
        if not create_exclusive(self.root, self._rel(self.generation + 1), released):
            log.warning("%s shard %d: claim already superseded at release", self.version_id, self.shard_index)
        self.generation = None


class ClaimSet:
    """The claims one shard task holds on the shards of one version (or export): the only way a
    builder takes a shard. :meth:`take` skips a shard that is done or held by a live builder
    (checking ``is_done`` again once held, since a holder may have finished in between) and runs
    ``on_acquire`` (e.g. removing a dead writer's temporaries) before handing it out; every claim
    taken is released by :meth:`release` or :meth:`release_all`, also on error, so a retry
    elsewhere can take it without waiting for the expiry."""

    def __init__(self, root: Root | str, version_id: str, *, is_done: Callable[[int], bool] | None = None,
                 on_acquire: Callable[[int], Any] | None = None, ttl_s: float | None = None):
        self.root, self.version_id = open_root(root), version_id
        self.is_done, self.on_acquire, self.ttl_s = is_done, on_acquire, ttl_s
        self._held: dict[int, ShardClaim] = {}
        self._lock = threading.Lock()

    def _done(self, shard_index: int) -> bool:
        return self.is_done is not None and self.is_done(shard_index)

    def take(self, shard_index: int) -> ShardClaim | None:
        """Claim a shard; None when it is done or a live builder holds it."""
        if self._done(shard_index):
            return None
        claim = ShardClaim(self.root, self.version_id, shard_index, self.ttl_s)
        if not claim.acquire():
            log.info("%s shard %d: held by another builder, skipped", self.version_id, shard_index)
            return None
        try:
            if self._done(shard_index):
                claim.release()
                return None
            if self.on_acquire is not None:
                self.on_acquire(shard_index)
        except BaseException:
            claim.release()
            raise
        with self._lock:
            self._held[shard_index] = claim
        return claim

    def release(self, shard_index: int) -> None:
        with self._lock:
            claim = self._held.pop(shard_index, None)
        if claim is not None:
            claim.release()

    def release_all(self) -> None:
        for shard_index in list(self._held):
            self.release(shard_index)

    @contextmanager
    def hold(self, shard_index: int) -> Iterator[ShardClaim | None]:
        """:meth:`take` for the body of a ``with`` block, released on exit::

            with claims.hold(3) as owned:
                if owned:
                    writer.write_shard(3, compute(3))
        """
        claim = self.take(shard_index)
        try:
            yield claim
        finally:
            if claim is not None:
                self.release(shard_index)


def wait_for_shards(pending: Callable[[], list[int]], held: Callable[[], set[int]],
                    run_missing: Callable[[list[int]], Any], *, poll_s: float = 1.0,
                    timeout_s: float | None = None, what: str = "version") -> None:
    """Finish a version that other builders work on too.

    Loops until ``pending()`` is empty: shards nobody holds (their claimer died, or released
    after an error) are handed to ``run_missing`` (which runs the usual claiming shard tasks);
    shards a live builder holds are waited for. Raises TimeoutError after ``timeout_s``.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        todo = pending()
        if not todo:
            return
        busy = held()
        free = [i for i in todo if i not in busy]
        if free:
            log.info("%s: running %d shard(s) nobody holds: %s", what, len(free), free)
            run_missing(free)
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what}: shards {todo} still held by other builders after {timeout_s:.0f} s")
        time.sleep(poll_s)
