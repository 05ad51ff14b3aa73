"""The keyed settings of SVD generation and one-step feature extraction (records, no compute).

They live here rather than in pipelines/svd/sampler.py (which re-exports them) so that the stage
configs, and the CLI options derived from them, import without torch or diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


# ---------------------------------------------------------------- attention settings (speed, not keyed maths)
ATTENTION_BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "math", "explicit", "reduce", "flex", "packed-flex")
"""Backends of the UNet's attention layers (pipelines/svd/attention.py says what each one runs)."""
SHORT_MAX_KEYS = 64
"""Attention with at most this many keys is "short" unless a setting says ``@N``: temporal
attention (16 frames), cross-attention (20 text tokens) and the spatial self-attention of the
two deepest levels (8 x 8 and 4 x 4 latents)."""
NAMED_ATTENTION = {"short-math": "sdpa/explicit", "short-reduce": "sdpa/reduce", "short-flex": "sdpa/packed-flex",
                   "short-efficient": "sdpa/efficient", "short-cudnn": "sdpa/cudnn"}
"""Shorthands of attention settings."""
ATTENTION_PATTERN = re.compile(r"^(?P<long>[a-z-]+)/(?P<short>[a-z-]+)(@(?P<keys>[0-9]+))?$")
ATTENTION_HELP = ("default (diffusers' processor: PyTorch's SDPA choice), a name (" + ", ".join(NAMED_ATTENTION) +
                  ") or LONG/SHORT[@N]: the backends of attention over more / at most N keys (N default "
                  f"{SHORT_MAX_KEYS}; backends " + ", ".join(ATTENTION_BACKENDS) + "); rounding only, keyed "
                  "when not default")


@dataclass(frozen=True)
class AttentionPlan:
    """Which backend runs attention over more than ``short_max_keys`` keys (``long``) and over at
    most that many (``short``)."""

    long: str
    short: str
    short_max_keys: int = SHORT_MAX_KEYS

    def backend(self, keys: int) -> str:
        """The backend of an attention call over ``keys`` keys."""
        return self.short if keys <= self.short_max_keys else self.long


def parse_attention(setting: str) -> AttentionPlan | None:
    """The plan of an attention setting (None: ``default``); ValueError naming a bad setting."""
    if setting == "default":
        return None
    match = ATTENTION_PATTERN.match(NAMED_ATTENTION.get(setting, setting))
    if match is None:
        raise ValueError(f"attention setting {setting!r}: expected {ATTENTION_HELP}")
    for backend in (match["long"], match["short"]):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention setting {setting!r}: unknown backend {backend!r} "
                             f"(known: {', '.join(ATTENTION_BACKENDS)})")
    keys = int(match["keys"]) if match["keys"] else SHORT_MAX_KEYS
    return AttentionPlan(long=match["long"], short=match["short"], short_max_keys=keys)


def check_attention(setting: str) -> str:
    """The canonical form of ``setting`` (a pydantic field validator): ``default`` or
    ``LONG/SHORT@N``, so that a shorthand and its spelling-out key the same version; ValueError
    naming a bad setting."""
    plan = parse_attention(setting)
    return "default" if plan is None else f"{plan.long}/{plan.short}@{plan.short_max_keys}"


# ---------------------------------------------------------------- cross-attention context (speed, not keyed maths)
CrossContext = Literal["repeat", "temporal", "folded"]
"""How the UNet's transformers feed the text states to cross-attention (pipelines/svd/cross_context.py):
``repeat`` as diffusers (the temporal blocks get the clip's states copied over every latent
position, the spatial blocks over every frame), ``temporal`` the temporal cross-attention keys
projected once per clip against the clip's folded queries, ``folded`` that and the spatial
cross-attention likewise. Same maths per query (rounding only), keyed when not the default.

DEFAULT_CROSS_CONTEXT is ``folded``: on one H100 (bench/RESULTS.md, issue 19) it computes the
compiled fp16 reference bit for bit (drift 0.0 on a UNet call, the final latents, frames and
one-step features) and 7.3% faster per UNet call. Versions of that recipe made with ``repeat``
before it was the default carry the same id: both compute the same numbers."""

DEFAULT_CROSS_CONTEXT: CrossContext = "folded"
"""The cross-context setting a version records no key for (see :data:`CrossContext`)."""
CROSS_CONTEXT_HELP = ("repeat (diffusers: text states copied over positions/frames), temporal (temporal "
                      "cross-attention keys projected once per clip) or folded (temporal and spatial, the default); "
                      "rounding only, keyed when not folded")
