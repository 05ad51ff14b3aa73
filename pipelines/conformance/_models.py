"""Building foresight's production models from a fixture's config.json and weights (shared by groups).

The fixture's weights carry the release's parameter names; they load strictly into
``trainers.models`` modules. Tensors are float16 on disk and upcast to float32 here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
from foresight.trainers.models.denoiser import DenoiserConfig, GCDenoiser
from foresight.trainers.models.objectives import ObjectiveConfig
from foresight.trainers.models.video_former import VideoFormer3D, VideoFormerConfig


def load_weights(fixture_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """``model_<name>.safetensors`` of the fixture, float32."""
    path = fixture_dir / f"model_{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: missing (the fixture's config.json names it)")
    return {key: value.float() for key, value in load_file(path).items()}


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming the fixture file; eval mode."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where}: does not load strictly ({str(err).splitlines()[0]})") from None
    return module.eval()


def decoupler(fixture_dir: Path, config: dict, which: str) -> Decoupler:
    """The fixture's ``dino`` or ``dpa`` decoupler as a foresight ``Decoupler``."""
    cfg = DecouplerConfig.from_release_kwargs(config["decoupler"][f"{which}_kwargs"])
    return strict_load(Decoupler(cfg), load_weights(fixture_dir, f"decoupler_{which}"),
                       f"{fixture_dir}/model_decoupler_{which}.safetensors")


def video_former(fixture_dir: Path, config: dict) -> VideoFormer3D:
    cfg = VideoFormerConfig.from_release_kwargs(config["glue"]["former_kwargs"])
    return strict_load(VideoFormer3D(cfg), load_weights(fixture_dir, "video_former"),
                       f"{fixture_dir}/model_video_former.safetensors")


def denoiser(fixture_dir: Path, config: dict) -> GCDenoiser:
    cfg = DenoiserConfig.from_release_kwargs(config["denoiser"]["inner_kwargs"])
    return strict_load(GCDenoiser(cfg), load_weights(fixture_dir, "denoiser"),
                       f"{fixture_dir}/model_denoiser.safetensors")


def objective(config: dict, sample_sigma_min: float) -> ObjectiveConfig:
    """The release objective with the fixture's density, sigma_data and sampler settings."""
    section = config["denoiser"]
    density = section["density"]
    if density["type"] != "loglogistic":
        raise ValueError(f"fixture denoiser density {density['type']!r}: only 'loglogistic' is the release's")
    return ObjectiveConfig(kind="release-edm", sigma_data=section["sigma_data"], sigma_min=density["min_value"],
                           sigma_max=density["max_value"], loc=density["loc"], scale=density["scale"],
                           sample_steps=section["num_sampling_steps"], sample_sigma_min=sample_sigma_min)


def features_BTHWC(io: dict[str, np.ndarray], frames: int) -> torch.Tensor:
    """``extract.features[:, :frames]`` in foresight's channels-last layout (B, T, h, w, C)."""
    return torch.from_numpy(io["extract.features"][:, :frames]).permute(0, 1, 3, 4, 2).contiguous()
