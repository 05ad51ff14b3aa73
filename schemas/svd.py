"""The keyed settings of SVD generation and one-step feature extraction (records, no compute).

They live here rather than in pipelines/svd/sampler.py (which re-exports them) so that the stage
configs, and the CLI options derived from them, import without torch or diffusers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from foresight.schemas.base import StrictModel

MAX_LENGTH = 20
"""CLIP tokens per instruction (padded/truncated): the text states that condition the SVD UNet."""

FpsId = Literal["fps-1", "fps"]
"""How the frame rate enters the time ids: ``fps-1`` as diffusers' SVD pipeline passes it (SVD was
trained on fps - 1), ``fps`` as is (S-VAM's released extractor: ``_get_add_time_ids(4, 127, 0)``)."""


class OneStepParams(StrictModel):
    """Conditioning of the one-step features when they come from their own UNet head call, as in
    S-VAM's released extractor (``Diffusion_feature_extractor.forward``), from the same initial
    noise as the generated trajectory. Frame rate, motion bucket, text states and feature blocks
    are the generation's."""

    fps_id: FpsId = Field(default="fps", description="How fps enters the time ids: 'fps' as is (release "
                                                     "extractor) or 'fps-1' (diffusers' SVD pipeline).")
    noise_aug_strength: float = Field(default=0.0, ge=0.0, description="Noise augmentation of the conditioning "
                                                                        "frame (time id and image noise).")
    schedule_steps: int = Field(default=20, ge=1, description="Steps the extraction's scheduler is set to; only "
                                                              "the first runs (its sigma is sigma_max whatever "
                                                              "the count).")


SolverId = Literal["euler", "heun", "dpmpp-2m"]
"""Solvers of :class:`SamplerParams` (the probability-flow ODE on the scheduler's Karras sigmas):
``euler`` (first order, one call per step: the reference's stepping, for comparison), ``heun``
(EDM's second-order correction, two calls per step but the last) and ``dpmpp-2m``
(DPM-Solver++(2M): second order from the previous step's prediction, one call per step)."""


class SamplerParams(StrictModel):
    """A denoising loop other than the reference one (diffusers' Euler scheduler, guidance on every
    step): a solver on the same Karras sigmas and classifier-free guidance only on the steps whose
    noise level is at least ``guidance_sigma_min``; the other steps run the conditional call alone
    (guidance scale 1), skipping the unconditional half. The first call is the reference's (same
    sigma, timestep and inputs), so features captured from it are unchanged. ``SamplerParams()``
    (Euler, guidance everywhere) computes the reference's numbers through this loop (bit for bit
    on a CPU, tests/test_svd_fast.py) but is keyed as set, like any sampler."""

    solver: SolverId = Field(default="euler", description="ODE solver on the scheduler's sigmas: euler (the "
                                                          "reference's stepping), heun or dpmpp-2m (DPM-Solver++ 2M).")
    guidance_sigma_min: float = Field(default=0.0, ge=0.0,
                                      description="Guide (run the unconditional call) only where sigma >= this; "
                                                  "0 guides every step.")


class SVDParams(StrictModel):
    """Every setting that changes generated frames or features (all enter the version id)."""

    num_frames: int = Field(default=16, ge=1, description="Frames per generated clip (T).")
    size: int = Field(default=256, ge=8, description="Square frame size in pixels (VPP: 256).")
    steps: int = Field(default=30, ge=1, description="Denoising steps (Euler unless `sampler` says otherwise).")
    fps: int = Field(default=4, ge=1, description="Frame rate micro-conditioning.")
    fps_id: FpsId = Field(default="fps-1", description="How fps enters the generation's time ids: 'fps-1' "
                                                       "(diffusers' SVD pipeline) or 'fps' as is.")
    motion_bucket_id: int = Field(default=127, description="SVD motion bucket micro-conditioning.")
    noise_aug_strength: float = Field(default=0.02, ge=0.0, description="Noise added to the conditioning frame.")
    min_guidance: float = Field(default=1.0, description="Guidance scale of the first frame.")
    max_guidance: float = Field(default=3.0, description="Guidance scale of the last frame (linear ramp).")
    feature_blocks: list[int] = Field(default=[0, 1], min_length=1,
                                      description="UNet up_blocks whose first-step outputs form the features.")
    text_position_encoding: bool = Field(default=True,
                                         description="Add VPP's sine/cosine positions to the text states.")
    onestep: OneStepParams | None = Field(
        default_factory=OneStepParams,
        description="One-step features from their own head call with the release extractor's conditioning "
                    "(default); None: captured from the generation's first conditional call itself.")
    sampler: SamplerParams | None = Field(
        default=None,
        description="None: the reference loop (diffusers' Euler scheduler, guidance on every step); else the "
                    "solver and guidance interval of a fast recipe (keyed only when set).")
