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


class SVDParams(StrictModel):
    """Every setting that changes generated frames or features (all enter the version id)."""

    num_frames: int = Field(default=16, ge=1, description="Frames per generated clip (T).")
    size: int = Field(default=256, ge=8, description="Square frame size in pixels (VPP: 256).")
    steps: int = Field(default=30, ge=1, description="Euler denoising steps.")
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
