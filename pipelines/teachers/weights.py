"""Resolving a model spec to a local checkpoint folder, and recording what was loaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from foresight.schemas.model import ModelIdentity, ModelSpec
from foresight.storage.fs import sha256_local_files

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_dir(spec: ModelSpec, family: str) -> Path:
    """Local folder of an ``hf:`` or ``dir:`` spec.

    ``hf:`` goes through the hub cache (``HF_HUB_OFFLINE=1`` makes it cache-only); only configs
    and safetensors are fetched, falling back to ``*.bin`` when a repo has no safetensors.
    """
    if spec.source == "dir":
        folder = Path(spec.ref).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{family} teacher: model folder {spec.ref!r} (dir:) does not exist")
        return folder
    if spec.source != "hf":
        raise ValueError(f"{family} teacher: spec {spec} has no checkpoint folder")
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(spec.ref, revision=spec.revision,
                                    allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(spec.ref, revision=spec.revision, allow_patterns=["*.json", "*.bin"]))
    return folder


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every weight file under ``folder``, by relative path; ValueError when there is none."""
    digests = sha256_local_files(folder, WEIGHT_SUFFIXES)
    if not digests:
        raise ValueError(f"model folder {folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return digests


def real_identity(spec: ModelSpec, family: str, folder: Path) -> ModelIdentity:
    """Identity of weights loaded from a folder: its weight digests key the version, not its path."""
    revision = spec.revision
    if spec.source == "hf" and revision is None:
        revision = folder.name  # hub snapshots are named by commit hash
    return ModelIdentity(spec=str(spec), family=family, source=spec.source, ref=spec.ref, revision=revision,
                         weights_sha256=weights_sha256(folder))


def random_identity(spec: ModelSpec, family: str, seed: int, config: dict[str, Any]) -> ModelIdentity:
    """Identity of randomly initialised weights: the seed and the architecture config."""
    return ModelIdentity(spec=str(spec), family=family, source=spec.source, seed=seed, config=config)


def load_state_dict_files(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors (or, failing that, torch) weight files of a folder."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        tensors.update(load_file(str(path)))
    if not files:
        for path in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")):
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    if not tensors:
        raise ValueError(f"model folder {folder}: no weights found (*.safetensors, *.bin, *.pt, *.pth)")
    return tensors
