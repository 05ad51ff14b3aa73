"""Target versions: the recipe that keys a version and the manifest that records it."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from foresight.schemas.base import FORMAT_VERSION, StrictModel, canonical_json
from foresight.schemas.model import ModelIdentity
from foresight.schemas.refs import RecipeInputs, Ref, TargetKind

TargetStatus = Literal["building", "complete"]
ArrayCodec = Literal["raw", "bf16", "fp8"]
"""ArraySpec.codec: how an array's float values are stored (see ArraySpec)."""


def content_id(prefix: str, payload: Any) -> str:
    """``<prefix>-<12 hex>`` where the hex is the sha256 of the canonical JSON of ``payload``."""
    digest = hashlib.sha256(canonical_json(payload).encode()).hexdigest()
    return f"{prefix}-{digest[:12]}"


class ArraySpec(StrictModel):
    """One array of a target version; the first dimension is the clip index."""

    name: str
    shape: list[int]
    dtype: str
    compression: Literal["zstd", "none"] = Field(
        default="zstd", description="Codec of the stored chunks. 'none' suits float features that zstd barely "
                                    "shrinks (teacher tokens: 0.81-0.92 of raw) when writing, not disk space, is "
                                    "the limit. Storage only: it never enters the version id.")
    codec: ArrayCodec = Field(
        default="raw", description="How float values are stored: 'raw' as ``dtype``; 'bf16' as uint16 bfloat16 bit "
                                   "patterns (half the bytes of float32); 'fp8' as uint8 companded e4m3 codes with "
                                   "uint8 E8M0 scales per clip and channel (last axis) in the companion array "
                                   "'<name>.fp8scale' (pipelines/float_codecs.py: codecs and error bounds). Readers "
                                   "decode to ``dtype``. It changes the values a reader gets, so a stage that offers "
                                   "it keys it in its recipe (a coded version has its own id).")

    @model_serializer(mode="wrap")
    def _omit_raw_codec(self, handler: Any) -> dict[str, Any]:
        """Manifests of raw arrays keep the bytes they had before ``codec`` existed."""
        data = handler(self)
        if self.codec == "raw":
            data.pop("codec", None)
        return data

    @model_validator(mode="after")
    def _codec_fits(self) -> "ArraySpec":
        if self.codec != "raw" and not self.dtype.startswith(("float", "bfloat")):
            raise ValueError(f"array '{self.name}': codec '{self.codec}' stores float values, dtype is {self.dtype}")
        if self.codec == "fp8" and len(self.shape) < 2:
            raise ValueError(f"array '{self.name}': codec 'fp8' needs a channel axis (shape {self.shape})")
        return self


class TargetRecipe(StrictModel):
    """Everything that determines a version's content; hashing it gives the version id."""

    kind: TargetKind
    stage: str = Field(description="Stage name, e.g. 'svd.generate'.")
    stage_version: int = Field(description="Bumped by hand when the stage's algorithm changes.")
    model: ModelIdentity | None = Field(default=None, description="The model that made it, if any.")
    params: dict[str, Any] = Field(default_factory=dict, description="Every output-changing parameter.")
    inputs: RecipeInputs = Field(default_factory=dict, description="Input key -> typed reference (the plan, "
                                 "upstream versions, a dataset fingerprint); stored and hashed as bare ids.")

    def version_id(self) -> str:
        """Content address of this recipe (see docs/ARCHITECTURE.md, Version rules)."""
        return content_id(self.kind, self.key())

    def input_ids(self) -> dict[str, str]:
        """Input key -> bare id: the stored and hashed form of the inputs."""
        return {key: ref.id for key, ref in self.inputs.items()}

    def inputs_of(self, kind: str) -> list[Ref]:
        """The inputs of one reference kind ('plan', 'version', ...), in key order."""
        return [ref for _, ref in sorted(self.inputs.items()) if ref.kind == kind]

    def key(self) -> dict[str, Any]:
        """The hashed payload: the git commit and local paths are recorded but never keyed."""
        return {
            "kind": self.kind,
            "stage": self.stage,
            "stage_version": self.stage_version,
            "model": self.model.key() if self.model else None,
            "params": self.params,
            "inputs": self.input_ids(),
        }


class ShardTableFile(StrictModel):
    """manifest.json's record of the shard table of a complete version: the checksums of every
    stored shard object as columns in one ``.npy`` file beside it (storage/targets.py SHARD_SUM
    rows, one row per shard and one column per stored part), instead of per-shard JSON objects
    (~1.6 KB a shard for pi0: 100 MB of manifest, and its objects in every reader, at 10^6 clips)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$",
                      description="File name in the version folder (shards.npy).")
    parts: list[str] = Field(description="Stored part names, the table's column order.")
    rows: int = Field(description="Shards in the table (= num_shards).")
    bytes: int = Field(description="Size of the file.")
    sha256: str = Field(description="sha256 of the file, checked whenever it is read.")
    row_dtype: str = Field(description="numpy dtype of one cell (SHARD_SUM), as str(dtype.descr).")


class TargetVersion(StrictModel):
    """manifest.json of a target version."""

    format_version: int = Field(default=FORMAT_VERSION)
    id: str
    recipe: TargetRecipe
    status: TargetStatus = "building"
    arrays: list[ArraySpec]
    num_clips: int
    shard_size: int = Field(description="Clips per zarr shard (and per writer task).")
    shards: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="shard index -> array name -> sha256 of the stored shard object."
    )
    shard_xxh3: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="shard index -> array name -> xxh3-128 of the stored shard object: "
                                          "what readers check while reading (sha256 stays for the audit).")
    shard_table: ShardTableFile | None = Field(
        default=None, description="The shard table holding every shard's checksums (complete versions "
                                  "finalized since it exists; ``shards`` and ``shard_xxh3`` are then empty). "
                                  "None: the checksums are in ``shards`` / ``shard_xxh3`` (older versions) or "
                                  "the version is building.")
    verified_inputs: bool = Field(
        default=True, description="False when the stage that made it read its input versions with --no-verify.")
    created: str = ""
    completed: str | None = None
    git_commit: str | None = None
    host: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    content_sha256: str | None = Field(default=None, description="sha256 of this manifest's canonical JSON "
                                       "without this key (storage.fs.content_digest), written with it: an edit "
                                       "anywhere is refused on open. None in versions written before it.")

    @model_serializer(mode="wrap")
    def _omit_absent_table(self, handler: Any) -> dict[str, Any]:
        """Manifests without a shard table (or a content digest) keep the bytes they had before those existed."""
        data = handler(self)
        for key in ("shard_table", "content_sha256"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data

    @property
    def kind(self) -> str:
        return self.recipe.kind

    @property
    def num_shards(self) -> int:
        return (self.num_clips + self.shard_size - 1) // self.shard_size

    def array_spec(self, name: str) -> ArraySpec:
        """The spec of array ``name``; ValueError naming the version when absent."""
        for spec in self.arrays:
            if spec.name == name:
                return spec
        raise ValueError(f"target version {self.id}: no array '{name}' (has {[a.name for a in self.arrays]})")
