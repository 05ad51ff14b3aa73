"""Shallow-π: distil a π0 teacher into a student with fewer layers in both stacks.

The student is built from the teacher by uniform subsampling, ``round(linspace(0, L_T-1, L_S))``,
applied with the *same* map to the VLM language stack and to the action expert (expert layer i
reads the prefix cache of VLM layer i, so the two stacks must stay aligned); every other weight
(SigLIP, projector, embeddings, action/state/time projections, final norms) is copied.

Loss: ``L_task + lambda_kd * L_kd + lambda_attn * L_attn`` with
- ``L_task = ||v_s - u||^2`` (u = noise - actions),
- ``L_kd = ||v_s - v_teacher||^2`` at the same (x_t, t),
- ``L_attn = KL(teacher || student)`` of the head-averaged attention of the 50 action queries
  over the vision-language keys, at the student's middle layers i (teacher layer map[i]).

Two defects of the public reference code are avoided on purpose: the attention loss exists, and
the VLM stack is subsampled with the map (not truncated to the teacher's first L_S layers).

Two regimes (``mode``):
- ``online`` (default, the paper's): the frozen teacher is loaded beside the student and run on
  the same (augmented) inputs; every step draws a fresh (t, noise) per sample from the task's
  seeded ``pairs`` generator, whose state every checkpoint holds, so a resumed run draws what an
  uninterrupted one would have drawn.
- ``offline``: the teacher's targets come from a cached pi0 version, one of its K fixed pairs per
  sample per step, no augmentation. An approximation: the student only ever sees K (t, noise)
  points per sample; bench/bench_shallow_pi_gap.py measures what that costs.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import default_collate

from foresight.pipelines import pi0
from foresight.pipelines.pi0_augment import AugmentConfig, augment_images
from foresight.schemas.base import StrictModel
from foresight.schemas.presets import preset_table
from foresight.storage.fs import Root
from foresight.storage.runs import CheckpointInfo, RunDir, RunSpec, default_run_id
from foresight.trainers.config import DataConfig, LoopConfig, OptimConfig
from foresight.trainers.distributed import seed_everything
from foresight.trainers.exports import open_export
from foresight.trainers.loop import FitResult, fit
from foresight.trainers.task import TrainTask

log = logging.getLogger(__name__)

STACK_PREFIXES = ("model.vlm.language_model.layers.", "model.dit.layers.")
"""State-dict prefixes of the two stacks that are subsampled together."""


# ----------------------------------------------------------------------------- student
def student_config(teacher_config: Any, num_layers: int) -> Any:
    """The teacher's config with both stacks ``num_layers`` deep (nothing else changes)."""
    config = copy.deepcopy(teacher_config)
    config.vlm_config.text_config.num_hidden_layers = num_layers
    config.dit_config.num_hidden_layers = num_layers
    for sub in (config.vlm_config.text_config, config.dit_config):
        if getattr(sub, "layer_types", None):
            sub.layer_types = list(sub.layer_types)[:num_layers]
    return config


def student_state_dict(teacher_state: dict[str, torch.Tensor], layer_map: list[int]) -> dict[str, torch.Tensor]:
    """Teacher weights renamed for the student: stack layer i <- teacher layer layer_map[i], in BOTH stacks."""
    by_teacher_layer = {teacher: student for student, teacher in enumerate(layer_map)}
    pattern = re.compile(r"^(" + "|".join(re.escape(p) for p in STACK_PREFIXES) + r")(\d+)\.(.*)$")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in teacher_state.items():
        match = pattern.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, layer, rest = match.group(1), int(match.group(2)), match.group(3)
        if layer in by_teacher_layer:
            out[f"{prefix}{by_teacher_layer[layer]}.{rest}"] = tensor
    return out


def build_student(teacher: Any, num_layers: int) -> tuple[Any, list[int]]:
    """A Shallow-π student of ``num_layers`` layers initialised from ``teacher``; returns (student, map)."""
    layer_map = pi0.uniform_layer_map(pi0.num_layers(teacher), num_layers)
    parameter = next(teacher.parameters())
    cuda = [parameter.device] if parameter.device.type == "cuda" else []
    # The random init is overwritten below; keep it from moving the caller's random streams.
    with torch.random.fork_rng(devices=cuda), parameter.device:
        student = type(teacher)(student_config(teacher.config, num_layers))
    student.to(parameter.dtype)
    state = student_state_dict(teacher.state_dict(), layer_map)
    # strict: a key the map missed (or one left over) is a bug, never silently random weights.
    student.load_state_dict(state, strict=True)
    log.info("Shallow-π student: %d -> %d layers, map %s", pi0.num_layers(teacher), num_layers, layer_map)
    return student, layer_map


