"""The S-VAM inference stack as a closed-loop policy, every model at the identity its run recorded.

Per policy call (the paper's real-robot forward, timed the same way):

1. backbone: the observed frame and the instruction's CLIP text states -> the SVD one-step features,
   i.e. the head of the conditional UNet call of the *first* denoising step from the call's noise seed
   -- the same computation :func:`pipelines.svd.one_step_features` and generation's capture run --
   kept on the device;
2. references: each teacher on the observed frame alone (the decouplers' reference anchor);
3. decouplers: one-step features + reference maps -> predicted teacher maps, concatenated per token;
4. action expert: Uni-Perceiver + diffusion policy -> a raw action chunk (K, action_dim).

The instruction's text states are computed once per episode (the paper's breakdown has no text
column; they are constant over an episode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from foresight.pipelines.eval.policy import Observation, Policy, call_seed
from foresight.pipelines.svd import SVDParams
from foresight.pipelines.svd.loading import SVDModel, load_svd
from foresight.pipelines.svd.sampler import one_step_on_device
from foresight.pipelines.teachers import Teacher, load_teacher
from foresight.pipelines.text import TextModel, embed_instructions, load_text_model
from foresight.schemas.eval import PolicyIdentity
from foresight.schemas.model import ModelIdentity



@dataclass
class TeacherSpec:
    """A teacher as its version recorded it: identity, settings (with preprocessing) and dtype."""

    name: str
    identity: ModelIdentity
    settings: dict[str, Any]
    dtype: str


@dataclass
class StackSpec:
    """Every model of the stack as the run's target versions recorded it (read from their manifests)."""

    text: ModelIdentity
    text_max_length: int
    svd: ModelIdentity
    svd_params: SVDParams
    svd_dtype: str
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)

    def model_keys(self) -> dict[str, dict[str, Any]]:
        """Role -> identity key (what the eval id records)."""
        keys = {"text": self.text.key(), "svd": self.svd.key()}
        return keys | {f"teacher.{name}": spec.identity.key() for name, spec in self.teachers.items()}


@dataclass
class StackModels:
    """The loaded models of a stack."""

    text: TextModel
    svd: SVDModel
    teachers: dict[str, Teacher]


def load_stack(spec: StackSpec, device: str) -> tuple[StackModels, list[str]]:
    """Load every model of ``spec`` on ``device``; also returns the roles whose loaded identity differs
    from the recorded one (other weights behind the same spec: a version change)."""
    text = load_text_model(spec.text.spec, device, spec.text.seed or 0)
    svd = load_svd(spec.svd.spec, device, spec.svd_dtype, spec.svd.seed or 0)
    teachers = {name: load_teacher(name, t.identity.spec, t.settings, device, t.dtype)
                for name, t in spec.teachers.items()}
    changed = [role for role, loaded, recorded in
               [("text", text.identity, spec.text), ("svd", svd.identity, spec.svd),
                *[(f"teacher.{n}", teachers[n].identity, t.identity) for n, t in spec.teachers.items()]]
               if loaded.key() != recorded.key()]
    return StackModels(text, svd, teachers), changed


class SVAMPolicy(Policy):
    """Frame + instruction -> one-step features -> decouplers -> Uni-Perceiver + action expert -> chunk."""

    needs_frames = True

    def __init__(self, spec: StackSpec, models: StackModels, expert_task: Any, identity: PolicyIdentity,
                 device: str = "cpu"):
        super().__init__()
        self.spec, self.models, self.expert, self._identity = spec, models, expert_task, identity
        self.device = torch.device(device)
        self.expert.to(self.device)
        self.expert.model.eval()
        if self.device.type == "cuda":
            self.timer.sync = lambda: torch.cuda.synchronize(self.device)
        self.text_LD: np.ndarray | None = None
        self.seed, self.calls = 0, 0
        missing = [t for t in expert_task.decouplers.teachers if t not in models.teachers]
        assert not missing, f"stack has no teacher for decouplers {missing}"

    def identity(self) -> PolicyIdentity:
        return self._identity

    def reset(self, task: str, instruction: str, seed: int) -> None:
        self.text_LD = embed_instructions(self.models.text, [instruction], self.spec.text_max_length)[0]
        self.seed, self.calls = seed, 0

    @torch.no_grad()
    def act(self, obs: Observation) -> np.ndarray:
        assert obs.frame is not None and self.text_LD is not None, "SVAMPolicy needs reset() and frames"
        seed = call_seed(self.seed, self.calls)
        self.calls += 1
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  enabled=self.device.type == "cuda")
        with self.timer("backbone"):
            onestep = one_step_on_device(self.models.svd, self.spec.svd_params, obs.frame[None], self.text_LD[None],
                                         np.array([seed], dtype=np.int64))
        with self.timer("references"):
            frame = torch.from_numpy(np.ascontiguousarray(obs.frame))[None, None]
            references = {name: self.models.teachers[name].encode_frames(frame).to(self.device)
                          for name in self.expert.decouplers.teachers}
        with self.timer("decouplers"), autocast:
            tokens = self.expert.decouplers(onestep.to(self.device), references)
        with self.timer("action_expert"), autocast:
            text = torch.from_numpy(self.text_LD)[None].to(self.device)
            generator = torch.Generator().manual_seed(seed)
            actions = self.expert.model.predict(tokens, text, generator)
        return actions[0].float().cpu().numpy()
