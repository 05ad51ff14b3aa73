"""Group ``glue``: the policy's aggregator input and ``Video_Former_3D`` (SPEC.md section 3).

The per-token concatenation [one-step | DINO prediction | DA3 prediction] is built by the action
expert's own ``FrozenDecouplers`` from foresight's recomputed decoupler outputs, then aggregated by
``trainers.models.video_former.VideoFormer3D``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from foresight.pipelines.conformance import ArrayCheck, compare
from foresight.pipelines.conformance import _models as models
from foresight.trainers.action_expert import FrozenDecouplers
from foresight.trainers.models.decoupler import tokens_to_grid

GROUP = "glue"


def applies(io: dict[str, np.ndarray]) -> bool:
    return "glue.state_images" in io


@torch.no_grad()
def check(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    """Recompute ``state_images`` from the extraction features and the two teachers' references."""
    former = models.video_former(fixture_dir, config)
    dino, dpa = models.decoupler(fixture_dir, config, "dino"), models.decoupler(fixture_dir, config, "dpa")
    frames = config["glue"].get("Former_num_time_embeds", former.cfg.frames)
    references = {
        "dino": torch.from_numpy(io["glue.ref_dino_teacher"]),
        "dpa": tokens_to_grid(torch.from_numpy(io["glue.ref_dpa_teacher"]), dpa.cfg.height, dpa.cfg.width),
    }
    tokens_BTNC = FrozenDecouplers([dino, dpa], ["dino", "dpa"])(models.features_BTHWC(io, frames), references)
    state_images = former(tokens_BTNC)
    return [compare(GROUP, "state_images", state_images.numpy(), io["glue.state_images"], 1e-4, 1e-4)]
