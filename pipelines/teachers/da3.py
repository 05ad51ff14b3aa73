"""Depth Anything 3 teacher: the any-view backbone over all T frames of a clip at once.

S-VAM's geometric target is stage 0 of DA3-LARGE (block 11), local tokens concatenated with the
normalised global tokens: (T, 16, 16, 2048) at 224x224.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from pydantic import Field

from foresight.pipelines.teachers.base import Teacher
from foresight.pipelines.teachers.da3_model import DA3ArchConfig, DA3Backbone, RefStrategy
from foresight.pipelines.teachers.preprocess import PreprocessSettings
from foresight.pipelines.teachers.weights import (checkpoint_dir, load_state_dict_files, random_identity,
                                        real_identity)
from foresight.schemas.base import StrictModel, validate
from foresight.schemas.model import ModelIdentity, ModelSpec

log = logging.getLogger(__name__)

# Official checkpoints keep the backbone at ``model.backbone.pretrained.``; a bare DinoV2 module's
# state dict (the fixture) at ``pretrained.``; our own saves use no prefix.
STATE_PREFIXES = ("model.backbone.pretrained.", "pretrained.", "")
CONFIG_FILE = "config.json"
SEED = 0


def _preset(embed_dim: int, depth: int, num_heads: int, out_layers: list[int], alt_start: int) -> DA3ArchConfig:
    return DA3ArchConfig(embed_dim=embed_dim, depth=depth, num_heads=num_heads, out_layers=out_layers,
                         alt_start=alt_start, qknorm_start=alt_start, rope_start=alt_start)


# ``net`` sections of the official presets that use the plain MLP (ViT-g uses SwiGLU: unsupported).
PRESETS: dict[str, DA3ArchConfig] = {
    "da3-small": _preset(384, 12, 6, [5, 7, 9, 11], 4),
    "da3-base": _preset(768, 12, 12, [5, 7, 9, 11], 4),
    "da3-large": _preset(1024, 24, 16, [11, 15, 19, 23], 8),
    "tiny": _preset(32, 8, 2, [3, 4, 5, 7], 2),
}


class DA3Settings(StrictModel):
    """Which DA3 output becomes the target."""

    stage: int = Field(default=0, ge=0, description="Index into the backbone's out_layers (S-VAM: 0).")
    layer: int | None = Field(default=None, ge=0, description="Block index; overrides `stage` when set.")
    cat_token: bool = Field(default=True, description="Concatenate raw local tokens with normalised global "
                                                      "tokens (2C channels); False gives normalised C channels.")
    ref_strategy: RefStrategy = Field(default="saddle_balanced", description="Reference-view selection (>= 3 views).")
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings,
                                           description="Resize/normalisation of the frames.")


class LoadReport(StrictModel):
    """How a checkpoint mapped onto the backbone."""

    prefix: str
    loaded: int
    ignored: int = Field(description="Keys outside the backbone prefix (heads of a full checkpoint).")


def load_backbone_state(model: DA3Backbone, state: dict[str, torch.Tensor], where: str) -> LoadReport:
    """Load official-named tensors into ``model``; ValueError naming missing/unexpected/misshaped keys."""
    expected = model.state_dict()
    prefix = max(STATE_PREFIXES, key=lambda p: sum(k[len(p):] in expected for k in state if k.startswith(p)))
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix == "":
        ours = {k: v for k, v in ours.items() if not k.startswith(STATE_PREFIXES[:2])}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    misshaped = [f"{k} {tuple(ours[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in ours and ours[k].shape != v.shape]
    problems = ([f"missing keys {[prefix + k for k in missing]}"] if missing else []) + \
               ([f"unexpected keys {[prefix + k for k in unexpected]}"] if unexpected else []) + \
               ([f"shape mismatch {misshaped}"] if misshaped else [])
    if problems:
        raise ValueError(f"da3 checkpoint {where}: " + "; ".join(problems))
    model.load_state_dict(ours, strict=True)
    return LoadReport(prefix=prefix, loaded=len(ours), ignored=len(state) - len(ours))


def infer_arch(state: dict[str, torch.Tensor], where: str, out_layers: list[int] | None = None) -> DA3ArchConfig:
    """Architecture from tensor shapes (width, depth, heads from the q-norm size, alt_start from
    the first q-norm block); out_layers from the matching official preset unless given."""
    prefix = next((p for p in STATE_PREFIXES if f"{p}cls_token" in state), None)
    if prefix is None:
        raise ValueError(f"da3 checkpoint {where}: no 'cls_token' under any of the prefixes {list(STATE_PREFIXES)}")
    embed_dim = state[f"{prefix}cls_token"].shape[-1]
    blocks = {int(k[len(prefix) + 7:].split(".")[0]) for k in state if k.startswith(f"{prefix}blocks.")}
    qk_blocks = sorted(i for i in blocks if f"{prefix}blocks.{i}.attn.q_norm.weight" in state)
    if not qk_blocks:
        raise ValueError(f"da3 checkpoint {where}: no q_norm tensors; add a config.json with 'da3_arch'")
    head_dim = state[f"{prefix}blocks.{qk_blocks[0]}.attn.q_norm.weight"].shape[0]
    hidden = state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]
    grid = round((state[f"{prefix}pos_embed"].shape[1] - 1) ** 0.5)
    patch = state[f"{prefix}patch_embed.proj.weight"].shape[-1]
    depth = max(blocks) + 1
    if out_layers is None:
        match = [p for p in PRESETS.values() if (p.embed_dim, p.depth) == (embed_dim, depth)]
        out_layers = match[0].out_layers if match else [depth - 1]
    return DA3ArchConfig(embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
                         mlp_ratio=hidden / embed_dim, patch_size=patch, img_size=grid * patch,
                         out_layers=out_layers, alt_start=qk_blocks[0], qknorm_start=qk_blocks[0],
                         rope_start=qk_blocks[0])


def _config_arch(folder: Path, state: dict[str, torch.Tensor]) -> DA3ArchConfig:
    """Architecture of a checkpoint folder: our ``da3_arch`` config, an official ``model_name``
    preset, or (no config) inferred from the tensors."""
    where = str(folder)
    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).exists() else {}
    if "da3_arch" in config:
        return validate(DA3ArchConfig, config["da3_arch"], f"{folder / CONFIG_FILE} da3_arch")
    name = config.get("model_name")
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"da3 checkpoint {where}: model_name {name!r} is not supported "
                             f"(supported: {sorted(k for k in PRESETS if k != 'tiny')})")
        return PRESETS[name]
    return infer_arch(state, where)


def save_checkpoint(backbone: DA3Backbone, folder: Path, prefix: str = "pretrained.") -> None:
    """Write a backbone as ``model.safetensors`` (official naming) + ``config.json`` (da3_arch)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / CONFIG_FILE).write_text(json.dumps({"da3_arch": backbone.cfg.model_dump(mode="json")}, indent=1))