def middle_layers(num_layers: int) -> list[int]:
    """Student layers whose attention is distilled by default: all but the first and the last."""
    return list(range(1, num_layers - 1))


# ----------------------------------------------------------------------------- losses
def masked_mse(pred_BAD: torch.Tensor, target_BAD: torch.Tensor, mask_BAD: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real action steps and dims (padding masked out)."""
    mask = mask_BAD.to(torch.float32)
    err = (pred_BAD.float() - target_BAD.float()).square() * mask
    return err.sum() / mask.sum().clamp_min(1.0)


def attention_kl(teacher_BLAP: torch.Tensor, student_BLAP: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the P vision-language keys (last axis), mean over every other axis
    (batch, layers, [heads,] queries)."""
    assert teacher_BLAP.shape == student_BLAP.shape, (teacher_BLAP.shape, student_BLAP.shape)
    p, q = teacher_BLAP.float(), student_BLAP.float()
    kl_BLA = (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(1e-30))).sum(-1)
    return kl_BLA.mean()


@dataclass
class StepTargets:
    """What the student is trained against at one step, per sample one (t, noise) pair."""

    t_B: torch.Tensor
    noise_BAD: torch.Tensor
    velocity_BAD: torch.Tensor
    attn_BLAP: torch.Tensor | None  # teacher layers ``teacher_layers`` ([B, L, H, A, P] per head), or None


def distill_losses(student: Any, batch: pi0.Pi0Batch, targets: StepTargets, attn_student_layers: list[int],
                   lambda_kd: float, lambda_attn: float, heads: str = "mean") -> dict[str, torch.Tensor]:
    """L_task, L_kd, L_attn and the weighted total for one batch (differentiable in the student).

    ``heads``: L_attn between head-averaged maps ("mean") or head by head ("all"), as the targets hold."""
    use_attn = lambda_attn > 0 and bool(attn_student_layers)
    velocity, attn = pi0.pi0_forward(student, batch, targets.t_B, targets.noise_BAD,
                                     attn_student_layers if use_attn else [], heads)
    task_target = targets.noise_BAD.float() - batch.actions.float()  # u = noise - actions, in float32
    losses = {"task": masked_mse(velocity, task_target, batch.action_mask),
              "kd": masked_mse(velocity, targets.velocity_BAD, batch.action_mask)}
    if use_attn:
        if targets.attn_BLAP is None:
            raise ValueError("lambda_attn > 0 but no teacher attention targets for this batch")
        losses["attn"] = attention_kl(targets.attn_BLAP, attn)
    else:
        losses["attn"] = torch.zeros((), device=velocity.device)
    losses["total"] = losses["task"] + lambda_kd * losses["kd"] + lambda_attn * losses["attn"]
    return losses


