"""Train the S-VAM action expert: aggregator + diffusion policy over frozen decouplers' predictions.

Per clip the perception input is concat[one-step features | prediction of decoupler 1 | ...] per
token (docs/REFERENCE.md, S-VAM / VPP model settings: one-step 2560 | DINOv2 768 | DA3 2048 = 5376
channels), built on the fly by the frozen decoupler runs named in the config, each fed its teacher's
reference map. The policy is conditioned on those tokens and the clip's text embedding and predicts the
export's action chunk (normalised with the export's action statistics, which are stored with the model). The held-out
evaluation samples chunks with the policy's sampler and reports their MSE to the recorded actions.

``arch`` picks the release's ``Video_Former_3D`` + ``GCDenoiser`` (default; ``--init`` may start it
from a released policy checkpoint) or foresight's Uni-Perceiver + ``DiffusionPolicy``; ``objective``
picks ``release-edm`` (default) or ``edm`` (see ``trainers.models.objectives``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel, validate
from foresight.storage.fs import Root
from foresight.trainers.decoupler import ONESTEP, load_decoupler, teacher_of
from foresight.storage.runs import CheckpointInfo, RunDir, RunSpec, default_run_id
from foresight.trainers.config import DataConfig, LoopConfig, OptimConfig
from foresight.trainers.distributed import seed_everything
from foresight.trainers.exports import collate_fields, open_export
from foresight.trainers.loop import FitResult, fit
from foresight.trainers.models.decoupler import Decoupler, ModelSize
from foresight.trainers.models.denoiser import (ActionPositions, CrossAttnMask, DenoiserConfig, GCDenoiser, Modulation,
                                      Proprio)
from foresight.trainers.models.objectives import ObjectiveConfig, ObjectiveName
from foresight.trainers.models.policy import ActionExpert, AggregatorConfig, DenoiserNetConfig, NormMode, PolicyConfig
from foresight.trainers.models.uniperceiver import UniPerceiverConfig
from foresight.trainers.models.video_former import VideoFormerConfig
from foresight.trainers.prefetch import to_device
from foresight.trainers.release_checkpoints import load_strict, policy_parts, read_state_dict
from foresight.trainers.task import TrainTask

log = logging.getLogger(__name__)
KIND = "action-expert"


ArchName = Literal["release", "foresight"]


class PerceiverArch(StrictModel):
    """Overrides of foresight's Uni-Perceiver preset (``arch = "foresight"``; unset fields keep the preset)."""

    mlp_hidden: int | None = Field(None, description="Input MLP hidden width (preset 768).")
    dim: int | None = Field(None, description="Latent width (preset 384).")
    queries_per_frame: int | None = Field(None, description="Latents per frame (preset 14).")
    depth: int | None = Field(None, description="Layers (preset 6).")
    heads: int | None = Field(None, description="Attention heads (preset 8).")
    mlp_ratio: int | None = Field(None, description="FFN width multiple (preset 4).")
    dropout: float | None = Field(None, description="Dropout (preset 0).")


class PolicyArch(StrictModel):
    """Overrides of foresight's diffusion-policy preset (``arch = "foresight"``)."""

    dim: int | None = Field(None, description="Transformer width (preset 384).")
    heads: int | None = Field(None, description="Attention heads (preset 8).")
    encoder_layers: int | None = Field(None, description="Encoder layers (preset 4).")
    decoder_layers: int | None = Field(None, description="Decoder layers (preset 4).")
    mlp_ratio: int | None = Field(None, description="MLP width multiple (preset 4).")
    dropout: float | None = Field(None, description="Dropout (preset 0.1).")


class FormerArch(StrictModel):
    """Overrides of the release's ``Video_Former_3D`` preset (``arch = "release"``)."""

    dim: int | None = Field(None, description="Latent width (preset 384).")
    queries_per_frame: int | None = Field(None, description="Latents per frame (preset 14).")
    depth: int | None = Field(None, description="Layers (preset 6).")
    heads: int | None = Field(None, description="Attention heads (preset 8).")
    dim_head: int | None = Field(None, description="Perceiver head width (preset 64).")
    dropout: float | None = Field(None, description="Temporal-attention dropout (preset 0).")


