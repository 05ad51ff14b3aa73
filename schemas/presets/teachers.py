"""Preset settings of the teachers stage: ``<teacher>.<setting path>`` -> Sourced.

``<teacher>.model`` is the default weights spec; every other key is a path into that teacher's
settings (``preprocess.*`` the frame resize/normalisation). These are the settings the release
used to make the decouplers' *training* targets (bicubic resize with ImageNet normalisation); at
policy time the release feeds its teachers [-1, 1] frames resized bilinearly without ImageNet
normalisation (``pipelines.teachers.preprocess.POLICY_TIME``), a quirk foresight records but does
not make the target default. VPP has no teachers, so ``vpp`` fixes nothing here.
"""

from __future__ import annotations

from foresight.schemas.presets import Sourced

REFERENCE = "docs/REFERENCE.md (S-VAM / VPP model settings: teacher preprocessing)"
SVAM_SPEC = "tests/reference/svam_tiny/SPEC.md"
DA3_SPEC = "tests/reference/da3_tiny/SPEC.md"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _training_preprocess(teacher: str) -> dict[str, Sourced]:
    why = f"{REFERENCE}; {SVAM_SPEC} §7 (decoupler training data: bicubic resize, ImageNet normalisation)"
    return {
        f"{teacher}.preprocess.height": Sourced(224, f"{REFERENCE}: 224x224, patch 14 -> 16x16 tokens"),
        f"{teacher}.preprocess.width": Sourced(224, f"{REFERENCE}: 224x224, patch 14 -> 16x16 tokens"),
        f"{teacher}.preprocess.interpolation": Sourced("bicubic", why),
        f"{teacher}.preprocess.antialias": Sourced(True, f"{REFERENCE} (bicubic, antialias)"),
        f"{teacher}.preprocess.mean": Sourced(IMAGENET_MEAN, why),
        f"{teacher}.preprocess.std": Sourced(IMAGENET_STD, why),
    }


SVAM_TEACHERS: dict[str, Sourced] = {
    "dinov2.model": Sourced("hf:facebook/dinov2-with-registers-base",
                            f"{REFERENCE}: DINOv2 ViT-B/14 with registers, final-LN patch tokens (T, 16, 16, 768)"),
    **_training_preprocess("dinov2"),
    "da3.model": Sourced("hf:depth-anything/DA3-LARGE",
                         f"{DA3_SPEC} §2 (policy default depth-anything/DA3-LARGE; run config token_dim 2048)"),
    "da3.stage": Sourced(0, f"{DA3_SPEC} §2 (target_stage_idx 0 = block 11 of DA3-LARGE)"),
    "da3.cat_token": Sourced(True, f"{DA3_SPEC} §2 (local tokens + normalised global tokens, 2 x 1024)"),
    "da3.ref_strategy": Sourced("saddle_balanced", f"{DA3_SPEC} §2 (get_intermediate_layers default)"),
    **_training_preprocess("da3"),
}

PRESETS: dict[str, dict[str, Sourced]] = {
    "svam-calvin": dict(SVAM_TEACHERS),
    "svam-metaworld": dict(SVAM_TEACHERS),
}
"""{preset: {"<teacher>.<setting path>": Sourced}}."""

__all__ = ["PRESETS", "Sourced"]
