"""A data root on any fsspec URL: path joining, atomic publication, hashing, zarr stores."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import zarr

from schemas.base import canonical_json

ROOT_ENV = "FORESIGHT_ROOT"
DEFAULT_ROOT = "./foresight-data"
HASH_BLOCK = 4 << 20
ZARR_CODEC_BATCH = 256
"""zarr decodes chunks one at a time by default; batching them is ~6x faster for (1, H, W, 3) frame chunks."""

zarr.config.set({"codec_pipeline.batch_size": ZARR_CODEC_BATCH})


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

    def ls(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a folder; [] when it does not exist."""
        path = self.path(*parts)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def rm(self, *parts: str, recursive: bool = True) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Publish ``data`` at ``rel`` so a reader sees either nothing or all of it."""
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.is_local:
            # A single PUT on an object store is atomic: readers never see a partial object.
            self.fs.pipe_file(path, data)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def write_parts_atomic(self, rel: str, parts: Iterable[bytes | memoryview]) -> str:
        """Publish the concatenation of ``parts`` at ``rel`` (as ``write_bytes_atomic``, without the
        fsync: callers mark completion separately) and return its sha256, hashed while writing."""
        digest = hashlib.sha256()
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.is_local:
            pieces = list(parts)
            for part in pieces:
                digest.update(part)
            self.fs.pipe_file(path, b"".join(pieces))  # one PUT: one copy of the object, not two
            return digest.hexdigest()
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            for part in parts:
                digest.update(part)
                handle.write(part)
        os.replace(tmp, path)
        return digest.hexdigest()

    def write_json_atomic(self, rel: str, obj: Any, canonical: bool = False) -> None:
        text = canonical_json(obj) if canonical else json.dumps(obj, indent=2, sort_keys=True, default=str)
        self.write_bytes_atomic(rel, text.encode())

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
        """Fail early with a one-line message when the root cannot be written."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes_atomic(probe, b"")
            self.rm(probe)
        except (OSError, PermissionError) as err:
            raise ValueError(f"data root {self.url}: not writable ({err.__class__.__name__}: {err})") from None


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def open_root(root: "str | os.PathLike[str] | Root | None" = None) -> Root:
    """A Root from a URL, a path, an existing Root, or the default."""
    if isinstance(root, Root):
        return root
    return Root(root if root is not None else default_root())


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
