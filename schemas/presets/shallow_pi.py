"""Preset settings of the shallow_pi stage; see schemas.presets for the table format.

Keys are dotted paths into ``trainers.shallow_pi.ShallowPiRunConfig`` (``optim.lr``); a preset's
value becomes that setting's default and the user's explicit value wins. Keys under ``fixed.``
describe what the code computes without a setting (the time distribution, the KL's direction, the
student's initialisation): they are listed so the recipe table is complete, and are never applied.

Sources, most authoritative first:
- "Shallow-π release": the authors' distillation code, commit a5940ac "Add distillation code" of
  their openpi fork (icsl-Jeon, 2026-01-29): ``src/openpi/training/config.py`` (the
  ``pi0_libero_l06`` TrainConfig, openpi's optimizer and schedule defaults left as they are),
  ``scripts/distill_pytorch.py`` and ``DistilledPI0Pytorch`` in
  ``src/openpi/models_pytorch/pi0_pytorch.py``. It has no attention loss.
- "Shallow-π poster": the authors' IROS poster (icsl-Jeon/shallow-pi ``poster.html``): the three
  loss definitions and the loss / attention-layer / attention-target ablations.
- "Shallow-π (arXiv 2601.20262)": the paper; only its abstract and introduction could be read here
  (a third-party reproduction's notes attribute the release's 30k steps and batch 64 to the
  paper's LIBERO ablations), so its training values are sourced to the release.
Everything else is "ours" with the reason.
"""

from __future__ import annotations

from foresight.schemas.presets import Sourced

PAPER = "Shallow-π (arXiv 2601.20262)"
POSTER = "Shallow-π poster (icsl-Jeon/shallow-pi poster.html)"
RELEASE = "Shallow-π release (openpi fork a5940ac)"
RELEASE_CONFIG = f"{RELEASE} src/openpi/training/config.py pi0_libero_l06"
RELEASE_OPTIM = f"{RELEASE_CONFIG}, openpi optimizer.py defaults it keeps:"
RELEASE_LOSS = f"{RELEASE} pi0_pytorch.py DistilledPI0Pytorch.forward"
RELEASE_AUG = f"{RELEASE} preprocessing_pytorch.py preprocess_observation_pytorch(train=True)"
SILENT = "neither the paper's readable part, the poster nor the release names a value"

