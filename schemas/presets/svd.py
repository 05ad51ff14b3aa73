"""Preset settings of the SVD stages: ``generate`` (multi-step video generation), ``extract``
(the one-step features, captured by the generate stage) and ``text`` (CLIP text states).

Keys are paths into the stage's config: ``generate``/``extract`` keys name ``SVDParams`` fields
(``onestep.*`` its ``OneStepParams``), ``text`` keys ``TextConfig`` fields. Only the CALVIN
configs of the S-VAM release exist (``policy_conf/VPP_Calvinabc_train.yaml``); where the
MetaWorld preset has no release value it takes the one the release code uses when no config
overrides it, and says so. The clip length T (16 in every preset) is the plan's ``frames``.
"""

from __future__ import annotations

from foresight.schemas.presets import Sourced

EXTRACT_PY = "S-VAM-Code policy_models/module/diffusion_extract.py"
CALVIN_YAML = "S-VAM-Code policy_conf/VPP_Calvinabc_train.yaml"
FIXTURE = "tests/reference/svam_tiny/SPEC.md"
VPP_GEN = "VPP sampler (docs/REFERENCE.md, S-VAM / VPP model settings)"


def _generation(position_encoding: Sourced) -> dict[str, Sourced]:
    """VPP's multi-step generation (the teacher videos), shared by every preset."""
    return {
        "size": Sourced(256, f"{FIXTURE} §5 (256x256 input, latents 32x32)"),
        "steps": Sourced(30, f"{VPP_GEN}: 30 Euler steps"),
        "fps": Sourced(4, f"{VPP_GEN}: fps 4"),
        "fps_id": Sourced("fps-1", f"{VPP_GEN}: the stock SVD pipeline passes fps - 1 = 3"),
        "motion_bucket_id": Sourced(127, f"{VPP_GEN}: motion bucket 127"),
        "noise_aug_strength": Sourced(0.02, f"{VPP_GEN}: noise augmentation 0.02"),
        "min_guidance": Sourced(1.0, f"{VPP_GEN}: guidance ramp 1.0 -> 3.0 over the frames"),
        "max_guidance": Sourced(3.0, f"{VPP_GEN}: guidance ramp 1.0 -> 3.0 over the frames"),
        "text_position_encoding": position_encoding,
    }


# The release extractor (Diffusion_feature_extractor.forward, called with timestep 20,
# extract_layer_idx 1, all_layer True, step_time 1): the one-step features.
RELEASE_EXTRACT: dict[str, Sourced] = {
    "feature_blocks": Sourced([0, 1], f"{CALVIN_YAML}:L62-63 (use_all_layer True, extract_layer_idx 1); "
                                      f"{FIXTURE} §1.4"),
    "onestep.fps_id": Sourced("fps", f"{EXTRACT_PY} forward: fps=4 passed as is to _get_add_time_ids; "
                                     f"{FIXTURE} §1.2"),
    "onestep.noise_aug_strength": Sourced(0.0, f"{EXTRACT_PY} forward: _get_add_time_ids(fps, 127, 0), "
                                               f"no image noise; {FIXTURE} §1.3"),
    "onestep.schedule_steps": Sourced(20, f"{CALVIN_YAML}:L61 (timestep: 20); only the first step runs, "
                                          f"{FIXTURE} §1.4"),
}

TEXT: dict[str, Sourced] = {
    "model": Sourced("hf:openai/clip-vit-base-patch32",
                     f"{EXTRACT_PY} __init__ (CLIPTextModelWithProjection openai/clip-vit-base-patch32)"),
    "max_length": Sourced(20, f"{EXTRACT_PY} forward (max_length=20, padding max_length); {FIXTURE} §1.1"),
}

CALVIN_PE = Sourced(False, f"{CALVIN_YAML}:L58 (use_position_encoding: False, 'should be same with finetune "
                           "settings')")
CODE_DEFAULT_PE = Sourced(True, f"ours: the release has no MetaWorld config; {EXTRACT_PY} __init__ default "
                                "position_encoding=True")

PRESETS: dict[str, dict[str, dict[str, Sourced]]] = {
    "svam-calvin": {"generate": _generation(CALVIN_PE), "extract": dict(RELEASE_EXTRACT), "text": dict(TEXT)},
    "svam-metaworld": {"generate": _generation(CODE_DEFAULT_PE), "extract": dict(RELEASE_EXTRACT),
                       "text": dict(TEXT)},
    # VPP's own generation; its extractor settings are not part of this preset (foresight's
    # default one-step conditioning, the S-VAM release extractor's, applies).
    "vpp": {"generate": _generation(Sourced(True, "ours: no VPP source gives it; the extractor class default "
                                                  f"({EXTRACT_PY} __init__ position_encoding=True)")),
            "text": dict(TEXT)},
}
"""{preset: {stage: {setting path: Sourced}}} for the generate, extract and text stages."""

FAST_WHY = ("ours: DPM-Solver++(2M) makes one UNet call per step like Euler but is second order: on a Gaussian "
            "toy problem with a known answer its error falls 4x per doubling of steps (Euler: 2x) and at 12 "
            "steps is below that of 12 Euler steps (tests/test_svd_fast.py); 12 steps on the same Karras "
            "sigmas instead of 30")
GUIDANCE_WHY = ("ours: below sigma 1 the clip's layout and motion are settled and the conditional and "
                "unconditional predictions differ little (guidance matters at mid and high noise, "
                "Kynkäänniemi et al. 2024, 'Applying guidance in a limited interval'); on the 12-step grid "
                "this guides 8 steps and runs 4 conditional calls alone: 20 UNet calls a clip instead of 60")

RECIPES: dict[str, dict[str, Sourced]] = {
    "fast": {
        "steps": Sourced(12, FAST_WHY),
        "sampler.solver": Sourced("dpmpp-2m", FAST_WHY),
        "sampler.guidance_sigma_min": Sourced(1.0, GUIDANCE_WHY),
    },
}
"""Speed recipes of the generate stage (``--recipe fast``, ``recipe = "fast"`` in ``[generate]``):
{recipe: {``SVDParams`` setting path: Sourced}}. Never a default: a recipe changes the generated
numbers, so its settings are keyed (a new version id) and its name enters the recipe. They
apply on top of a preset's values and under the user's explicit settings. The one-step features
are untouched (their own head call, or the first call, which a recipe leaves as it is)."""

RECIPE_NAMES = tuple(RECIPES)


def check_recipe(name: str) -> str:
    """``name`` if it is a known speed recipe, else a one-line ValueError listing them."""
    if name not in RECIPES:
        raise ValueError(f"unknown generate recipe {name!r}; known recipes: {', '.join(RECIPE_NAMES)}")
    return name


def recipe_values(name: str) -> dict[str, object]:
    """The dotted-path values (no sources) of speed recipe ``name``."""
    return {key: item.value for key, item in RECIPES[check_recipe(name)].items()}


__all__ = ["PRESETS", "RECIPES", "RECIPE_NAMES", "Sourced", "check_recipe", "recipe_values"]
