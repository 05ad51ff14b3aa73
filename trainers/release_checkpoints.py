"""Released S-VAM checkpoints (``dir:`` / ``hf:`` specs) loaded into foresight's modules.

A decoupler checkpoint holds the ``HiddenTo*ModelWithRef`` state dict (``base_model.*``,
``adapter.*``); a policy checkpoint holds, among others, the aggregator under ``Video_Former.`` and
the ``GCDenoiser`` under ``model.``. Either may be a safetensors file or a torch pickle
(``.pt``/``.ckpt``/``.bin``, read with ``weights_only=True``; a Lightning ``state_dict`` or a
``model_state_dict`` entry is unwrapped). The architecture is read off the tensors' shapes; only
the attention head counts (and the decoupler's frames and grid, which no tensor fixes) are given.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from foresight.pipelines.svd.loading import resolve_folder
from foresight.schemas.model import ModelSpec
from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
from foresight.trainers.models.denoiser import DenoiserConfig, GCDenoiser
from foresight.trainers.models.video_former import VideoFormer3D, VideoFormerConfig

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
FORMER_PREFIX, DENOISER_PREFIX = "Video_Former.", "model."
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def checkpoint_file(spec: str) -> Path:
    """The one weight file of a ``dir:``/``hf:`` spec (a ``dir:`` may also name the file itself)."""
    parsed = ModelSpec.parse(spec)
    if parsed.source == "dir" and Path(parsed.ref).expanduser().is_file():
        return Path(parsed.ref).expanduser()
    folder = resolve_folder(parsed, allow_patterns=["*.json", "*.yaml", *(f"*{s}" for s in WEIGHT_SUFFIXES)])
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(files) != 1:
        names = [str(p.relative_to(folder)) for p in files] or "none"
        raise ValueError(f"checkpoint {spec}: expected one weight file ({', '.join(WEIGHT_SUFFIXES)}) in "
                         f"{folder}, found {names}; name the file with dir:<path/to/file>")
    return files[0]


def read_state_dict(spec: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(float32 state dict, provenance {spec, file, sha256}) of a released checkpoint spec."""
    path = checkpoint_file(spec)
    if path.suffix == ".safetensors":
        state: Any = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in WRAPPER_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"checkpoint {spec}: {path.name} holds no tensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return tensors, {"spec": spec, "file": path.name, "sha256": digest}


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return len(indices)


def decoupler_config(state: dict[str, torch.Tensor], heads: int, frames: int, height: int, width: int,
                     dropout: float = 0.1) -> DecouplerConfig:
    """The architecture of a released decoupler state dict (sizes from the tensors)."""
    proj = state["base_model.input_proj.weight"]
    mlp = state["base_model.blocks.0.spatial_mlp.0.weight"]
    return DecouplerConfig(
        in_channels=proj.shape[1], hidden=proj.shape[0], teacher_channels=state["base_model.output_proj.weight"].shape[0],
        depth=_count_blocks(state, "base_model.blocks."), heads=heads, mlp_ratio=mlp.shape[0] // proj.shape[0],
        frames=frames, height=height, width=width, dropout=dropout, use_reference="adapter.weight" in state,
        position_embeddings="base_model.pos_space" in state)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)``, as a one-line ValueError naming the checkpoint."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        problem = " ".join(str(err).split())[:400]
        raise ValueError(f"checkpoint {where}: does not match the module ({problem})") from None


def load_release_decoupler(spec: str, heads: int, frames: int, height: int, width: int) -> tuple[Decoupler, dict]:
    """A released decoupler checkpoint as a foresight ``Decoupler`` (eval mode) and its provenance."""
    state, provenance = read_state_dict(spec)
    if "base_model.input_proj.weight" not in state:
        raise ValueError(f"checkpoint {spec}: not a decoupler (no base_model.input_proj.weight)")
    model = Decoupler(decoupler_config(state, heads, frames, height, width))
    load_strict(model, state, spec)
    return model.eval(), provenance


def policy_parts(state: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """(aggregator state, denoiser state) of a policy checkpoint, prefixes stripped; others are skipped."""
    former = {k[len(FORMER_PREFIX):]: v for k, v in state.items() if k.startswith(FORMER_PREFIX)}
    denoiser = {k[len(DENOISER_PREFIX):]: v for k, v in state.items() if k.startswith(DENOISER_PREFIX)}
    if not former or not denoiser:
        raise ValueError(f"checkpoint {where}: a policy checkpoint needs '{FORMER_PREFIX}*' and "
                         f"'{DENOISER_PREFIX}*' keys (found {len(former)} and {len(denoiser)})")
    others = Counter(k.split(".")[0] for k in state if not k.startswith((FORMER_PREFIX, DENOISER_PREFIX)))
    if others:
        log.warning("checkpoint %s: skipping keys outside the aggregator and denoiser: %s", where, dict(others))
    return former, denoiser


def former_config(state: dict[str, torch.Tensor], heads: int) -> VideoFormerConfig:
    """The architecture of a released ``Video_Former_3D`` state dict."""
    frames, queries, dim = state["latents"].shape
    inner = state["layers.0.0.to_q.weight"].shape[0]
    if inner % heads:
        raise ValueError(f"Video_Former: perceiver width {inner} is not divisible by {heads} heads")
    return VideoFormerConfig(in_channels=state["goal_emb.0.weight"].shape[1], dim=dim, frames=frames,
                             queries_per_frame=queries, depth=_count_blocks(state, "layers."), heads=heads,
                             dim_head=inner // heads, ff_mult=state["layers.0.2.1.weight"].shape[0] // dim)


def denoiser_config(state: dict[str, torch.Tensor], heads: int, cond_tokens: int, **options: Any) -> DenoiserConfig:
    """The architecture of a released ``GCDenoiser`` state dict (``inner_model.*``)."""
    def shape(name: str) -> torch.Size:
        return state[f"inner_model.{name}"].shape

    embed, action_dim = shape("action_emb.weight")[0], shape("action_emb.weight")[1]
    seq = shape("pos_emb")[1]
    return DenoiserConfig(action_dim=action_dim, chunk=seq - 1 - cond_tokens, obs_dim=shape("tok_emb.weight")[1],
                          cond_tokens=cond_tokens, goal_dim=shape("lang_emb.0.weight")[1],
                          proprio_dim=shape("proprio_emb.0.weight")[1], embed_dim=embed,
                          n_enc_layers=_count_blocks(state, "inner_model.encoder.blocks."),
                          n_dec_layers=_count_blocks(state, "inner_model.decoder.blocks."), n_heads=heads, **options)


def load_release_policy(spec: str, former_heads: int = 8, denoiser_heads: int = 8
                        ) -> tuple[VideoFormer3D, GCDenoiser, dict]:
    """The aggregator and denoiser of a released policy checkpoint (eval mode) and its provenance."""
    state, provenance = read_state_dict(spec)
    former_state, denoiser_state = policy_parts(state, spec)
    former = VideoFormer3D(former_config(former_state, former_heads))
    load_strict(former, former_state, f"{spec} ({FORMER_PREFIX}*)")
    denoiser = GCDenoiser(denoiser_config(denoiser_state, denoiser_heads, former.cfg.num_latents))
    load_strict(denoiser, denoiser_state, f"{spec} ({DENOISER_PREFIX}*)")
    return former.eval(), denoiser.eval(), provenance