class DenoiserArch(StrictModel):
    """Overrides of the release's ``GCDenoiser`` preset (``arch = "release"``), including its quirks."""

    embed_dim: int | None = Field(None, description="Transformer width (preset 384).")
    n_enc_layers: int | None = Field(None, description="Encoder layers (preset 4).")
    n_dec_layers: int | None = Field(None, description="Decoder layers (preset 4).")
    n_heads: int | None = Field(None, description="Attention heads (preset 8).")
    attn_pdrop: float | None = Field(None, description="Attention dropout (preset 0.3).")
    resid_pdrop: float | None = Field(None, description="Residual dropout (preset 0.1).")
    mlp_pdrop: float | None = Field(None, description="MLP dropout (preset 0.05).")
    cross_attn_mask: CrossAttnMask | None = Field(None, description="top-left-causal (release) or none.")
    modulation: Modulation | None = Field(None, description="scale-shift (release) or one-plus-scale.")
    proprio: Proprio | None = Field(None, description="unused (release) or token (the export's 'state' field, "
                                                      "mean/std normalised, as a context token).")
    action_positions: ActionPositions | None = Field(None, description="unused (release) or pos_emb (positions "
                                                                       "of the action tokens).")


class ObjectiveArch(StrictModel):
    """Overrides of the diffusion objective (unset fields keep ``ObjectiveConfig.for_kind(kind)``)."""

    kind: ObjectiveName = Field("release-edm", description="release-edm (the release's) or edm (foresight's).")
    sigma_data: float | None = Field(None, description="EDM sigma_data (0.5).")
    sigma_min: float | None = Field(None, description="release-edm: lower bound of the training sigmas (0.001).")
    sigma_max: float | None = Field(None, description="Upper bound of the training sigmas, first sampler sigma (80).")
    loc: float | None = Field(None, description="release-edm: log-logistic location (ln 0.5).")
    scale: float | None = Field(None, description="release-edm: log-logistic scale (0.5).")
    p_mean: float | None = Field(None, description="edm: lognormal mean of ln(sigma) (-1.2).")
    p_std: float | None = Field(None, description="edm: lognormal std of ln(sigma) (1.2).")
    sample_steps: int | None = Field(None, description="Sampler steps (10).")
    sample_sigma_min: float | None = Field(None, description="Last nonzero sampler sigma (release-edm 1.0, edm 0.002).")
    rho: float | None = Field(None, description="edm: Karras exponent (7).")


class ActionExpertRunConfig(StrictModel):
    """Everything that defines an action-expert run (``--config run.toml`` holds any subset of it)."""

    preset: str | None = Field(None, description="Preset the settings came from (schemas.presets), recorded.")
    arch: ArchName = Field("release", description="release (Video_Former_3D + GCDenoiser) or foresight "
                                                  "(Uni-Perceiver + DiffusionPolicy).")
    decouplers: list[str] = Field(default_factory=list, description="Decoupler run ids, in concat order.")
    size: ModelSize = Field("full", description="Architecture preset: 'full' (reference) or 'tiny'.")
    perceiver: PerceiverArch = Field(default_factory=PerceiverArch, description="Uni-Perceiver overrides (foresight).")
    policy: PolicyArch = Field(default_factory=PolicyArch, description="Diffusion-policy overrides (foresight).")
    former: FormerArch = Field(default_factory=FormerArch, description="Video_Former_3D overrides (release).")
    denoiser: DenoiserArch = Field(default_factory=DenoiserArch, description="GCDenoiser overrides (release).")
    objective: ObjectiveArch = Field(default_factory=ObjectiveArch, description="Diffusion objective.")
    init: str | None = Field(None, description="Start from a released policy checkpoint (dir:/hf:, keys "
                                               "'Video_Former.*' and 'model.*'; arch release).")
    chunk: int | None = Field(None, description="Required action-chunk length of the export (None: any).")
    action_norm: NormMode = Field("quantile", description="Action normalisation from the export's statistics.")
    text_field: str = Field("text", description="Export field holding the instruction embedding.")
    eval_seed: int = Field(0, description="Seed of the sampler noise in held-out evaluation.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(
        lr=3e-4, betas=(0.9, 0.9), weight_decay=0.05, grad_clip=1.0, warmup_steps=1000))
    loop: LoopConfig = Field(default_factory=LoopConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(fp8_on_device=True),
                             description="Export reading; fp8 codes are decoded on the device.")

    def fields(self, teachers: list[str]) -> list[str]:
        """Export fields this run reads (``state`` too when the denoiser reads proprioception)."""
        proprio = ["state"] if self.arch == "release" and self.denoiser.proprio == "token" else []
        return [ONESTEP, self.text_field, "actions", "actions_mask", *(f"{t}.reference" for t in teachers), *proprio]


