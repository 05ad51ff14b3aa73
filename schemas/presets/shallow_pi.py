"""Preset settings of the shallow_pi stage; see schemas.presets for the table format.

Keys are dotted paths into ``trainers.shallow_pi.ShallowPiRunConfig`` (``optim.lr``); a preset's
value becomes that setting's default and the user's explicit value wins. Keys under ``fixed.``
describe what the code computes without a setting (the time distribution, the KL's direction, the
student's initialisation): they are listed so the recipe table is complete, and are never applied.

Sources: "Shallow-π" is arXiv 2601.20262 as summarised in ``shared/REFERENCE.md`` (the paper's own
text, beyond that summary, could not be consulted in this environment); "openpi" is
Physical-Intelligence/openpi, the π0/π0.5 training code whose recipe a distillation fine-tune
inherits where the paper names no value of its own. Everything else is "ours" with the reason.
"""

from __future__ import annotations

from schemas.presets import Sourced

OPENPI_OPTIM = "openpi src/openpi/training/optimizer.py"
OPENPI_AUG = "openpi src/openpi/models/model.py preprocess_observation"
PAPER = "Shallow-π (arXiv 2601.20262)"
SILENT = "the paper names no value"

SHALLOW_PI: dict[str, Sourced] = {
    # --- the regime
    "mode": Sourced("online", f"{PAPER}: teacher and student loaded together, fresh (t, noise) every step"),
    "augment": Sourced(None, f"{PAPER}: teacher and student see the same augmented inputs (None: on in online "
                             f"mode; offline refuses it, its cached targets saw unaugmented images); the recipe is "
                             f"{OPENPI_AUG}"),
    "augmentation.crop_scale": Sourced(0.95, f"{OPENPI_AUG}: RandomCrop(0.95 w, 0.95 h) + Resize"),
    "augmentation.rotate_deg": Sourced(5.0, f"{OPENPI_AUG}: Rotate((-5, 5))"),
    "augmentation.brightness": Sourced(0.3, f"{OPENPI_AUG}: ColorJitter(brightness=0.3)"),
    "augmentation.contrast": Sourced(0.4, f"{OPENPI_AUG}: ColorJitter(contrast=0.4)"),
    "augmentation.saturation": Sourced(0.5, f"{OPENPI_AUG}: ColorJitter(saturation=0.5)"),
    "augmentation.color_only_match": Sourced("wrist", f"{OPENPI_AUG}: no crop/rotation when 'wrist' in the key"),
    # --- the student and the losses
    "layers": Sourced(6, f"{PAPER}: 18 -> 6 layers in both the VLM and the action expert"),
    "lambda_kd": Sourced(1.0, f"ours: {SILENT}; task and distillation terms weighted equally"),
    "lambda_attn": Sourced(1.0, f"ours: {SILENT}; the attention KL weighted as the other two terms"),
    "attn_layers": Sourced(None, "ours: the paper says 'middle' layers; foresight takes every student layer but "
                                 "the first and the last (6 layers -> 1..4, teacher 3, 7, 10, 14)"),
    "attn_heads": Sourced("mean", f"ours: {SILENT} on the heads; averaged before the KL (one map per layer, what "
                                  "the offline cache stores); 'all' takes the KL head by head (online only)"),
    # --- optimisation (a π0 fine-tune: openpi's recipe where the paper is silent)
    "optim.lr": Sourced(2.5e-5, f"ours: {SILENT}; {OPENPI_OPTIM} CosineDecaySchedule peak_lr"),
    "optim.warmup_steps": Sourced(1000, f"ours: {SILENT}; {OPENPI_OPTIM} CosineDecaySchedule warmup_steps"),
    "optim.schedule": Sourced("cosine", f"ours: {SILENT}; {OPENPI_OPTIM} warmup + cosine decay"),
    "optim.min_lr_ratio": Sourced(0.1, f"ours: {SILENT}; {OPENPI_OPTIM} decay_lr 2.5e-6 = peak / 10"),
    "optim.betas": Sourced((0.9, 0.95), f"ours: {SILENT}; {OPENPI_OPTIM} AdamW b1, b2"),
    "optim.weight_decay": Sourced(1e-10, f"ours: {SILENT}; {OPENPI_OPTIM} AdamW weight_decay"),
    "optim.grad_clip": Sourced(1.0, f"ours: {SILENT}; {OPENPI_OPTIM} clip_gradient_norm"),
    "loop.steps": Sourced(30000, f"ours: {SILENT}; openpi TrainConfig num_train_steps (= its decay_steps)"),
    "loop.batch_size": Sourced(32, f"ours: {SILENT}; openpi TrainConfig batch_size 32 is global, foresight's is "
                                   "per rank: under torchrun pass --batch-size 32/world"),
    # --- computed, not set (documented, never applied)
    "fixed.time_distribution": Sourced("t ~ Beta(1.5, 1) * 0.999 + 0.001",
                                       "π0 (transformers PI0Config time_sampling_*; openpi pi0.sample_time)"),
    "fixed.flow_convention": Sourced("x_t = t noise + (1 - t) actions, u = noise - actions",
                                     "transformers PI0ForConditionalGeneration.forward; openpi pi0.compute_loss"),
    "fixed.student_init": Sourced("round(linspace(0, L_T - 1, L_S)) in both stacks",
                                  f"{PAPER}: uniform subsampling of the teacher's layers"),
    "fixed.losses": Sourced("L_task + lambda_kd L_kd + lambda_attn L_attn", f"{PAPER}: three terms"),
    "fixed.attn_kl": Sourced("KL(teacher || student) of the action queries over the VL keys, renormalised",
                             f"{PAPER}: the direction and the action->VL restriction (heads: attn_heads)"),
}

PRESETS: dict = {"shallow-pi": SHALLOW_PI}
"""Preset name -> setting -> Sourced (one stage, so not keyed by stage)."""

FIXED_PREFIX = "fixed."
"""Keys under this prefix document a computation and are never applied to a config."""

__all__ = ["PRESETS", "FIXED_PREFIX", "Sourced"]
