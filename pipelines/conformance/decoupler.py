"""Group ``decoupler``: the DINO and DA3 decouplers (SPEC.md section 2) through ``trainers.models.decoupler``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from foresight.pipelines.conformance import ArrayCheck, compare
from foresight.pipelines.conformance import _models as models

GROUP = "decoupler"
OUT_TOL = (1e-4, 1e-4)


def applies(io: dict[str, np.ndarray]) -> bool:
    return "decoupler.dino_out" in io or "decoupler.dpa_out" in io


@torch.no_grad()
def check(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    """Recompute dino_ref, dpa_ref (from the glue teachers), dino_out, dpa_out and dpa_loss."""
    results: list[ArrayCheck] = []
    if "decoupler.dino_out" in io:
        results += _dino(fixture_dir, io, config)
    if "decoupler.dpa_out" in io:
        results += _dpa(fixture_dir, io, config)
    return results


def _dino(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    model = models.decoupler(fixture_dir, config, "dino")
    results = []
    reference_B1HWC = torch.from_numpy(io["decoupler.dino_ref"]).permute(0, 2, 3, 4, 1)
    if "glue.ref_dino_teacher" in io:  # the policy permutes DINOv2's channels-last map of frame 0
        ref_BC1HW = torch.from_numpy(io["glue.ref_dino_teacher"]).permute(0, 4, 1, 2, 3)
        results.append(compare(GROUP, "dino_ref", ref_BC1HW.numpy(), io["decoupler.dino_ref"], 0.0, 0.0))
    out_BTHWC = model(models.features_BTHWC(io, model.cfg.frames), reference_B1HWC)
    results.append(compare(GROUP, "dino_out", out_BTHWC.permute(0, 4, 1, 2, 3).numpy(),
                           io["decoupler.dino_out"], *OUT_TOL))
    return results


def _dpa(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    model = models.decoupler(fixture_dir, config, "dpa")
    results = []
    if "glue.ref_dpa_teacher" in io:  # DA3's stage-0 tokens of frame 0 pass unchanged
        results.append(compare(GROUP, "dpa_ref", io["glue.ref_dpa_teacher"], io["decoupler.dpa_ref"], 0.0, 0.0))
    out_BTNC = model.forward_tokens(models.features_BTHWC(io, model.cfg.frames),
                                    torch.from_numpy(io["decoupler.dpa_ref"]))
    results.append(compare(GROUP, "dpa_out", out_BTNC.numpy(), io["decoupler.dpa_out"], *OUT_TOL))
    if "decoupler.dpa_target" in io:
        loss = torch.nn.functional.mse_loss(out_BTNC, torch.from_numpy(io["decoupler.dpa_target"]))
        results.append(compare(GROUP, "dpa_loss", loss.reshape(1).numpy(), io["decoupler.dpa_loss"], 0.0, 1e-5))
    return results