def load_backbone(spec: ModelSpec) -> tuple[DA3Backbone, ModelIdentity]:
    """Backbone + identity for a spec: ``tiny`` (fixture-sized), ``random`` (DA3-LARGE), hf/dir."""
    if spec.source in ("tiny", "random"):
        arch = PRESETS["tiny" if spec.source == "tiny" else "da3-large"]
        backbone = DA3Backbone(arch)
        backbone.init_random(SEED)
        return backbone, random_identity(spec, "da3", SEED, arch.model_dump(mode="json"))
    folder = checkpoint_dir(spec, "da3")
    state = load_state_dict_files(folder)
    backbone = DA3Backbone(_config_arch(folder, state))
    report = load_backbone_state(backbone, state, str(folder))
    log.info("da3: loaded %d tensors from %s (prefix %r, %d outside the backbone ignored)",
             report.loaded, folder, report.prefix, report.ignored)
    return backbone, real_identity(spec, "da3", folder)


class DA3Teacher(Teacher):
    """DA3 tokens of one block: (B, T, h, w, 2C) with cat_token, else (B, T, h, w, C)."""

    family = "da3"

    def __init__(self, backbone: DA3Backbone, identity: ModelIdentity, settings: DA3Settings,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        arch = backbone.cfg
        if settings.layer is None and settings.stage >= len(arch.out_layers):
            raise ValueError(f"da3 teacher: stage {settings.stage} but the backbone has out_layers {arch.out_layers}")
        self.layer = settings.layer if settings.layer is not None else arch.out_layers[settings.stage]
        if self.layer >= arch.depth:
            raise ValueError(f"da3 teacher: layer {self.layer} but the backbone has {arch.depth} blocks")
        pre = settings.preprocess
        if pre.height % arch.patch_size or pre.width % arch.patch_size:
            raise ValueError(f"da3 teacher: input {pre.height}x{pre.width} is not a multiple of patch {arch.patch_size}")
        grid = (pre.height // arch.patch_size, pre.width // arch.patch_size)
        channels = arch.embed_dim * (2 if settings.cat_token else 1)
        super().__init__(backbone, identity, settings, pre, grid, channels, device, dtype)

    def params(self) -> dict:
        return {**super().params(), "layer": self.layer}

    def encode_pixels(self, pixels_BTCHW: torch.Tensor) -> torch.Tensor:
        (tokens_BTNC, _), = self.module.intermediate_layers(pixels_BTCHW, [self.layer], self.settings.cat_token,
                                                          self.settings.ref_strategy)
        B, T = pixels_BTCHW.shape[:2]
        return tokens_BTNC.reshape(B, T, *self.grid, self.channels)


def load_da3(spec: ModelSpec, settings: DA3Settings, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> DA3Teacher:
    """A ready DA3 teacher for a spec."""
    backbone, identity = load_backbone(spec)
    return DA3Teacher(backbone, identity, settings, device, dtype)
