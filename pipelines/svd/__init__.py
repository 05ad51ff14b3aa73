"""Stable Video Diffusion (VPP settings): model loading, multi-step generation with one-step
feature capture, and standalone one-step feature extraction."""

from foresight.pipelines.svd.conditioning import clip_seed
from foresight.pipelines.svd.loading import SVDModel, load_svd, save_svd
from foresight.pipelines.svd.sampler import GeneratedBatch, SVDParams, generate_clips, one_step_features

__all__ = ["SVDModel", "SVDParams", "GeneratedBatch", "clip_seed", "generate_clips", "load_svd",
           "one_step_features", "save_svd"]
