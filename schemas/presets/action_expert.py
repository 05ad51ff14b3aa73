"""Preset settings of the action_expert stage; see schemas.presets for the table format.

Keys are dotted keys of ``trainers.action_expert.ActionExpertRunConfig``. The architecture,
objective and sampler are the release's (fixture SPEC.md §3-5, ``config.json`` →
``calvin_release_settings``); optimiser and training lengths are the paper's. Settings neither
gives (LR schedule, warm-up) keep foresight's defaults and are not part of a preset.
"""

from __future__ import annotations

import math

from foresight.schemas.presets import Sourced

_FORMER = "S-VAM-Code policy_models/module/Video_Former.py Video_Former_3D; policy_conf/VPP_Calvinabc_train.yaml"
_DENOISER = "S-VAM-Code policy_models/edm_diffusion/score_wrappers.py GCDenoiser.__init__ (hard-coded)"
_DECODER = "S-VAM-Code policy_models/module/diffusion_decoder.py DiffusionTransformer"
_TRAIN_YAML = "S-VAM-Code policy_conf/VPP_Calvinabc_train.yaml"
_EVAL_YAML = "S-VAM-Code policy_conf/calvin_evaluate_all_our.yaml (written into the model by calvin_evaluate_our.py)"
_PAPER = ("S-VAM (arXiv 2603.16195) implementation details "
          "(docs/REFERENCE.md, S-VAM / VPP model settings: action expert)")

_ARCH: dict[str, Sourced] = {
    "arch": Sourced("release", f"{_FORMER}; {_DENOISER}"),
    "size": Sourced("full", "fixture config.json calvin_release_settings"),
    "former.dim": Sourced(384, _FORMER),
    "former.depth": Sourced(6, _FORMER),
    "former.heads": Sourced(8, _FORMER),
    "former.dim_head": Sourced(64, _FORMER),
    "former.queries_per_frame": Sourced(14, f"{_FORMER}: 224 latents over 16 frames"),
    "denoiser.embed_dim": Sourced(384, _DENOISER),
    "denoiser.n_enc_layers": Sourced(4, _DENOISER),
    "denoiser.n_dec_layers": Sourced(4, _DENOISER),
    "denoiser.n_heads": Sourced(8, _DENOISER),
    "denoiser.attn_pdrop": Sourced(0.3, _DENOISER),
    "denoiser.resid_pdrop": Sourced(0.1, _DENOISER),
    "denoiser.mlp_pdrop": Sourced(0.05, _DENOISER),
    "denoiser.cross_attn_mask": Sourced("top-left-causal", f"{_DECODER}: SDPA is_causal with more keys than queries"),
    "denoiser.modulation": Sourced("scale-shift", "S-VAM-Code policy_models/module/transformers/"
                                                  "transformer_blocks.py modulate: x * scale + shift"),
    "denoiser.proprio": Sourced("unused", "S-VAM-Code VPP_Policy: the batch holds 'robot_obs', the denoiser reads "
                                          "'state_obs' (fixture SPEC.md §4.2: no proprio token)"),
    "objective.kind": Sourced("release-edm", "S-VAM-Code policy_models/edm_diffusion (GCDenoiser.loss, sample_ddim)"),
    "objective.sigma_data": Sourced(0.5, _DENOISER),
    "objective.sigma_min": Sourced(0.001, f"{_TRAIN_YAML} sigma_min"),
    "objective.sigma_max": Sourced(80.0, f"{_TRAIN_YAML} sigma_max"),
    "objective.loc": Sourced(math.log(0.5), "S-VAM-Code VPP_Policy.make_sample_density (loglogistic loc ln 0.5)"),
    "objective.scale": Sourced(0.5, "S-VAM-Code VPP_Policy.make_sample_density (loglogistic scale 0.5)"),
    "objective.sample_steps": Sourced(10, f"{_TRAIN_YAML} num_sampling_steps (sampler ddim, schedule exponential)"),
    "action_norm": Sourced("none", "fixture SPEC.md §4.3: GCDenoiser.loss takes the batch's actions as loaded"),
    "optim.lr": Sourced(3e-4, _PAPER),
    "optim.betas": Sourced((0.9, 0.9), _PAPER),
    "optim.weight_decay": Sourced(0.05, _PAPER),
    "loop.batch_size": Sourced(48, f"{_PAPER}: batch 192 over 4 GPUs = 48 per rank"),
}

PRESETS: dict = {
    "svam-calvin": _ARCH | {
        "chunk": Sourced(10, f"{_TRAIN_YAML} act_seq_len; executed in full before replanning (multistep 10)"),
        "objective.sample_sigma_min": Sourced(1.0, f"{_EVAL_YAML} sigma_min: 1.0"),
        "loop.steps": Sourced(60_000, f"{_PAPER}: 60k steps (CALVIN)"),
    },
    "svam-metaworld": _ARCH | {
        "objective.sample_sigma_min": Sourced(0.001, "ours: the release's MetaWorld evaluation config is not among "
                                                     "the files the fixture covers; the training yaml's sigma_min"),
        "loop.steps": Sourced(40_000, "S-VAM (arXiv 2603.16195): 40k steps (MetaWorld)"),
    },
}
"""preset -> {setting: Sourced}; ``vpp`` fixes no action-expert setting here."""

__all__ = ["PRESETS", "Sourced"]