def _override(preset: StrictModel, overrides: StrictModel) -> dict[str, Any]:
    return preset.model_dump() | _set_fields(overrides)


def _set_fields(overrides: StrictModel) -> dict[str, Any]:
    return {k: v for k, v in overrides.model_dump().items() if v is not None}


def _warn_ignored(cfg: ActionExpertRunConfig) -> None:
    """Overrides of the architecture not in use are ignored: say so."""
    unused = ("perceiver", "policy") if cfg.arch == "release" else ("former", "denoiser")
    for table in unused:
        if _set_fields(getattr(cfg, table)):
            log.warning("action expert: [%s] settings are ignored with arch = %r", table, cfg.arch)


def build_objective(cfg: ActionExpertRunConfig) -> ObjectiveConfig:
    """The resolved objective: the kind's defaults with the run's overrides."""
    overrides = _set_fields(cfg.objective)
    return validate(ObjectiveConfig, ObjectiveConfig.for_kind(overrides.pop("kind")).model_dump() | overrides,
                    "objective")


def build_architecture(cfg: ActionExpertRunConfig, frames: int, token_channels: int, text_dim: int,
                       chunk: int, action_dim: int, proprio_dim: int | None = None
                       ) -> tuple[AggregatorConfig, DenoiserNetConfig]:
    """Aggregator and denoiser configs of ``cfg.arch`` for the data's dimensions."""
    _warn_ignored(cfg)
    if cfg.arch == "release":
        former = validate(VideoFormerConfig, _override(
            VideoFormerConfig.preset(cfg.size, in_channels=token_channels, frames=frames), cfg.former), "former")
        dims = {"proprio_dim": proprio_dim} if proprio_dim else {}
        denoiser_preset = DenoiserConfig.preset(cfg.size, action_dim=action_dim, chunk=chunk, goal_dim=text_dim,
                                                obs_dim=former.dim, cond_tokens=former.num_latents, **dims)
        return former, validate(DenoiserConfig, _override(denoiser_preset, cfg.denoiser), "denoiser")
    perceiver = validate(UniPerceiverConfig, _override(
        UniPerceiverConfig.preset(cfg.size, in_channels=token_channels, frames=frames), cfg.perceiver), "perceiver")
    policy_preset = PolicyConfig.preset(cfg.size, action_dim=action_dim, chunk=chunk, text_dim=text_dim,
                                        cond_tokens=perceiver.num_latents, cond_dim=perceiver.dim)
    policy = validate(PolicyConfig, _override(policy_preset, cfg.policy), "policy")
    return perceiver, policy


