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

Targets come either from a cached pi0 version (offline: one of its K fixed pairs per sample per
step) or from the teacher run now on the same (augmented) inputs as the student (online).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines import pi0

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
    from transformers import PI0ForConditionalGeneration

    layer_map = pi0.uniform_layer_map(pi0.num_layers(teacher), num_layers)
    parameter = next(teacher.parameters())
    with torch.device(parameter.device):
        student = PI0ForConditionalGeneration(student_config(teacher.config, num_layers))
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
    """KL(teacher || student) over the P vision-language keys, mean over batch, layers and queries."""
    p, q = teacher_BLAP.float(), student_BLAP.float()
    kl_BLA = (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(1e-30))).sum(-1)
    return kl_BLA.mean()


@dataclass
class StepTargets:
    """What the student is trained against at one step, per sample one (t, noise) pair."""

    t_B: torch.Tensor
    noise_BAD: torch.Tensor
    velocity_BAD: torch.Tensor
    attn_BLAP: torch.Tensor | None  # teacher layers ``teacher_layers``, or None without L_attn


def distill_losses(student: Any, batch: pi0.Pi0Batch, targets: StepTargets, attn_student_layers: list[int],
                   lambda_kd: float, lambda_attn: float) -> dict[str, torch.Tensor]:
    """L_task, L_kd, L_attn and the weighted total for one batch (differentiable in the student)."""
    use_attn = lambda_attn > 0 and bool(attn_student_layers)
    velocity, attn = pi0.pi0_forward(student, batch, targets.t_B, targets.noise_BAD,
                                     attn_student_layers if use_attn else [])
    task_target = targets.noise_BAD.to(velocity) - batch.actions.to(velocity)
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
                   teacher_layers: list[int]) -> StepTargets:
    """Targets from the teacher run now on the same batch (the same augmented inputs as the student)."""
    velocity, attn = pi0.teacher_targets(teacher, batch, t_B[:, None], noise_BAD[:, None], teacher_layers)
    return StepTargets(t_B=t_B, noise_BAD=noise_BAD, velocity_BAD=velocity[:, 0],
                       attn_BLAP=None if attn is None else attn[:, 0])


def draw_noise_seeds(batch_size: int) -> np.ndarray:
    """Fresh noise seeds for online pairs, from torch's global generator (checkpointed by the loop)."""
    return torch.randint(0, 2**62, (batch_size,), dtype=torch.int64).numpy()


def draw_pair_index(batch_size: int, num_pairs: int) -> np.ndarray:
    """Which cached pair each sample uses this step (torch's global generator, so resume is exact)."""
    return torch.randint(0, num_pairs, (batch_size,)).numpy()


def augment_images(images_BNHWC: torch.Tensor, crop_scale: float = 0.9, jitter: float = 0.1) -> torch.Tensor:
    """Random crop (side in [crop_scale, 1]) resized back, plus brightness/contrast jitter; uint8 in and out.

    Draws from torch's global generator (checkpointed by the loop), so a resumed run augments identically.
    """
    batch, cams, height, width, _ = images_BNHWC.shape
    draws = torch.rand(batch, cams, 5).tolist()
    out = torch.empty_like(images_BNHWC)
    for b in range(batch):
        for c in range(cams):
            side, top_u, left_u, bright_u, contrast_u = draws[b][c]
            side = crop_scale + (1 - crop_scale) * side
            crop_h, crop_w = max(1, round(height * side)), max(1, round(width * side))
            top, left = int(top_u * (height - crop_h + 1)), int(left_u * (width - crop_w + 1))
            crop = images_BNHWC[b, c, top:top + crop_h, left:left + crop_w].permute(2, 0, 1)[None].float()
            img = torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear", antialias=True,
                                                  align_corners=False)[0]
            brightness, contrast = (2 * bright_u - 1) * jitter, 1 + (2 * contrast_u - 1) * jitter
            img = (img - img.mean()) * contrast + img.mean() + brightness * 255.0
            out[b, c] = img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return out
