"""A data root on any fsspec URL: path joining, atomic publication, hashing, zarr stores."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import xxhash
import zarr

from foresight.schemas.base import canonical_json
from foresight.storage.process import machine_tag, process_alive, process_start

ROOT_ENV = "FORESIGHT_ROOT"
DEFAULT_ROOT = "./foresight-data"
HASH_BLOCK = 4 << 20
ZARR_CODEC_BATCH = 256
"""zarr decodes chunks one at a time by default; batching them is ~6x faster for (1, H, W, 3) frame chunks."""

TMP_PREFIX = ".tmp-"
"""Name prefix of every temporary a writer publishes by rename; readers and listings skip it."""
FAST_HASH = "xxh3_128"
"""The per-shard / per-sample hash readers check while reading (sha256 costs more than the read)."""

UNSAFE_CLAIMS_ENV = "FORESIGHT_UNSAFE_CLAIMS"
"""Set to 1 to use an object store that ignores conditional create anyway (one builder per version
at a time, docs/DEPLOY.md): the start-up probe then warns instead of refusing the root."""

zarr.config.set({"codec_pipeline.batch_size": ZARR_CODEC_BATCH})

_PROBED: dict[tuple[str, str, str], bool] = {}
_PROBE_LOCK = threading.Lock()


class DiskFullError(OSError):
    """No space left on the device while writing ``path`` (the message names it and the bytes needed)."""

    def __init__(self, path: str, needed: int, free: int | None):
        where = f"{free} free" if free is not None else "free space unknown"
        super().__init__(errno.ENOSPC, f"disk full writing {path}: {needed} bytes needed, {where}")
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        return self.strerror


_TEMP_OWNER = re.compile(r"^\.tmp-([0-9a-f]{8})-(\d+)-(\d*)-[0-9a-f]{8}")


def temp_name(label: str = "") -> str:
    """A temporary's file name that records its writer: ``.tmp-<machine>-<pid>-<start>-<random>[-label]``,
    so a later run can tell a dead writer's leftover (:func:`remove_dead_temporaries`) from live work."""
    pid = os.getpid()
    return f"{TMP_PREFIX}{machine_tag()}-{pid}-{process_start(pid)}-{uuid.uuid4().hex[:8]}" + \
        (f"-{label}" if label else "")


def temp_writer_dead(name: str) -> bool:
    """True only when ``name`` is a temporary of a process of this machine that no longer runs
    (a temporary of another machine, or of an unknown writer, is never judged dead)."""
    match = _TEMP_OWNER.match(name)
    if match is None or match.group(1) != machine_tag():
        return False
    return not process_alive(int(match.group(2)), match.group(3))


def fast_digest():
    """A fresh hasher of :data:`FAST_HASH` (xxh3, 128 bit: ~15x faster than sha256 here)."""
    return xxhash.xxh3_128()


def free_bytes(path: str) -> int | None:
    """Free bytes on the local filesystem holding the file ``path`` (None when unknown)."""
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".").free
    except OSError:
        return None


def fsync_dir(path: str) -> None:
    """fsync a local directory so a rename into it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) refuse fsync on a directory; nothing more can be done
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    if os.path.isdir(path):
        fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(tmp: str) -> None:
    Path(tmp).unlink(missing_ok=True)


def _remaining_bytes(pieces: Iterator[bytes | memoryview]) -> int:
    """Bytes of the parts a failed write had not reached yet (a lazily encoded shard is encoded to
    know its size), so a full disk's message says what the whole object needs; 0 where that fails."""
    try:
        return sum(memoryview(part).nbytes for part in pieces)
    except Exception:  # the message is already an error path: a lower bound beats a second error
        return 0


def default_root() -> str:
    """The data root: ``$FORESIGHT_ROOT`` or ``./foresight-data``."""
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


