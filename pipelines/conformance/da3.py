"""Group ``da3``: foresight's Depth Anything 3 backbone and teacher against the official code.

The fixture (da3_tiny format: ``io.npz`` keys without a group prefix, ``model.safetensors`` under
the official ``pretrained.`` names) is loaded through the teacher's own ``dir:`` loading path;
the stage tokens, camera outputs, reference-view selection and per-block outputs come from
``pipelines.teachers.da3_model``, and S-VAM's target and reference maps from the DA3 teacher's
``encode_pixels`` (the fixture's pixels are already model input, so no resize/normalisation).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from foresight.pipelines.conformance import ArrayCheck, compare
from foresight.pipelines.teachers.da3 import DA3Settings, DA3Teacher, load_backbone
from foresight.pipelines.teachers.da3_model import (DA3Backbone, reference_view_order, saddle_balanced_scores,
                                          select_reference_view)
from foresight.pipelines.teachers.preprocess import PreprocessSettings
from foresight.schemas.model import ModelIdentity, ModelSpec

GROUP = "da3"
ATOL, RTOL = 5e-5, 1e-5  # SPEC.md section 9: suggested for an independent float32 implementation
VIEW_COUNTS = {"multiview": None, "single": 1, "twoview": 2, "threeview": 3}
STAGE_KEY = re.compile(r"out_(multiview|single|twoview|threeview)_(camtok_)?stage(\d+)$")


def applies(io: dict[str, np.ndarray]) -> bool:
    """True for a da3_tiny-format fixture (its input and at least one stage output)."""
    return "input_multiview" in io and any(STAGE_KEY.match(key) for key in io)


def _views(io: dict[str, np.ndarray], name: str) -> torch.Tensor:
    pixels = torch.from_numpy(io["input_multiview"])
    count = VIEW_COUNTS[name]
    return pixels if count is None else pixels[:, :count]


def stage_outputs(backbone: DA3Backbone, io: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``out_<views>_stage<k>`` (tokens) and ``out_<views>_camtok_stage<k>`` for every view count held."""
    out: dict[str, torch.Tensor] = {}
    for name in VIEW_COUNTS:
        if not any(key.startswith(f"out_{name}_") for key in io):
            continue
        stages = backbone.intermediate_layers(_views(io, name), backbone.cfg.out_layers)
        for stage, (tokens, camera) in enumerate(stages):
            out[f"out_{name}_stage{stage}"], out[f"out_{name}_camtok_stage{stage}"] = tokens, camera
    extra = sorted(int(key.rsplit("layer", 1)[1]) for key in io if key.startswith("out_extra_multiview_layer"))
    if extra:
        for layer, (tokens, _) in zip(extra, backbone.intermediate_layers(_views(io, "multiview"), extra)):
            out[f"out_extra_multiview_layer{layer}"] = tokens
    return out


def svam_maps(backbone: DA3Backbone, identity: ModelIdentity, io: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """S-VAM's target (stage 0 over all views) and reference (stage 0 of frame 0 alone) through
    the DA3 teacher, at the fixture's pixel size."""
    pixels = _views(io, "multiview")
    settings = DA3Settings(stage=0, preprocess=PreprocessSettings(height=pixels.shape[-2], width=pixels.shape[-1]))
    teacher = DA3Teacher(backbone, identity, settings)
    B, T = pixels.shape[:2]
    target = teacher.encode_pixels(pixels).reshape(B, T, -1, teacher.channels)
    reference = teacher.encode_pixels(pixels[:, :1]).reshape(B, 1, -1, teacher.channels)
    return {"svam_targets": target, "svam_ref_tokens": reference}


def reference_selection(backbone: DA3Backbone, io: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Scores, chosen reference view and view order from the fixture's selector input, and the
    reference view the forward pass itself picks."""
    out: dict[str, torch.Tensor] = {}
    for name in ("multiview", "threeview"):
        if f"refsel_{name}_cls_in" not in io:
            continue
        cls_in = torch.from_numpy(io[f"refsel_{name}_cls_in"])
        ref = select_reference_view(cls_in, "saddle_balanced")
        out[f"refsel_{name}_balance_score"] = saddle_balanced_scores(cls_in)
        out[f"refsel_{name}_ref_idx"] = ref
        out[f"refsel_{name}_view_order"] = reference_view_order(ref, cls_in.shape[1])
        _, chosen = backbone.forward_layers(_views(io, name), [backbone.cfg.alt_start - 1])
        out[f"refsel_{name}_ref_idx_forward"] = chosen
    return out


def block_outputs(backbone: DA3Backbone, io: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``debug_<views>_block_outputs`` (depth, B, S, N, C): each block's output in processing order."""
    out: dict[str, torch.Tensor] = {}
    for name in ("multiview", "single"):
        if f"debug_{name}_block_outputs" not in io:
            continue
        pixels = _views(io, name)
        B, S = pixels.shape[:2]
        captured: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda _m, _a, y: captured.append(y)) for block in backbone.blocks]
        try:
            backbone.forward_layers(pixels, [backbone.cfg.depth - 1])
        finally:
            for hook in hooks:
                hook.remove()
        out[f"debug_{name}_block_outputs"] = torch.stack([y.reshape(B, S, -1, y.shape[-1]) for y in captured])
    return out


def check(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    """Compare every recomputed array the fixture holds; integer arrays must match exactly."""
    backbone, identity = load_backbone(ModelSpec(source="dir", ref=str(fixture_dir)))
    backbone.eval()
    with torch.no_grad():
        got = {**stage_outputs(backbone, io), **svam_maps(backbone, identity, io), **reference_selection(backbone, io),
               **block_outputs(backbone, io)}
    results = []
    for name, value in got.items():
        ref_name = name.removesuffix("_forward")
        if ref_name not in io:
            continue
        exact = np.issubdtype(io[ref_name].dtype, np.integer)
        atol, rtol = (0.0, 0.0) if exact else (ATOL, RTOL)
        results.append(compare(GROUP, name, value.numpy(), io[ref_name], atol, rtol))
    return results