SHALLOW_PI: dict[str, Sourced] = {
    # --- the regime
    "mode": Sourced("online", f"{RELEASE_LOSS}: the frozen teacher runs beside the student, both at the same "
                              f"fresh (noise, t) each step; {PAPER}: teacher and student loaded together"),
    "augment": Sourced(None, f"{RELEASE_AUG}, called with train=True (None: on in online mode; offline refuses "
                             f"it, its cached targets saw unaugmented images). ours: teacher and student see the "
                             f"same augmented images; the release augments each model's copy separately, so L_kd "
                             f"compares the two on different crops"),
    "augmentation.crop_scale": Sourced(0.95, f"{RELEASE_AUG}: crop 0.95 h x 0.95 w, resized back (openpi "
                                             f"model.py preprocess_observation). ours: drawn per image; the "
                                             f"release's torch port draws one crop per batch"),
    "augmentation.rotate_deg": Sourced(5.0, f"{RELEASE_AUG}: rotation in (-5, 5) degrees"),
    "augmentation.brightness": Sourced(0.3, f"{RELEASE_AUG}: brightness factor in [0.7, 1.3]"),
    "augmentation.contrast": Sourced(0.4, f"{RELEASE_AUG}: contrast factor in [0.6, 1.4]"),
    "augmentation.saturation": Sourced(0.5, f"{RELEASE_AUG}: saturation factor in [0.5, 1.5]"),
    "augmentation.color_only_match": Sourced("wrist", f"{RELEASE_AUG}: no crop or rotation when 'wrist' is in "
                                                      f"the camera key"),
    # --- the student and the losses
    "layers": Sourced(6, f"{PAPER} abstract: 18 -> 6 layers in both the VLM and the action expert; "
                         f"{RELEASE_CONFIG}: DistilledPi0Config(gemma_depth=6)"),
    "lambda_kd": Sourced(1.0, f"{RELEASE_LOSS}: loss_output_gt + loss_output_teacher, unweighted "
                              f"(DistilledPi0Config loss_weight_teacher = 1.0)"),
    "lambda_attn": Sourced(1.0, f"ours: {SILENT} (the release has no attention loss, the poster no weight); "
                                f"the attention KL weighted as the other two terms"),
    "attn_layers": Sourced(None, f"ours: {POSTER} ablates initial / middle / later layers and keeps the middle "
                                 f"ones without listing them; foresight takes every student layer but the first "
                                 f"and the last (6 layers -> 1..4, teacher 3, 7, 10, 14)"),
    "attn_heads": Sourced("mean", f"ours: {SILENT} on the heads; averaged before the KL (one map per layer, "
                                  f"what the offline cache stores); 'all' takes the KL head by head (online only)"),
    # --- optimisation: the release's TrainConfig, which keeps openpi's optimizer and schedule
    "optim.lr": Sourced(2.5e-5, f"{RELEASE_OPTIM} CosineDecaySchedule peak_lr"),
    "optim.warmup_steps": Sourced(1000, f"{RELEASE_OPTIM} CosineDecaySchedule warmup_steps (from peak / 1001; "
                                        f"ours from 0)"),
    "optim.schedule": Sourced("cosine", f"{RELEASE_OPTIM} warm-up + cosine decay over decay_steps 30000 = the "
                                        f"run's steps"),
    "optim.min_lr_ratio": Sourced(0.1, f"{RELEASE_OPTIM} CosineDecaySchedule decay_lr 2.5e-6 = peak / 10"),
    "optim.betas": Sourced((0.9, 0.95), f"{RELEASE_OPTIM} AdamW b1, b2"),
    "optim.eps": Sourced(1e-8, f"{RELEASE_OPTIM} AdamW eps"),
    "optim.weight_decay": Sourced(1e-10, f"{RELEASE_OPTIM} AdamW weight_decay (the release decays every "
                                         f"parameter; foresight spares biases and norms, immaterial at 1e-10)"),
    "optim.grad_clip": Sourced(1.0, f"{RELEASE_OPTIM} AdamW clip_gradient_norm"),
    "loop.steps": Sourced(30000, f"{RELEASE_CONFIG}: num_train_steps=30_000"),
    "loop.batch_size": Sourced(64, f"{RELEASE_CONFIG}: batch_size=64, global (its README runs 2 GPUs x 32 with "
                                   f"gradient checkpointing); foresight's is per rank and checkpoints no "
                                   f"activations: under torchrun pass --batch-size 64/world"),
    "loop.bf16": Sourced(False, f"{RELEASE_CONFIG}: pytorch_training_precision='float32' (openpi's default is "
                                f"bfloat16; the release overrides it)"),
    # --- computed, not set (documented, never applied)
    "fixed.time_distribution": Sourced("t ~ Beta(1.5, 1) * 0.999 + 0.001",
                                       f"{RELEASE_LOSS}: PI0Pytorch.sample_time (openpi pi0.sample_time; "
                                       f"transformers PI0Config time_sampling_*)"),
    "fixed.flow_convention": Sourced("x_t = t noise + (1 - t) actions, u = noise - actions",
                                     f"{RELEASE_LOSS}; openpi pi0.compute_loss; transformers "
                                     f"PI0ForConditionalGeneration.forward"),
    "fixed.student_init": Sourced("round(linspace(0, L_T - 1, L_S)) in both stacks",
                                  f"{POSTER}: uniformly subsample layers in both the VLM and the action head; "
                                  f"{RELEASE} scripts/distill_pytorch.py layer_mapping (its key filter remaps "
                                  f"only the expert stack, so its VLM keeps layers 0..L_S-1; foresight maps both)"),
    "fixed.losses": Sourced("L_task + lambda_kd L_kd + lambda_attn L_attn",
                            f"{POSTER}: L_task = E||v_s - u||^2, L_kd = E||v_s - v_teacher||^2, L_attn; "
                            f"each term helps in its loss ablation"),
    "fixed.attn_kl": Sourced("KL(teacher || student) of the action queries over the VL keys, renormalised",
                             f"{POSTER}: L_attn = E[KL(Attn_teacher^(a->vl) || Attn_student^(a->vl))] at middle "
                             f"layers; action-only targets (all-token targets: LIBERO SR 0-61.5%); heads: attn_heads"),
}

PRESETS: dict = {"shallow-pi": SHALLOW_PI}
"""Preset name -> setting -> Sourced (one stage, so not keyed by stage)."""

FIXED_PREFIX = "fixed."
"""Keys under this prefix document a computation and are never applied to a config."""

__all__ = ["PRESETS", "FIXED_PREFIX", "Sourced"]