# ----------------------------------------------------------------------------- targets per step
def offline_targets(arrays: dict[str, Any], pair_index_B: np.ndarray, teacher_layers: list[int],
                    device: str | torch.device) -> StepTargets:
    """Targets from cached pi0 arrays: pair ``pair_index_B[b]`` of sample b.

    t and the noise are rebuilt from the stored integer noise seed (exact whatever codec an
    export applied to float fields). ``teacher_layers``: the teacher layers the student distils
    attention from; each must be among the cached ``attn_layers`` (ValueError otherwise).
    """
    rows = np.arange(len(pair_index_B))
    seeds_B = _numpy(arrays["noise_seed"])[rows, pair_index_B]
    velocity = _numpy(arrays["velocity"])
    noise_BAD = pi0.noise_from_seeds(seeds_B, *velocity.shape[-2:])
    velocity_BAD = torch.as_tensor(velocity[rows, pair_index_B], dtype=torch.float32)
    attn = None
    if teacher_layers:
        attn = torch.as_tensor(cached_attention(arrays, pair_index_B, teacher_layers)).to(device)
    return StepTargets(t_B=torch.from_numpy(pi0.pair_times(seeds_B)).to(device), noise_BAD=noise_BAD.to(device),
                       velocity_BAD=velocity_BAD.to(device), attn_BLAP=attn)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def cached_attention(arrays: dict[str, Any], pair_index_B: np.ndarray, teacher_layers: list[int]) -> np.ndarray:
    """Cached attention (B, len(teacher_layers), 50, P) float32 of the chosen pairs at the given teacher layers."""
    if "attn" not in arrays:
        raise ValueError("the pi0 targets hold no attention maps ('attn'); rebuild them with --attn-layers "
                         "or train with --lambda-attn 0")
    cached_layers = [int(x) for x in _numpy(arrays["attn_layers"])[0]]
    missing = [layer for layer in teacher_layers if layer not in cached_layers]
    if missing:
        raise ValueError(f"teacher layers {missing} are not among the cached attention layers {cached_layers}; "
                         "rebuild the targets with --attn-layers covering them or pick other student layers")
    columns = [cached_layers.index(layer) for layer in teacher_layers]
    rows = np.arange(len(pair_index_B))
    attn = _numpy(arrays["attn"])[rows, pair_index_B]  # (B, L_cached, A, P)
    return attn[:, columns].astype(np.float32)


def online_targets(teacher: Any, batch: pi0.Pi0Batch, t_B: torch.Tensor, noise_BAD: torch.Tensor,
                   teacher_layers: list[int], heads: str = "mean") -> StepTargets:
    """Targets from the teacher run now on the same batch (the same augmented inputs as the student)."""
    velocity, attn = pi0.teacher_targets(teacher, batch, t_B[:, None], noise_BAD[:, None], teacher_layers, heads)
    return StepTargets(t_B=t_B, noise_BAD=noise_BAD, velocity_BAD=velocity[:, 0],
                       attn_BLAP=None if attn is None else attn[:, 0])


def draw_noise_seeds(batch_size: int, generator: torch.Generator) -> np.ndarray:
    """Fresh per-sample (t, noise) seeds of one online step; each seed gives its pair exactly
    (:func:`pipelines.pi0.pair_times`, :func:`pipelines.pi0.noise_from_seeds`)."""
    return torch.randint(0, 2**62, (batch_size,), dtype=torch.int64, generator=generator).numpy()


def draw_pair_index(batch_size: int, num_pairs: int, generator: torch.Generator) -> np.ndarray:
    """Which of its K cached pairs each sample uses this offline step."""
    return torch.randint(0, num_pairs, (batch_size,), generator=generator).numpy()


# ----------------------------------------------------------------------------- the trainer
KIND = "shallow-pi"
INPUT_ARRAYS = ("images", "text_ids", "text_mask", "state", "actions", "action_mask")
PAIR_ARRAYS = ("noise_seed", "velocity")
ATTN_ARRAYS = ("attn", "attn_layers")


Mode = Literal["online", "offline"]


