"""π0-family policies (a Shallow-π student or its π0 teacher) through their flow-matching chunk sampler.

The observation is assembled exactly as the pi0 targets stage assembled training samples
(:func:`pipelines.pi0.assemble_sample` with the version's recorded parameters: image size, state
indices, normalisation, tokenizer, text length), the model samples a (50, 32) chunk with its own
10-step Euler integration from noise of the call's seed, and the chunk is de-normalised with the
recorded action statistics and cut to MetaWorld's 4 action dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from foresight.pipelines import pi0
from foresight.pipelines.eval.policy import Observation, Policy, call_seed
from foresight.schemas.eval import PolicyIdentity



def denormalize_actions(actions_KD: np.ndarray, params: pi0.Pi0TargetParams, action_dim: int) -> np.ndarray:
    """Model-space actions (K, max_dim) -> raw (K, action_dim): the inverse of ``prepare_vector``."""
    actions = np.asarray(actions_KD[:, :action_dim], dtype=np.float64)
    stats = params.normalization.get("action")
    if stats:
        actions = actions * (np.asarray(stats["std"]) + 1e-8) + np.asarray(stats["mean"])
    return actions.astype(np.float32)


class ChunkSamplerPolicy(Policy):
    """Frame + state + instruction -> π0 sample (as stored by the pi0 stage) -> sampled action chunk."""

    needs_frames = True

    def __init__(self, model: Any, params: pi0.Pi0TargetParams, tokenizer: Any | None, identity: PolicyIdentity,
                 device: str = "cpu", action_dim: int = 4):
        super().__init__()
        if len(params.cameras) != 1:
            raise ValueError(f"{identity.label()}: trained on cameras {params.cameras}; a MetaWorld eval renders one")
        self.model = model.to(device).eval()
        self.params, self.tokenizer, self._identity = params, tokenizer, identity
        self.device, self.action_dim = torch.device(device), action_dim
        self.dtype = next(model.parameters()).dtype
        if self.device.type == "cuda":
            self.timer.sync = lambda: torch.cuda.synchronize(self.device)
        self.seed, self.calls = 0, 0

    def identity(self) -> PolicyIdentity:
        return self._identity

    def reset(self, task: str, instruction: str, seed: int) -> None:
        self.seed, self.calls = seed, 0

    @torch.no_grad()
    def act(self, obs: Observation) -> np.ndarray:
        from foresight.trainers.shallow_pi import sample_chunk

        assert obs.frame is not None, "ChunkSamplerPolicy needs frames"
        seed = call_seed(self.seed, self.calls)
        self.calls += 1
        with self.timer("preprocess"):
            placeholder = np.zeros((1, self.action_dim), np.float32)  # a sample needs actions; none are known
            sample = pi0.assemble_sample(obs.frame[None], obs.instruction, obs.state, placeholder, self.params,
                                         self.tokenizer, pi0.model_family(self.model))
            arrays = {name: torch.from_numpy(np.asarray(value))[None] for name, value in sample.items()}
            batch = pi0.make_batch(arrays, pi0.unwrap(self.model).config, self.device, self.dtype)
        with self.timer("sampler"):
            chunk = sample_chunk(self.model, batch, np.array([seed], dtype=np.int64))
        return denormalize_actions(chunk[0].float().cpu().numpy(), self.params, self.action_dim)