class Root:
    """One data root. Paths given to its methods are relative to the root (``a/b/c``)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        url = str(url)
        options = dict(storage_options or {})
        if "://" in url and not url.startswith("file://"):
            # Other processes add markers and claims under the same prefixes: a cached listing
            # (s3fs keeps them forever by default) would hide their work from exists() and ls().
            options.setdefault("use_listings_cache", False)
        self.fs, base = fsspec.core.url_to_fs(url, **options)
        self.storage_options = options
        self.is_local = "file" in _protocols(self.fs)
        self.base = str(Path(base).resolve()) if self.is_local else base.rstrip("/")
        self.url = self.base if self.is_local else f"{_protocols(self.fs)[0]}://{self.base}"

    def __repr__(self) -> str:
        return f"Root({self.url!r})"

    def path(self, *parts: str) -> str:
        """Filesystem path (for ``self.fs``) of a path relative to the root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.base}/{rel}" if rel else self.base

    def url_of(self, *parts: str) -> str:
        """Full URL of a relative path (what a user or another process can open)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.url}/{rel}" if rel else self.url

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def file_exists(self, *parts: str) -> bool:
        """Whether a file exists, in one request on S3: fsspec's ``exists`` there is a HEAD and, for a
        missing key, a LIST looking for a folder of that name -- two requests per check of a shard
        marker or an index.json that is not written yet."""
        head_object = getattr(self.fs, "call_s3", None) if "s3" in _protocols(self.fs) else None
        if head_object is None:
            return self.exists(*parts)
        bucket, key, _ = self.fs.split_path(self.path(*parts))
        try:
            head_object("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def ls(self, *parts: str, prefix: str = "") -> list[str]:
        """Names (not paths) directly under a folder, only those starting with ``prefix`` when given
        (on S3 the listing itself is narrowed to them); [] when the folder does not exist."""
        path = self.path(*parts)
        try:
            entries = self._list_folder(path, prefix)
        except FileNotFoundError:
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))
        return sorted(name for name in names if name.startswith(prefix))

    def _list_folder(self, path: str, prefix: str = "") -> list[str]:
        """Paths directly under ``path`` (see :meth:`folder_entries`)."""
        if self.is_local:
            return self.fs.ls(path, detail=False)
        return [entry["name"] for entry in self.folder_entries(path, prefix)]

    def folder_entries(self, path: str, prefix: str = "") -> list[dict[str, Any]]:
        """fsspec info dicts of what is directly under the filesystem path ``path`` (files, and
        folders as ``type: directory``). On S3 the folder alone is listed: s3fs's ``ls`` lists the
        parent too when a folder is empty (to tell a file of that name), and the parent of a shard's
        claim folder holds every shard's -- a listing per claim that grew with the version."""
        lsdir = getattr(self.fs, "_lsdir", None)
        if self.is_local or lsdir is None or getattr(self.fs, "asynchronous", False):
            return self.fs.ls(path, detail=True)
        from fsspec.asyn import sync

        return sync(self.fs.loop, lsdir, self.fs._strip_protocol(path).rstrip("/"), prefix=prefix)

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def rm(self, *parts: str, recursive: bool = True) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        """Parsed JSON of a stored file; a truncated or non-UTF-8 file, or one that cannot be read
        (a folder in its place, no permission), is a ValueError naming it. A missing file stays a
        FileNotFoundError: callers tell absent from damaged."""
        try:
            data = self.read_bytes(*parts)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise ValueError(f"{self.url_of(*parts)}: cannot be read ({err.strerror or err})") from None
        return parse_json(data, self.url_of(*parts))

    def write_bytes_atomic(self, rel: str, data: bytes, durable: bool = True) -> None:
        """Publish ``data`` at ``rel`` so a reader sees either nothing or all of it (fsynced unless
        ``durable`` is False: the caller then makes the folder durable at once, :meth:`fsync_tree`)."""
        self.write_parts_atomic(rel, [data], durable=durable)

    def write_parts_atomic(self, rel: str, parts: Iterable[bytes | memoryview],
                           digests: Iterable[Any] = (), durable: bool = True) -> str:
        """Publish the concatenation of ``parts`` at ``rel``; returns its sha256, hashed while writing.

        Every hasher in ``digests`` (e.g. :func:`fast_digest`) is updated with the same bytes. On a
        local disk the data goes to a temporary beside the target, is fsynced, renamed, and the folder
        fsynced, so a marker written after this call never names bytes a power loss could take back;
        the temporary is removed on every exception path. A full disk raises :class:`DiskFullError`.
        On an object store one PUT is atomic and durable once it returns.
        """
        digest, extra = hashlib.sha256(), list(digests)
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        if not self.is_local:  # no folders to make: s3fs's makedirs would ask whether the bucket exists
            pieces = list(parts)
            for part in pieces:
                for hasher in (digest, *extra):
                    hasher.update(part)
            self.fs.pipe_file(path, b"".join(pieces))  # one PUT: one copy of the object, not two
            return digest.hexdigest()
        self.fs.makedirs(parent, exist_ok=True)
        tmp, written, pieces = f"{parent}/{temp_name()}", 0, iter(parts)
        try:
            with open(tmp, "wb") as handle:
                for part in pieces:
                    for hasher in (digest, *extra):
                        hasher.update(part)
                    written += memoryview(part).nbytes  # counted first: a failed write still needs it
                    handle.write(part)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:
            _discard(tmp)
            if err.errno == errno.ENOSPC:
                raise DiskFullError(path, written + _remaining_bytes(pieces), free_bytes(path)) from None
            raise
        except BaseException:
            _discard(tmp)
            raise
        if durable:
            fsync_dir(parent)
        return digest.hexdigest()

    def fsync_tree(self, rel: str) -> int:
        """Make every file and folder below ``rel`` durable; returns how many were synced.

        For a folder written file by file without syncs (an episode's staging folder: zarr chunks,
        parquet, JSON) before one marker publishes it. The fsyncs run concurrently, so the
        filesystem's journal commits them together instead of one commit per file. A no-op on
        object stores, where every PUT is durable once it returns.
        """
        if not self.is_local:
            return 0
        paths = []
        for folder, _, files in os.walk(self.path(rel)):
            paths.extend(os.path.join(folder, name) for name in files)
            paths.append(folder)
        with ThreadPoolExecutor(max_workers=min(16, len(paths) or 1)) as pool:
            list(pool.map(_fsync_path, paths))
        return len(paths)

    def write_json_atomic(self, rel: str, obj: Any, canonical: bool = False, durable: bool = True) -> None:
        text = canonical_json(obj) if canonical else json.dumps(obj, indent=2, sort_keys=True, default=str)
        self.write_bytes_atomic(rel, text.encode(), durable=durable)

    def rename(self, src_rel: str, dst_rel: str) -> None:
        """Move a file or folder (a real rename on local disks; copy + delete on object stores)."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        if self.is_local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:
            # fsspec's recursive mv also copies the pseudo-folders object stores list, and fails on
            # them: copy each object (a file gives [itself]), then delete the source.
            for path in self.fs.find(src):
                self.fs.copy(path, dst + path[len(src):])
            self.fs.rm(src, recursive=True)
            self.fs.invalidate_cache(src)
            self.fs.invalidate_cache(dst)

    def sha256(self, *parts: str) -> str:
        """sha256 of a stored file, streamed."""
        digest = hashlib.sha256()
        with self.fs.open(self.path(*parts), "rb") as handle:
            for block in iter(lambda: handle.read(HASH_BLOCK), b""):
                digest.update(block)
        return digest.hexdigest()

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def du(self, *parts: str) -> int:
        """Total bytes under a folder (0 when absent)."""
        path = self.path(*parts)
        if not self.fs.exists(path):
            return 0
        return int(self.fs.du(path, total=True))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def zarr_store(self, rel: str, read_only: bool = False) -> zarr.abc.store.Store:
        """A zarr v3 store rooted at ``rel`` on this root's filesystem."""
        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url_of(rel), storage_options=self.storage_options,
                                                read_only=read_only)

    def check_writable(self) -> None:
        """Fail early with a one-line message when the root cannot be written, or when it is on an
        object store whose conditional create (which shard claims rely on) is not honoured."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes_atomic(probe, b"")
            self.rm(probe)
        except (OSError, PermissionError) as err:
            raise ValueError(f"data root {self.url}: not writable ({err.__class__.__name__}: {err})") from None
        self.require_conditional_create()

    def endpoint(self) -> str:
        """Where this root's objects live, as an error names it: the S3 endpoint URL, else the URL."""
        if self.is_local:
            return self.url
        configured = getattr(self.fs, "endpoint_url", None) or \
            (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
        if "s3" in _protocols(self.fs):
            return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") \
                or "AWS S3 (no endpoint URL set)"
        return configured or self.url

    def require_conditional_create(self) -> None:
        """Check once per process and bucket that "create unless it exists" is honoured (shard claims
        are exclusive only then); one-line ValueError naming the endpoint where it is not.

        Local disks use ``os.link`` (always exclusive) and are not probed. On an object store two
        creates of one probe object are made: the second must fail with FileExistsError (S3:
        ``PUT If-None-Match: *`` answered 412) and leave the first's bytes. s3fs documents this as
        known to work on AWS S3 only; current MinIO honours it, older releases ignore the header (docs/DEPLOY.md).
        With ``$FORESIGHT_UNSAFE_CLAIMS=1`` a failed probe is a warning instead.
        """
        if self.is_local:
            return
        key = (_protocols(self.fs)[0], self.endpoint(), self.base.split("/", 1)[0])
        with _PROBE_LOCK:
            if key not in _PROBED:
                _PROBED[key] = self._probe_conditional_create()
        if _PROBED[key] is True:
            return
        message = (f"data root {self.url}: the object store at {self.endpoint()} does not honour conditional "
                   f"create ({_PROBED[key]}), so shard claims would not be exclusive; use a store that does "
                   f"(AWS S3, a current MinIO) or set {UNSAFE_CLAIMS_ENV}=1 and run one builder "
                   "per version at a time")
        if os.environ.get(UNSAFE_CLAIMS_ENV) == "1":
            import logging

            logging.getLogger(__name__).warning("%s (%s=1: going on)", message, UNSAFE_CLAIMS_ENV)
            return
        raise ValueError(message)

    def _probe_conditional_create(self) -> bool | str:
        """True when a second exclusive create of one object fails and keeps the first's bytes, else
        what happened instead."""
        path = self.path(f".probe-create-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(path, b"first", mode="create")
            try:
                self.fs.pipe_file(path, b"second", mode="create")
            except FileExistsError:
                kept = self.fs.cat_file(path)
                return True if kept == b"first" else f"the refused create still replaced the object: {kept!r}"
            return "a second create of one object succeeded and replaced it"
        except (OSError, ValueError, NotImplementedError, TypeError) as err:
            return f"{err.__class__.__name__}: {' '.join(str(err).split())}"
        finally:
            # Nothing was created, or the store refuses deletes: then a probe object is left.
            with contextlib.suppress(OSError, NotImplementedError):
                self.fs.rm_file(path)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def open_root(root: "str | os.PathLike[str] | Root | None" = None) -> Root:
    """A Root from a URL, a path, an existing Root, or the default."""
    if isinstance(root, Root):
        return root
    return Root(root if root is not None else default_root())


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a stored record's canonical JSON (sorted keys, no whitespace) without its own
    ``content_sha256`` key: what manifests and export indexes record of themselves, so an edit
    anywhere in the file is refused when it is opened."""
    content = {key: value for key, value in data.items() if key != "content_sha256"}
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def check_content_digest(data: dict[str, Any], where: str) -> None:
    """ValueError naming ``where`` when a record's recorded ``content_sha256`` is not its content's
    (records written before it carry none and pass)."""
    recorded = data.get("content_sha256")
    if recorded is not None and content_digest(data) != recorded:
        raise ValueError(f"{where}: content does not match its recorded content_sha256; the file was edited "
                         "or damaged, refusing it")


def parse_json(data: bytes, where: str) -> Any:
    """``json.loads`` whose errors name the file, line and column (and say what was expected)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def remove_temporaries(root: Root, folder_rel: str, prefix: str = TMP_PREFIX,
                       only_dead: bool = False) -> list[str]:
    """Delete the writer temporaries directly inside a folder; returns the names removed.

    Without ``only_dead`` call it only for a folder no live writer uses (the caller holds its shard's
    claim); with it, only temporaries whose writer (recorded in the name) has exited are removed.
    """
    removed = []
    # Only the temporaries are listed: a 1-d array keeps every shard's object in one folder.
    for name in root.ls(folder_rel, prefix=prefix):
        if not only_dead or temp_writer_dead(name):
            try:
                root.fs.rm(root.path(folder_rel, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


def remove_dead_temporaries_under(root: Root, base_rel: str, prefix: str = TMP_PREFIX) -> list[str]:
    """Delete the temporaries of exited writers anywhere below a folder; returns their paths
    relative to the root. One recursive listing (on S3: one LIST per 1,000 objects) instead of one
    listing per folder, which for a version of n shards was n listings at every finalize."""
    base = root.path(base_rel)
    try:
        paths = _local_files_named(base, prefix) if root.is_local else root.fs.find(base)
    except FileNotFoundError:
        return []
    removed = []
    for path in paths:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix) and temp_writer_dead(name):
            try:
                root.fs.rm(path)
            except FileNotFoundError:
                continue
            removed.append(path[len(base.rstrip("/")) + 1:])
    return removed


def _local_files_named(base: str, prefix: str) -> Iterator[str]:
    """Paths of the files below a local folder whose name starts with ``prefix``, one folder at a
    time: fsspec's ``find`` stats every file and holds an info dict for each (~0.9 KB an object:
    ~790 MB for a 10^6-clip pi0 version at finalize); this holds one folder's matches."""
    for entries in local_entries_by_folder(base):
        yield from (entry.path for entry in entries if entry.name.startswith(prefix))


def local_entries_by_folder(base: str) -> Iterator[list[os.DirEntry]]:
    """The entries that are not folders below a local folder, one folder's list at a time
    (symlinks not followed, nothing stat'ed; a missing folder yields nothing). Each list comes
    after its folder's listing is closed, so the caller may remove what it names."""
    folders = [base]
    while folders:
        try:
            listing = os.scandir(folders.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with listing:
            entries = []
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                else:
                    entries.append(entry)
        yield entries


def object_files_by_folder(root: Root, rel: str) -> Iterator[list[dict[str, Any]]]:
    """The files below a folder of a root, as fsspec info dicts, one list at a time: the folder's
    own files (one delimited listing), then each subfolder's whole tree in turn (one recursive
    listing each: on S3 1,000 objects a request). The object-store counterpart of
    :func:`local_entries_by_folder` for walks that need sizes and times: a caller walking a target
    version holds one array's listing (~0.9 KB an object) instead of the whole tree's."""
    try:
        entries = root.folder_entries(root.path(rel))
    except FileNotFoundError:
        return
    yield [entry for entry in entries if entry.get("type") == "file"]
    for entry in entries:
        if entry.get("type") == "directory":
            try:
                found = root.fs.find(entry["name"], detail=True)
            except FileNotFoundError:
                continue
            yield [info for info in found.values() if info.get("type", "file") == "file"]


def read_many(root: Root, rels: Sequence[str]) -> dict[str, bytes]:
    """Bytes of many stored files by relative path, fetched together (concurrently on an object
    store, where one GET after another made finalize wait n round trips)."""
    paths = {root.fs._strip_protocol(root.path(rel)): rel for rel in rels}
    if not paths:
        return {}
    found = root.fs.cat(list(paths), on_error="raise")
    return {paths[root.fs._strip_protocol(path)]: data for path, data in found.items()}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_local_files(folder: str | os.PathLike[str], suffixes=(".safetensors", ".bin", ".pt", ".pth")) -> dict[str, str]:
    """sha256 of every weight file under a local folder, keyed by relative path (model identity)."""
    folder = Path(folder)
    digests: dict[str, str] = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in suffixes:
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(HASH_BLOCK), b""):
                    digest.update(block)
            digests[str(file.relative_to(folder))] = digest.hexdigest()
    return digests


def parquet_bytes(table) -> bytes:
    """Serialise an Arrow table as parquet (zstd) into bytes, for atomic publication."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_parquet(root: Root, rel: str, columns=None):
    import pyarrow.parquet as pq

    with root.open(rel) as handle:
        return pq.read_table(handle, columns=columns)