class ShallowPiRunConfig(StrictModel):
    """Everything that defines a Shallow-π run (``--config run.toml`` holds any subset of it).

    ``preset`` names a table of :mod:`schemas.presets.shallow_pi`: its values become the defaults
    of the settings it names (dotted paths such as ``optim.lr``), explicit settings win, and the
    resolved config (which the run records) keeps the preset's name.
    """

    preset: str | None = Field(None, description="Preset whose sourced settings are the defaults "
                                                 "(e.g. 'shallow-pi'); explicit settings win.")
    teacher: str | None = Field(None, description="π0 teacher spec (hf:, dir:, random, tiny) the student is cut "
                                                  "from; default: the one that made the export's pi0 targets.")
    tiny_layers: int | None = Field(None, ge=1, description="Depth of a `tiny` teacher (default: the targets' "
                                                            "teacher's, else 4).")
    teacher_family: Literal["pi0", "pi05"] | None = Field(
        None, description="Architecture of a `random`/`tiny` teacher: pi0 or pi05 (π0.5); default: the targets' "
                          "teacher's, else pi0 (a checkpoint's config.json decides for hf:/dir:).")
    layers: int = Field(6, ge=1, description="L_S: student depth of both stacks.")
    mode: Mode = Field("online", description="online: the frozen teacher runs beside the student on the same "
                                             "(augmented) inputs at fresh (t, noise) every step (the paper's "
                                             "regime); offline: targets from the export's K cached (t, noise) "
                                             "pairs per sample, an approximation (see bench/RESULTS.md).")
    augment: bool | None = Field(None, description="Image augmentation (default: on when online; offline "
                                                   "refuses it, the cached targets saw unaugmented images).")
    augmentation: AugmentConfig = Field(default_factory=AugmentConfig, description="The augmentation's settings.")
    lambda_kd: float = Field(1.0, ge=0, description="Weight of L_kd (velocity distillation).")
    lambda_attn: float = Field(1.0, ge=0, description="Weight of L_attn (action->VL attention KL).")
    attn_layers: list[int] | None = Field(None, description="Student layers whose attention is distilled "
                                                            "(default: the middle ones, not first/last).")
    attn_heads: Literal["mean", "all"] = Field("mean", description="L_attn between head-averaged maps ('mean', "
                                                                   "what the offline cache stores) or per head "
                                                                   "('all', online only).")
    field_prefix: str = Field("pi0", description="Export field prefix of the pi0 version ('pi0' unless aliased).")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=1e-4, grad_clip=1.0,
                                                                   warmup_steps=100))
    loop: LoopConfig = Field(default_factory=LoopConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        return preset_defaults(data, preset_table(data["preset"], "shallow_pi"))

    @property
    def online(self) -> bool:
        return self.mode == "online"

    @property
    def augments(self) -> bool:
        return self.online if self.augment is None else self.augment

    def student_attn_layers(self) -> list[int]:
        """Student layers of L_attn (empty when lambda_attn is 0 or the student has no middle layers)."""
        if self.lambda_attn == 0:
            return []
        layers = middle_layers(self.layers) if self.attn_layers is None else sorted(set(self.attn_layers))
        if any(not 0 <= i < self.layers for i in layers):
            raise ValueError(f"attn layers {layers}: the student has layers 0..{self.layers - 1}")
        return layers

    def fields(self) -> list[str]:
        """Export fields this run reads."""
        names = list(INPUT_ARRAYS)
        if not self.online:
            names += list(PAIR_ARRAYS) + (list(ATTN_ARRAYS) if self.student_attn_layers() else [])
        return [f"{self.field_prefix}.{name}" for name in names]


def preset_defaults(data: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every applicable preset setting (dotted key) filled in where ``data`` leaves it unset."""
    from foresight.schemas.presets.shallow_pi import FIXED_PREFIX

    out = copy.deepcopy(data)
    for dotted, item in table.items():
        if dotted.startswith(FIXED_PREFIX):
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):  # an already-built sub-config: the user chose it whole
                break
        else:
            node.setdefault(leaf, item.value)
    return out


class ShallowPiTask(TrainTask):
    """Batch of pi0 samples -> L_task + lambda_kd L_kd + lambda_attn L_attn of the student.

    Two private generators drive every random choice of a step: ``pairs`` (online: each sample's
    fresh (t, noise) seed; offline: which cached pair) and ``augment`` (the image augmentation).
    The loop seeds them from the run's seed and checkpoints their states.
    """

    def __init__(self, student: Any, teacher: Any | None, layer_map: list[int], cfg: ShallowPiRunConfig,
                 cameras: list[str] | None = None):
        self.model, self.teacher, self.layer_map, self.cfg = student, teacher, layer_map, cfg
        self.student_layers = cfg.student_attn_layers()
        self.teacher_layers = [layer_map[i] for i in self.student_layers]
        self.prefix = f"{cfg.field_prefix}."
        self.cameras = cameras
        self.rngs = {"pairs": torch.Generator(), "augment": torch.Generator()}

    def generators(self) -> dict[str, torch.Generator]:
        return self.rngs

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack the pi0 arrays under their short names, plus a per-sample evaluation seed."""
        rows = [{name[len(self.prefix):]: value for name, value in sample.items() if name.startswith(self.prefix)}
                for sample in samples]
        batch = default_collate(rows)
        keys = [str(sample.get("__key__", i)) for i, sample in enumerate(samples)]
        batch["eval_seed"] = torch.tensor([pi0.sample_seed("shallow-pi-eval", key) for key in keys])
        return batch

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        if self.teacher is not None:
            self.teacher.to(device)

    def targets(self, batch_arrays: dict[str, torch.Tensor], batch: pi0.Pi0Batch, pair_index: np.ndarray | None,
                noise_seeds: np.ndarray | None) -> StepTargets:
        """Cached pair ``pair_index`` (offline) or the teacher now at the pairs of ``noise_seeds``."""
        device = batch.actions.device
        if noise_seeds is None:
            return offline_targets(batch_arrays, pair_index, self.teacher_layers, device)
        t_B = torch.from_numpy(pi0.pair_times(noise_seeds)).to(device)
        noise_BAD = pi0.noise_from_seeds(noise_seeds, *batch.actions.shape[-2:]).to(device)
        return online_targets(self.teacher, batch, t_B, noise_BAD, self.teacher_layers, heads=self.cfg.attn_heads)

    def model_batch(self, batch_arrays: dict[str, torch.Tensor], augment: bool) -> pi0.Pi0Batch:
        arrays = dict(batch_arrays)
        if augment:
            images = arrays["images"]
            geometric = self.cfg.augmentation.geometric_cameras(self.cameras, images.shape[1])
            arrays["images"] = augment_images(images, self.cfg.augmentation, geometric, self.rngs["augment"])
        parameter = next(self.model.parameters())
        return pi0.make_batch(arrays, pi0.unwrap(self.model).config, parameter.device, parameter.dtype)

    def losses(self, model: Any, batch_arrays: dict[str, torch.Tensor], augment: bool,
               pair_index: np.ndarray | None, noise_seeds: np.ndarray | None) -> dict[str, torch.Tensor]:
        batch = self.model_batch(batch_arrays, augment)
        targets = self.targets(batch_arrays, batch, pair_index, noise_seeds)
        return distill_losses(model, batch, targets, self.student_layers, self.cfg.lambda_kd, self.cfg.lambda_attn,
                              self.cfg.attn_heads)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        size = batch["actions"].shape[0]
        if self.cfg.online:
            losses = self.losses(model, batch, self.cfg.augments, None, draw_noise_seeds(size, self.rngs["pairs"]))
        else:
            pair_index = draw_pair_index(size, batch["noise_seed"].shape[1], self.rngs["pairs"])
            losses = self.losses(model, batch, False, pair_index, None)
        log.debug("step losses: %s", {k: round(v.item(), 6) for k, v in losses.items()})
        return losses["total"]

    def evaluate(self, model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Held-out losses at fixed pairs (cached pair 0 offline, seeds from the sample keys online), the
        masked MSE of a full 10-step action chunk to the ground-truth actions and, with the teacher
        loaded, the student's distance to it (``teacher_velocity_mse``, ``teacher_chunk_mse``)."""
        sums: dict[str, float] = {}
        count = 0
        for arrays in batches:
            size = arrays["actions"].shape[0]
            seeds = arrays["eval_seed"].cpu().numpy()
            if self.cfg.online:
                losses = self.losses(model, arrays, False, None, seeds)
            else:
                losses = self.losses(model, arrays, False, np.zeros(size, dtype=np.int64), None)
            batch = self.model_batch(arrays, augment=False)
            losses["action_mse"] = masked_mse(sample_chunk(model, batch, seeds), batch.actions, batch.action_mask)
            if self.teacher is not None:
                losses.update({f"teacher_{k}": v for k, v in teacher_gap(model, self.teacher, batch, seeds).items()})
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item() * size
            count += size
        if count == 0:
            raise ValueError("shallow-pi: the held-out stream gave no samples")
        return {name: total / count for name, total in sums.items()}


def sample_chunk(model: Any, batch: pi0.Pi0Batch, seeds: np.ndarray) -> torch.Tensor:
    """The model's 10-step action chunk (B, 50, 32) from the noise of ``seeds`` (one per sample)."""
    noise = pi0.noise_from_seeds(seeds, *batch.actions.shape[-2:]).to(batch.actions)
    return pi0.unwrap(model).sample_actions(
        **pi0.state_input(model, batch), input_ids=batch.input_ids, pixel_values=batch.pixel_values, noise=noise,
        attention_mask=batch.attention_mask, pixel_attention_mask=batch.pixel_attention_mask)


@torch.no_grad()
def teacher_gap(student: Any, teacher: Any, batch: pi0.Pi0Batch, seeds: np.ndarray) -> dict[str, torch.Tensor]:
    """How far the student is from the teacher on one batch, at the (t, noise) of ``seeds`` (one per sample):
    ``velocity_mse`` (the one-step velocity at the same x_t, t) and ``chunk_mse`` (the 10-step action
    chunk integrated from the same noise); both masked to the real action steps and dims."""
    t_B = torch.from_numpy(pi0.pair_times(seeds)).to(batch.actions.device)
    noise_BAD = pi0.noise_from_seeds(seeds, *batch.actions.shape[-2:]).to(batch.actions.device)
    student_velocity, _ = pi0.pi0_forward(student, batch, t_B, noise_BAD, [])
    teacher_velocity, _ = pi0.teacher_targets(teacher, batch, t_B[:, None], noise_BAD[:, None], [])
    return {"velocity_mse": masked_mse(student_velocity, teacher_velocity[:, 0], batch.action_mask),
            "chunk_mse": masked_mse(sample_chunk(student, batch, seeds), sample_chunk(teacher, batch, seeds),
                                    batch.action_mask)}


def check_teacher_matches_targets(root: Root, versions: dict[str, str], identity: Any, online: bool) -> None:
    """Refuse cached targets made by another teacher than the one the student is cut from."""
    if online:
        return
    from foresight.storage.targets import TargetStore

    store = TargetStore(root)
    for version in sorted(set(versions.values())):
        if store.status(version) is None:
            log.warning("target version %s is not in this root: its teacher identity is not checked", version)
            continue
        model = store.manifest(version).recipe.model
        if model is None or model.key() != identity.key():
            made_by = teacher_label(model) if model is not None else "no model"
            raise ValueError(f"target version '{version}' was made by teacher {made_by}, not by "
                             f"{teacher_label(identity)}; distil from the teacher that made the targets "
                             "(for `tiny`, check --tiny-layers)")


def teacher_label(identity: Any) -> str:
    """'<spec> [model-<12 hex>]': the spec and a digest of the identifying fields, so two `tiny`
    teachers of different depth read differently in an error."""
    from foresight.schemas.target import content_id

    return f"'{identity.spec}' [{content_id('model', identity.key())}]"


def recorded_inputs(root: Root, versions: dict[str, str]) -> tuple[Any | None, list[str] | None]:
    """(teacher identity, camera names) recorded by the export's pi0 version, or None where it is not here."""
    from foresight.storage.targets import TargetStore

    store = TargetStore(root)
    for version in sorted(set(versions.values())):
        if store.status(version) is not None:
            recipe = store.manifest(version).recipe
            return recipe.model, recipe.params.get("cameras")
    return None, None


def resolve_teacher(cfg: ShallowPiRunConfig, recorded: Any | None) -> ShallowPiRunConfig:
    """Fill in ``teacher`` / ``tiny_layers`` / ``teacher_family`` from the model the pi0 version recorded."""
    teacher = cfg.teacher or (recorded.spec if recorded is not None else None)
    if teacher is None:
        raise ValueError("no --teacher given and the export's pi0 version is not in this root to read it from")
    depth = cfg.tiny_layers
    if depth is None and recorded is not None and recorded.source == "tiny" and recorded.config:
        depth = recorded.config.get("vlm_config", {}).get("text_config", {}).get("num_hidden_layers")
    family = cfg.teacher_family or (recorded.family if recorded is not None else "pi0")
    return cfg.model_copy(update={"teacher": teacher, "tiny_layers": depth or 4, "teacher_family": family})


def freeze_unused(student: Any) -> None:
    """The expert's token embedding is never used (π0 feeds it action embeddings): freeze it, so
    AdamW does not decay it and DDP does not wait for its gradient (π0.5's expert has none)."""
    embed = getattr(student.model.dit, "embed_tokens", None)
    if embed is not None:
        embed.weight.requires_grad_(False)


def teacher_device(cfg: ShallowPiRunConfig) -> str:
    """Where the teacher is initialised (``random`` weights depend on it; see pipelines.pi0.load_pi0)."""
    wants_cuda = cfg.loop.device == "cuda" or (cfg.loop.device == "auto" and torch.cuda.is_available())
    return "cuda" if wants_cuda else "cpu"


def run_config_record(cfg: ShallowPiRunConfig, student: Any, layer_map: list[int], identity: Any) -> dict[str, Any]:
    """The resolved config stored with every checkpoint (enough to rebuild the student), with the
    preset's table (value and source per setting) when one was applied."""
    record = {"run": cfg.model_dump(mode="json"), "student_config": student.config.to_dict(),
              "layer_map": layer_map, "teacher": identity.model_dump(mode="json"),
              "attn_student_layers": cfg.student_attn_layers()}
    if cfg.preset is not None:
        record["preset"] = {"name": cfg.preset, "settings": {
            key: {"value": item.value, "source": item.source}
            for key, item in preset_table(cfg.preset, "shallow_pi").items()}}
    return record


RUN_IDENTITY = ("preset", "layers", "mode", "augment", "augmentation", "lambda_kd", "lambda_attn", "attn_layers",
                "attn_heads")
"""Run-config keys that make a run another run (its default id hashes them)."""


def train_shallow_pi(root: Root, export_id: str, cfg: ShallowPiRunConfig, run_id: str | None = None,
                     eval_export: str | None = None, allow_version_change: bool = False,
                     stop_at: int | None = None) -> FitResult:
    """Train (or resume) a Shallow-π student on a pi0 export: online (the teacher run beside it at
    fresh (t, noise) every step, the default) or offline (the export's cached pairs)."""
    if cfg.augments and not cfg.online:
        raise ValueError("augmentation needs --mode online: the cached targets were computed on unaugmented images")
    if cfg.attn_heads == "all" and not cfg.online:
        raise ValueError("--attn-heads all needs --mode online: the cached targets hold head-averaged attention")
    fields = cfg.fields()
    stream, versions = open_export(root, export_id, fields, cfg.data, cfg.loop.seed)
    eval_stream = None
    if eval_export:
        eval_stream, _ = open_export(root, eval_export, fields, cfg.data, cfg.loop.seed, pins=versions,
                                     shuffle=False)
    recorded, cameras = recorded_inputs(root, versions)
    cfg = resolve_teacher(cfg, recorded)
    loaded = pi0.load_pi0(cfg.teacher, teacher_device(cfg), "float32", cfg.tiny_layers, cfg.teacher_family)
    check_teacher_matches_targets(root, versions, loaded.identity, cfg.online)
    seed_everything(cfg.loop.seed)
    student, layer_map = build_student(loaded.model, cfg.layers)
    freeze_unused(student)
    pi0.use_eager_expert(student)
    teacher = loaded.model.requires_grad_(False).eval() if cfg.online else None
    task = ShallowPiTask(student, teacher, layer_map, cfg, cameras)
    if cfg.lambda_attn > 0 and not task.student_layers:
        log.warning("a %d-layer student has no middle layers: L_attn is off (pass attn_layers to choose some)",
                    cfg.layers)
    config = run_config_record(cfg, student, layer_map, loaded.identity)
    identity = {"export": export_id, "teacher": loaded.identity.key(),
                "run": {k: config["run"][k] for k in RUN_IDENTITY},
                "optim": config["run"]["optim"], "seed": cfg.loop.seed, "batch": cfg.loop.batch_size}
    spec = RunSpec(root, run_id or default_run_id(KIND, identity), KIND, export_id, versions, config,
                   extra={"eval_export": eval_export})
    log.info("Shallow-π run %s: %d -> %d layers (map %s), %s, L_attn at student layers %s",
             spec.run_id, pi0.num_layers(loaded.model), cfg.layers, layer_map, cfg.mode, task.student_layers)
    return fit(task, stream, spec, cfg.loop, cfg.optim, eval_stream, allow_version_change, stop_at)


def load_student(root: Root, run_id: str, step: int | None = None) -> tuple[Any, CheckpointInfo]:
    """A trained Shallow-π student (eval mode) and its checkpoint record, from ``runs/<run_id>/step-N``."""
    info, state = RunDir(root, run_id).load_model(step)
    if info.kind != KIND:
        raise ValueError(f"run {run_id}: is a '{info.kind}' run, not a {KIND} run")
    student_config = info.config["student_config"]
    config_class, model_class = pi0.family_classes("pi05" if student_config.get("model_type") == "pi05" else "pi0")
    student = model_class(config_class.from_dict(student_config))
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"run {run_id}: checkpoint does not fit its recorded student config: "
                         f"{str(err).splitlines()[0]}") from None
    return student.eval(), info
