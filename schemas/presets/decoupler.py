"""Preset settings of the decoupler stage; see schemas.presets for the table format.

Keys are dotted keys of ``trainers.decoupler.DecouplerRunConfig``. The DINOv2 and DA3 decouplers
share every setting (the run's ``teacher`` picks the branch); MetaWorld uses the CALVIN recipe
(the paper trains every decoupler 50k steps). Settings neither the paper nor the release gives
(batch size, LR schedule, warm-up) keep foresight's defaults and are not part of a preset.
"""

from __future__ import annotations

from foresight.schemas.presets import Sourced

_MODEL = "S-VAM-Code hidden2dino/model_spail_tem_attention.py (HiddenToDinoModelWithRef; fixture SPEC.md §2)"
_DINO_RUN = ("S-VAM-Code hidden2dino/runs_calvin_new_st_model-hidden1024-layers4-head8/run_20260321_202023/"
             "model_config_resolved.yaml")
_DPA_RUN = "S-VAM-Code hidden2dpa/runs_da3_calvin_st_ref_large/run_20260323_220858/model_config_resolved.yaml"
_PAPER = "S-VAM (arXiv 2603.16195) implementation details (docs/REFERENCE.md, S-VAM / VPP model settings: decoupler)"

_RECIPE: dict[str, Sourced] = {
    "arch": Sourced("release", f"{_MODEL}: no positional embeddings"),
    "size": Sourced("full", f"{_DINO_RUN}; {_DPA_RUN}"),
    "model.hidden": Sourced(1024, f"{_DINO_RUN} hidden_dim; {_DPA_RUN} hidden_dim"),
    "model.depth": Sourced(4, f"{_DINO_RUN} num_layers"),
    "model.heads": Sourced(8, f"{_DINO_RUN} num_heads"),
    "model.mlp_ratio": Sourced(4, f"{_MODEL}: MLP Linear(D, 4D)"),
    "model.dropout": Sourced(0.1, f"{_DINO_RUN} dropout"),
    "model.use_reference": Sourced(True, f"{_MODEL}: reference fused by 1x1x1 Conv3d + add (use_ref true)"),
    "optim.lr": Sourced(1e-4, _PAPER),
    "optim.weight_decay": Sourced(1e-4, _PAPER),
    "optim.grad_clip": Sourced(1.0, _PAPER),
    "loop.steps": Sourced(50_000, "S-VAM (arXiv 2603.16195): decouplers trained 50k steps"),
}

PRESETS: dict = {"svam-calvin": dict(_RECIPE), "svam-metaworld": dict(_RECIPE)}
"""preset -> {setting: Sourced}; ``vpp`` fixes no decoupler setting (VPP has no decouplers)."""

__all__ = ["PRESETS", "Sourced"]