class FrozenDecouplers(nn.Module):
    """Trained decouplers in eval mode, no gradients: one-step features -> per-token perception input."""

    def __init__(self, decouplers: list[Decoupler], teachers: list[str]):
        super().__init__()
        self.decouplers = nn.ModuleList(decouplers)
        self.teachers = list(teachers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenDecouplers":
        return super().train(False)  # frozen: dropout stays off whatever the caller sets

    @property
    def channels(self) -> int:
        return sum(d.cfg.teacher_channels for d in self.decouplers)

    @torch.no_grad()
    def forward(self, onestep_BTHWC: torch.Tensor, references: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, h*w, C_in + sum C_teacher) tokens: the features and every decoupler's prediction."""
        preds = [dec(onestep_BTHWC, references[t]) for dec, t in zip(self.decouplers, self.teachers)]
        dtype = preds[0].dtype if preds else onestep_BTHWC.dtype
        tokens = torch.cat([onestep_BTHWC.to(dtype), *preds], dim=-1)
        return tokens.flatten(2, 3)


def load_frozen_decouplers(root: Root, run_ids: list[str]) -> tuple[FrozenDecouplers, list[CheckpointInfo]]:
    """The newest complete checkpoint of each decoupler run, frozen, in the given order."""
    if not run_ids:
        raise ValueError("action expert: no decoupler runs given (--decouplers RUN_A,RUN_B)")
    loaded = [load_decoupler(root, run_id) for run_id in run_ids]
    teachers = [teacher_of(info) for _, info in loaded]
    if len(set(teachers)) != len(teachers):
        raise ValueError(f"action expert: decoupler runs {run_ids} repeat a teacher ({teachers})")
    return FrozenDecouplers([m for m, _ in loaded], teachers), [info for _, info in loaded]


def check_decoupler_inputs(infos: list[CheckpointInfo], export_versions: dict[str, str], allow_change: bool) -> None:
    """A decoupler must see the one-step features and reference maps of the versions it was trained on."""
    for info in infos:
        teacher = teacher_of(info)
        for field in (ONESTEP, f"{teacher}.reference"):
            trained, given = info.target_versions.get(field), export_versions.get(field)
            if trained != given and not allow_change:
                raise ValueError(
                    f"decoupler run {info.run_id} ({info.step} steps) was trained on '{field}' version {trained}; "
                    f"the export has {given}; pass --allow-version-change to use it anyway"
                )


class ActionExpertTask(TrainTask):
    """Batch {onestep, references, text, actions, actions_mask} -> diffusion loss of the action expert."""

    def __init__(self, model: ActionExpert, decouplers: FrozenDecouplers, text_field: str = "text",
                 eval_seed: int = 0):
        self.model, self.decouplers = model, decouplers
        self.text_field, self.eval_seed = text_field, eval_seed

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack the fields the expert reads (float16 features or fp8 codes stay compact on the host)."""
        return self.collate_fn()(samples)

    def collate_fn(self):
        fields = {"onestep": ONESTEP, "text": self.text_field, "actions": "actions", "actions_mask": "actions_mask"}
        fields |= {f"reference.{t}": f"{t}.reference" for t in self.decouplers.teachers}
        if self.model.reads_proprio:
            fields["state"] = "state"
        return functools.partial(collate_fields, fields=fields)

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self.decouplers.to(device)

    def tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Perception tokens of a device batch (frozen decouplers, no gradients)."""
        references = {t: batch[f"reference.{t}"] for t in self.decouplers.teachers}
        return self.decouplers(batch["onestep"], references)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(self.tokens(batch), batch["text"], batch["actions"], batch["actions_mask"], batch.get("state"))

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.eval_seed)
        raw_sum = norm_sum = rows = 0.0
        for batch in batches:
            pred = model.predict(self.tokens(batch), batch["text"], generator, batch.get("state"))
            mask = batch["actions_mask"].to(pred.dtype)
            raw_err = ((pred - batch["actions"].float()) ** 2).mean(-1)
            norm = model.normalizer
            norm_err = ((norm.normalize(pred) - norm.normalize(batch["actions"])) ** 2).mean(-1)
            raw_sum += float((raw_err * mask).sum())
            norm_sum += float((norm_err * mask).sum())
            rows += float(mask.sum())
        if rows == 0:
            raise ValueError("action expert: the held-out stream gave no valid action rows")
        return {"action_mse": raw_sum / rows, "action_mse_norm": norm_sum / rows}


