"""Model specs (how a user names weights) and model identities (what a manifest records)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from foresight.schemas.base import StrictModel

ModelSource = Literal["hf", "dir", "random", "tiny", "null"]
GENERATED_SOURCES = ("random", "tiny", "null")
"""Sources that name no weights: a seeded initialisation, or ``null`` (no model at all: correctly
shaped, deterministic arrays at memory speed, for simulating the orchestration at scale)."""


class ModelSpec(StrictModel):
    """A parsed model spec string: ``hf:<repo>[@rev]``, ``dir:<path>``, ``random``, ``tiny`` or ``null``."""

    source: ModelSource = Field(description="Where the weights come from.")
    ref: str | None = Field(default=None, description="Hub repo id (hf) or local folder (dir).")
    revision: str | None = Field(default=None, description="Hub revision (hf only).")

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """Parse a spec string; raise ValueError naming the spec when it is malformed."""
        text = text.strip()
        if text in GENERATED_SOURCES:
            return cls(source=text)
        kind, sep, rest = text.partition(":")
        if not sep or kind not in ("hf", "dir") or not rest:
            raise ValueError(
                f"model spec {text!r}: expected 'hf:<repo>[@revision]', 'dir:<path>', 'random', 'tiny' or 'null'"
            )
        if kind == "hf":
            repo, _, revision = rest.partition("@")
            return cls(source="hf", ref=repo, revision=revision or None)
        return cls(source="dir", ref=rest)

    def __str__(self) -> str:
        if self.source in GENERATED_SOURCES:
            return self.source
        if self.source == "hf" and self.revision:
            return f"hf:{self.ref}@{self.revision}"
        return f"{self.source}:{self.ref}"


class ModelIdentity(StrictModel):
    """What made a target: enough to tell real weights from random ones and to key a version."""

    spec: str = Field(description="The spec string as given by the user.")
    family: str = Field(description="Model family, e.g. 'svd', 'dinov2', 'da3', 'clip-text', 'pi0'.")
    source: ModelSource = Field(description="hf, dir, random, tiny or null (no model: simulation only).")
    ref: str | None = Field(default=None, description="Hub repo id or local folder.")
    revision: str | None = Field(default=None, description="Hub revision, when known.")
    weights_sha256: dict[str, str] | None = Field(
        default=None, description="sha256 of every weight file, by relative path (real weights only)."
    )
    seed: int | None = Field(default=None, description="Seed of random/tiny initialisation.")
    config: dict[str, Any] | None = Field(default=None, description="Architecture config (random/tiny).")

    @property
    def is_real(self) -> bool:
        """True when the weights were loaded from a checkpoint rather than initialised randomly."""
        return self.source in ("hf", "dir")

    @property
    def is_null(self) -> bool:
        """True for the simulation model: its arrays are placeholders, never targets to train on."""
        return self.source == "null"

    def key(self) -> dict[str, Any]:
        """The identifying part used in version ids: a local path is not identity, the digest is."""
        if self.is_real:
            return {"family": self.family, "weights_sha256": self.weights_sha256, "revision": self.revision,
                    "ref": self.ref if self.source == "hf" else None}
        return {"family": self.family, "source": self.source, "seed": self.seed, "config": self.config}
