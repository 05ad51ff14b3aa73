"""Train one S-VAM decoupler per teacher: one-step SVD features -> that teacher's maps (MSE).

Reads an export's ``onestep``, ``<teacher>.target`` and ``<teacher>.reference`` fields. The held-out
evaluation reports, per teacher, the cosine similarity over channels of every predicted token to the
teacher's token and the relative L2 error ||pred - target|| / ||target|| per clip.

``arch = "release"`` (default) is the released decoupler (no positional embeddings; ``--init`` may
start it from a released checkpoint); ``arch = "foresight"`` adds foresight's learned space and
time embeddings.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel, validate
from foresight.storage.fs import Root
from foresight.storage.runs import CheckpointInfo, RunDir, RunSpec, default_run_id
from foresight.trainers.config import DataConfig, LoopConfig, OptimConfig
from foresight.trainers.distributed import seed_everything
from foresight.trainers.exports import collate_fields, open_export
from foresight.trainers.loop import FitResult, fit
from foresight.trainers.models.decoupler import Decoupler, DecouplerArchName, DecouplerConfig, ModelSize
from foresight.trainers.release_checkpoints import load_strict, read_state_dict
from foresight.trainers.task import TrainTask

log = logging.getLogger(__name__)

ONESTEP = "onestep"
KIND = "decoupler"


class DecouplerArch(StrictModel):
    """Overrides of the decoupler preset (unset fields keep the preset's value)."""

    hidden: int | None = Field(None, description="Transformer width (preset: 1024 full, 32 tiny).")
    depth: int | None = Field(None, description="Spatial+temporal block pairs (preset: 4 full, 1 tiny).")
    heads: int | None = Field(None, description="Attention heads (preset: 8 full, 2 tiny).")
    mlp_ratio: int | None = Field(None, description="MLP width multiple (preset: 4 full, 2 tiny).")
    dropout: float | None = Field(None, description="Dropout (preset 0.1).")
    use_reference: bool | None = Field(None, description="Add the reference-map anchor (preset: true).")


class DecouplerRunConfig(StrictModel):
    """Everything that defines a decoupler run (``--config run.toml`` holds any subset of it)."""

    preset: str | None = Field(None, description="Preset the settings came from (schemas.presets), recorded.")
    arch: DecouplerArchName = Field("release", description="release (no positional embeddings) or foresight "
                                                           "(learned space and time embeddings).")
    init: str | None = Field(None, description="Start from a released decoupler checkpoint (dir:/hf:, keys "
                                               "'base_model.*' and 'adapter.*').")
    teacher: str = Field("dinov2", description="Teacher name: fields '<teacher>.target' / '<teacher>.reference'.")
    size: ModelSize = Field("full", description="Architecture preset: 'full' (reference, ~106M for DINOv2) or 'tiny'.")
    model: DecouplerArch = Field(default_factory=DecouplerArch, description="Architecture overrides.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
    loop: LoopConfig = Field(default_factory=LoopConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(fp8_on_device=True),
                             description="Export reading; fp8 codes are decoded on the device.")

    def fields(self) -> list[str]:
        """Export fields this run reads."""
        return [ONESTEP, f"{self.teacher}.target", f"{self.teacher}.reference"]


def build_decoupler_config(cfg: DecouplerRunConfig, onestep_shape: list[int], teacher_shape: list[int]) -> DecouplerConfig:
    """The architecture for per-clip shapes onestep (T, h, w, C_in) and target (T, h, w, C_teacher)."""
    frames, height, width, channels = onestep_shape
    if list(teacher_shape[:3]) != [frames, height, width]:
        raise ValueError(
            f"teacher '{cfg.teacher}': target maps of shape {teacher_shape} do not match the one-step "
            f"features' (T, h, w) = {(frames, height, width)}"
        )
    preset = DecouplerConfig.preset(cfg.size, in_channels=channels, teacher_channels=teacher_shape[3],
                                    frames=frames, height=height, width=width,
                                    position_embeddings=cfg.arch == "foresight")
    overrides = {k: v for k, v in cfg.model.model_dump().items() if v is not None}
    return DecouplerConfig.model_validate(preset.model_dump() | overrides)


def map_metrics(pred_BTHWC: torch.Tensor, target_BTHWC: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-clip mean token cosine similarity, relative L2 and MSE, each of shape (B,)."""
    pred, target = pred_BTHWC.float().flatten(1, -2), target_BTHWC.float().flatten(1, -2)
    cosine_B = F.cosine_similarity(pred, target, dim=-1, eps=1e-8).mean(1)
    rel_l2_B = (pred - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp_min(1e-8)
    mse_B = ((pred - target) ** 2).flatten(1).mean(1)
    return {"cosine": cosine_B, "rel_l2": rel_l2_B, "mse": mse_B}


class DecouplerTask(TrainTask):
    """Batch {onestep, target, reference} -> MSE of the decoupler's prediction to the teacher target."""

    def __init__(self, model: Decoupler, teacher: str):
        self.model, self.teacher = model, teacher
        self.target_field, self.reference_field = f"{teacher}.target", f"{teacher}.reference"

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack the three fields; they stay float16 (or fp8 codes) on the host: fewer bytes to move."""
        return self.collate_fn()(samples)

    def collate_fn(self):
        fields = {"onestep": ONESTEP, "target": self.target_field, "reference": self.reference_field}
        return functools.partial(collate_fields, fields=fields)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = model(batch["onestep"], batch["reference"])
        return F.mse_loss(pred.float(), batch["target"].float())

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        for batch in batches:
            pred = model(batch["onestep"], batch["reference"])
            for name, values in map_metrics(pred, batch["target"]).items():
                sums[name] = sums.get(name, 0.0) + float(values.sum())
            count += pred.shape[0]
        if count == 0:
            raise ValueError(f"decoupler '{self.teacher}': the held-out stream gave no samples")
        return {f"{self.teacher}/{name}": total / count for name, total in sums.items()}


def run_config_record(cfg: DecouplerRunConfig, arch: DecouplerConfig,
                      init: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved config stored with every checkpoint: the run config, the built architecture, the init."""
    return {"run": cfg.model_dump(mode="json"), "preset": cfg.preset, "architecture": arch.model_dump(mode="json"),
            "init": init}


def init_from_release(model: Decoupler, spec: str) -> dict[str, str]:
    """Load a released decoupler checkpoint into ``model`` (strictly); its provenance (spec, file, sha256)."""
    state, provenance = read_state_dict(spec)
    load_strict(model, state, spec)
    return provenance


def load_decoupler(root: Root, run_id: str, step: int | None = None) -> tuple[Decoupler, CheckpointInfo]:
    """A trained decoupler (eval mode) and its checkpoint record, from ``runs/<run_id>/step-N``."""
    info, state = RunDir(root, run_id).load_model(step)
    if info.kind != KIND:
        raise ValueError(f"run {run_id}: is a '{info.kind}' run, not a decoupler run")
    arch = validate(DecouplerConfig, info.config["architecture"], f"run {run_id} {info.step}: architecture")
    model = Decoupler(arch)
    model.load_state_dict(state)
    return model.eval(), info


def teacher_of(info: CheckpointInfo) -> str:
    """The teacher name a decoupler run was trained for."""
    return str(info.config["run"]["teacher"])


def train_decoupler(root: Root, export_id: str, cfg: DecouplerRunConfig, run_id: str | None = None,
                    eval_export: str | None = None, allow_version_change: bool = False,
                    stop_at: int | None = None) -> FitResult:
    """Train (or resume) the decoupler of ``cfg.teacher`` on an export; evaluate on ``eval_export``."""
    fields = cfg.fields()
    stream, versions = open_export(root, export_id, fields, cfg.data, cfg.loop.seed)
    specs = stream.index.fields
    arch = build_decoupler_config(cfg, specs[ONESTEP].shape, specs[f"{cfg.teacher}.target"].shape)
    eval_stream = None
    if eval_export:
        eval_stream, _ = open_export(root, eval_export, fields, cfg.data, cfg.loop.seed, pins=versions, shuffle=False)
    seed_everything(cfg.loop.seed)
    model = Decoupler(arch)
    init = init_from_release(model, cfg.init) if cfg.init else None
    task = DecouplerTask(model, cfg.teacher)
    config = run_config_record(cfg, arch, init)
    identity = {"export": export_id, "teacher": cfg.teacher, "arch": config["architecture"],
                "optim": config["run"]["optim"], "seed": cfg.loop.seed, "batch": cfg.loop.batch_size, "init": init}
    spec = RunSpec(root, run_id or default_run_id(KIND, identity), KIND, export_id, versions, config,
                   extra={"eval_export": eval_export})
    log.info("decoupler '%s': %d parameters, run %s", cfg.teacher, sum(p.numel() for p in task.model.parameters()),
             spec.run_id)
    return fit(task, stream, spec, cfg.loop, cfg.optim, eval_stream, allow_version_change, stop_at)


@torch.no_grad()
def predict_maps(model: Decoupler, sample: dict[str, Any], teacher: str, device: torch.device) -> np.ndarray:
    """The decoupler's (T, h, w, C_teacher) prediction for one sample dict, float32."""
    model.to(device).eval()
    onestep = torch.from_numpy(np.asarray(sample[ONESTEP]))[None].to(device)
    reference = torch.from_numpy(np.asarray(sample[f"{teacher}.reference"]))[None].to(device)
    return model(onestep, reference)[0].float().cpu().numpy()


def sample_map_metrics(pred_THWC: np.ndarray, target_THWC: np.ndarray) -> dict[str, float]:
    """Cosine, relative L2 and MSE of one predicted map to its teacher target."""
    metrics = map_metrics(torch.from_numpy(pred_THWC)[None], torch.from_numpy(np.asarray(target_THWC))[None])
    return {name: float(value[0]) for name, value in metrics.items()}