def run_config_record(cfg: ActionExpertRunConfig, perceiver: AggregatorConfig, policy: DenoiserNetConfig,
                      objective: ObjectiveConfig, decoupler_infos: list[CheckpointInfo],
                      init: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved config stored with every checkpoint, including which decoupler checkpoints were used."""
    decouplers = [{"run_id": i.run_id, "step": i.step, "teacher": teacher_of(i), "target_versions": i.target_versions}
                  for i in decoupler_infos]
    return {"run": cfg.model_dump(mode="json"), "preset": cfg.preset, "arch": cfg.arch,
            "perceiver": perceiver.model_dump(mode="json"), "policy": policy.model_dump(mode="json"),
            "objective": objective.model_dump(mode="json"), "decouplers": decouplers, "init": init}


def model_from_record(config: dict[str, Any], where: str) -> ActionExpert:
    """An (untrained) action expert of the architecture a checkpoint's config records."""
    if "arch" not in config or "objective" not in config:
        raise ValueError(f"{where}: the checkpoint predates the arch/objective options (its parameter names "
                         f"differ too); retrain it")
    perceiver_model, policy_model = ((VideoFormerConfig, DenoiserConfig) if config["arch"] == "release"
                                     else (UniPerceiverConfig, PolicyConfig))
    perceiver = validate(perceiver_model, config["perceiver"], f"{where}: perceiver")
    policy = validate(policy_model, config["policy"], f"{where}: policy")
    objective = validate(ObjectiveConfig, config["objective"], f"{where}: objective")
    return ActionExpert(perceiver, policy, objective)


def load_action_expert(root: Root, run_id: str, step: int | None = None
                       ) -> tuple[ActionExpertTask, CheckpointInfo]:
    """A trained action expert with the exact decoupler checkpoints it was trained with (eval mode)."""
    info, state = RunDir(root, run_id).load_model(step)
    if info.kind != KIND:
        raise ValueError(f"run {run_id}: is a '{info.kind}' run, not an action-expert run")
    model = model_from_record(info.config, f"run {run_id} step {info.step}")
    model.load_state_dict(state)
    decouplers, teachers = [], []
    for record in info.config["decouplers"]:
        decoupler, dec_info = load_decoupler(root, record["run_id"], record["step"])
        decouplers.append(decoupler)
        teachers.append(teacher_of(dec_info))
    run_cfg = info.config["run"]
    task = ActionExpertTask(model.eval(), FrozenDecouplers(decouplers, teachers), run_cfg["text_field"],
                            run_cfg["eval_seed"])
    return task, info


def init_from_release(model: ActionExpert, spec: str) -> dict[str, str]:
    """Load a released policy checkpoint's aggregator and denoiser into ``model`` (strictly); its provenance."""
    if not isinstance(model.policy, GCDenoiser):
        raise ValueError(f"--init {spec}: a released policy checkpoint needs arch = 'release'")
    state, provenance = read_state_dict(spec)
    former_state, denoiser_state = policy_parts(state, spec)
    load_strict(model.perceiver, former_state, f"{spec} (Video_Former.*)")
    load_strict(model.policy, denoiser_state, f"{spec} (model.*)")
    return provenance


def check_chunk(cfg: ActionExpertRunConfig, export_id: str, chunk: int) -> None:
    """A preset fixes the chunk length; an export cut with another one is refused."""
    if cfg.chunk is not None and cfg.chunk != chunk:
        raise ValueError(f"export '{export_id}': action chunks of {chunk} steps, the run config "
                         f"(preset {cfg.preset}) needs {cfg.chunk}; re-export with --action-chunk {cfg.chunk}")


def train_action_expert(root: Root, export_id: str, cfg: ActionExpertRunConfig, run_id: str | None = None,
                        eval_export: str | None = None, allow_version_change: bool = False,
                        stop_at: int | None = None) -> FitResult:
    """Train (or resume) the action expert over the frozen decoupler runs ``cfg.decouplers``."""
    decouplers, infos = load_frozen_decouplers(root, cfg.decouplers)
    fields = cfg.fields(decouplers.teachers)
    stream, versions = open_export(root, export_id, fields, cfg.data, cfg.loop.seed)
    check_decoupler_inputs(infos, versions, allow_version_change)
    specs = stream.index.fields
    frames = specs[ONESTEP].shape[0]
    actions_shape = specs["actions"].shape
    check_chunk(cfg, export_id, actions_shape[0])
    proprio_dim = specs["state"].shape[-1] if "state" in fields else None
    perceiver, policy = build_architecture(cfg, frames, specs[ONESTEP].shape[-1] + decouplers.channels,
                                           specs[cfg.text_field].shape[-1], actions_shape[0], actions_shape[-1],
                                           proprio_dim)
    objective = build_objective(cfg)
    eval_stream = None
    if eval_export:
        eval_stream, _ = open_export(root, eval_export, fields, cfg.data, cfg.loop.seed, pins=versions, shuffle=False)
    seed_everything(cfg.loop.seed)
    model = ActionExpert(perceiver, policy, objective)
    init = init_from_release(model, cfg.init) if cfg.init else None
    model.normalizer.set_stats(cfg.action_norm, action_stats(stream.stats, export_id))
    if model.reads_proprio:
        model.proprio_normalizer.set_stats("meanstd", action_stats(stream.stats, export_id, "state"))
    task = ActionExpertTask(model, decouplers, cfg.text_field, cfg.eval_seed)
    config = run_config_record(cfg, perceiver, policy, objective, infos, init)
    identity = {"export": export_id, "decouplers": config["decouplers"], "arch": cfg.arch,
                "perceiver": config["perceiver"], "policy": config["policy"], "objective": config["objective"],
                "optim": config["run"]["optim"], "seed": cfg.loop.seed, "norm": cfg.action_norm,
                "batch": cfg.loop.batch_size, "init": init}
    spec = RunSpec(root, run_id or default_run_id("action-expert", identity), KIND, export_id, versions, config,
                   extra={"eval_export": eval_export})
    log.info("action expert (%s, %s) over %s: %d trainable parameters, run %s", cfg.arch, objective.kind,
             decouplers.teachers, sum(p.numel() for p in model.parameters()), spec.run_id)
    return fit(task, stream, spec, cfg.loop, cfg.optim, eval_stream, allow_version_change, stop_at)


def action_stats(stats: dict[str, dict[str, Any]], export_id: str, field: str = "actions") -> dict[str, Any]:
    """The export's per-dimension statistics of ``field`` (index.json "stats"["actions"] or ["state"])."""
    if field not in stats:
        raise ValueError(f"export '{export_id}': index.json has no '{field}' statistics (has {sorted(stats)})")
    return stats[field]


@torch.no_grad()
def predict_actions(task: ActionExpertTask, sample: dict[str, Any], device: torch.device, seed: int = 0) -> np.ndarray:
    """One raw action chunk (chunk, action_dim) for one observation (a sample dict), float32."""
    task.to(device)
    task.model.eval()
    batch = task.prepare(to_device(task.collate([_with_dummy_actions(sample, task.model.policy.cfg)]), device))
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        actions = task.model.predict(task.tokens(batch), batch["text"], generator, batch.get("state"))
    return actions[0].float().cpu().numpy()


def _with_dummy_actions(sample: dict[str, Any], policy: PolicyConfig) -> dict[str, Any]:
    """An observation needs no actions; collate wants the keys, so absent ones become zeros."""
    filled = dict(sample)
    filled.setdefault("actions", np.zeros((policy.chunk, policy.action_dim), dtype=np.float32))
    filled.setdefault("actions_mask", np.ones(policy.chunk, dtype=bool))
    return filled
