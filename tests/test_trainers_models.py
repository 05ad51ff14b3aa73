"""S-VAM model architectures: reference sizes, shapes, the reference anchor, the EDM sampler, normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from foresight.trainers.models import objectives
from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
from foresight.trainers.models.denoiser import DenoiserConfig
from foresight.trainers.models.layers import count_parameters
from foresight.trainers.models.objectives import ObjectiveConfig
from foresight.trainers.models.policy import ActionExpert, ActionNormalizer, PolicyConfig
from foresight.trainers.models.uniperceiver import UniPerceiverConfig
from foresight.trainers.models.video_former import VideoFormerConfig


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_full_decoupler_dino_branch_has_about_106m_parameters():
    with torch.device("meta"):  # the real architecture, no memory
        dino = Decoupler(DecouplerConfig.preset("full", teacher_channels=768))
        da3 = Decoupler(DecouplerConfig.preset("full", teacher_channels=2048))
    count = count_parameters(dino)
    assert 105.5e6 < count < 107.0e6, count
    assert not hasattr(dino.base_model, "pos_space")  # the release has no positional embeddings
    # The DA3 branch differs only in the output projection (weight + bias) and the anchor (C_teacher 2048).
    delta = (2048 - 768) * (1024 + 1 + 2560)
    assert count_parameters(da3) - count == delta
    assert dino.cfg.hidden == 1024 and dino.cfg.depth == 4 and dino.cfg.heads == 8 and dino.cfg.in_channels == 2560


def test_decoupler_shapes_and_reference_anchor():
    torch.manual_seed(0)
    model = Decoupler(DecouplerConfig.preset("tiny", in_channels=16, teacher_channels=8, frames=3, height=2, width=4))
    model.eval()
    feats, ref = torch.randn(2, 3, 2, 4, 16), torch.randn(2, 1, 2, 4, 8)
    out = model(feats, ref)
    assert out.shape == (2, 3, 2, 4, 8)
    # The anchor is a 1x1 Conv3d of the reference map, the same for every frame, added to the features.
    anchored = model.anchored_input(feats, ref) - feats
    assert torch.allclose(anchored[:, 0], anchored[:, 2], atol=1e-6)
    assert not torch.allclose(model(feats, torch.randn_like(ref)), out)
    with pytest.raises(ValueError, match="reference of shape"):
        model(feats, None)
    with pytest.raises(ValueError, match="features of shape"):
        model(torch.randn(2, 3, 2, 4, 15), ref)


def test_full_uniperceiver_and_policy_dimensions():
    perceiver = UniPerceiverConfig.preset("full")
    assert perceiver.in_channels == 2560 + 768 + 2048 and perceiver.num_latents == 224 and perceiver.dim == 384
    policy = PolicyConfig.preset("full")
    assert (policy.chunk, policy.action_dim, policy.text_dim) == (10, 7, 512)
    model = ActionExpert(perceiver, policy)
    assert count_parameters(model.perceiver) > 10e6 and count_parameters(model.policy) > 10e6
    assert (model.objective.kind, model.objective.sample_steps, model.objective.sample_sigma_min) == ("release-edm", 10, 1.0)


def test_full_release_aggregator_and_denoiser_dimensions():
    former = VideoFormerConfig.preset("full")
    assert (former.in_channels, former.num_latents, former.dim, former.heads * former.dim_head) == (5376, 224, 384, 512)
    denoiser = DenoiserConfig.preset("full", obs_dim=former.dim, cond_tokens=former.num_latents)
    with torch.device("meta"):
        model = ActionExpert(former, denoiser)
    # The release's policy-checkpoint layout: Video_Former.* -> perceiver.*, model.* -> policy.*.
    assert "policy.inner_model.decoder.blocks.3.adaLN_zero.modulation.1.weight" in model.state_dict()
    assert model.state_dict()["policy.inner_model.pos_emb"].shape == (1, 1 + 224 + 10, 384)
    with pytest.raises(ValueError, match="policy expects 224x384 tokens, the aggregator gives 224x32"):
        ActionExpert(VideoFormerConfig.preset("full", dim=32), denoiser)


def _tiny_expert(action_dim: int = 3, arch: str = "foresight", objective: str = "edm") -> ActionExpert:
    if arch == "foresight":
        perceiver = UniPerceiverConfig.preset("tiny", in_channels=20, frames=4)
        policy = PolicyConfig.preset("tiny", action_dim=action_dim, chunk=5, text_dim=6,
                                     cond_tokens=perceiver.num_latents, cond_dim=perceiver.dim)
    else:
        perceiver = VideoFormerConfig.preset("tiny", in_channels=20, frames=4)
        policy = DenoiserConfig.preset("tiny", action_dim=action_dim, chunk=5, goal_dim=6,
                                       cond_tokens=perceiver.num_latents, obs_dim=perceiver.dim)
    return ActionExpert(perceiver, policy, ObjectiveConfig.for_kind(objective))


@pytest.mark.parametrize("arch,objective", [("foresight", "edm"), ("release", "release-edm"), ("release", "edm")])
def test_action_expert_loss_and_sampler(arch, objective):
    torch.manual_seed(0)
    model = _tiny_expert(arch=arch, objective=objective)
    tokens, text, actions = torch.randn(2, 4, 9, 20), torch.randn(2, 3, 6), torch.randn(2, 5, 3)
    loss = model(tokens, text, actions, torch.ones(2, 5, dtype=torch.bool))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.perceiver.latents.grad is not None
    # Every trainable parameter gets a gradient (DDP without find_unused_parameters needs that).
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    first = model.predict(tokens, text[:, 0], torch.Generator().manual_seed(3))
    again = model.predict(tokens, text[:, 0], torch.Generator().manual_seed(3))
    assert first.shape == (2, 5, 3) and torch.equal(first, again)


def test_objective_schedules():
    edm = ObjectiveConfig.for_kind("edm")
    scheduler = objectives.edm_scheduler(edm)
    scheduler.set_timesteps(edm.sample_steps)
    assert len(scheduler.timesteps) == 10 and float(scheduler.sigmas[-1]) == 0.0
    assert float(scheduler.sigmas[-2]) == pytest.approx(0.002)
    release = ObjectiveConfig.for_kind("release-edm")
    sigmas = objectives.exponential_sigmas(release.sample_steps, release.sample_sigma_min, release.sigma_max)
    assert sigmas.shape == (11,) and float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[-2]) == pytest.approx(1.0)
    torch.manual_seed(0)
    drawn = objectives.training_sigmas(release, 4096, torch.device("cpu"))
    assert float(drawn.min()) >= 0.001 and float(drawn.max()) <= 80.0
    assert float(drawn.log().median()) == pytest.approx(math.log(0.5), abs=0.05)  # log-logistic loc ln 0.5


@pytest.mark.parametrize("objective", ["edm", "release-edm"])
def test_masked_rows_do_not_count_in_the_policy_loss(objective):
    cfg = ObjectiveConfig.for_kind(objective)

    def network(scaled, sigma, memory):  # a row-wise stand-in isolates the loss arithmetic from attention
        return scaled * 0.5

    memory, actions = torch.randn(1, 7, 32), torch.randn(1, 5, 3)
    mask = torch.tensor([[True, True, True, False, False]])
    changed = actions.clone()
    changed[:, 3:] += 100.0
    torch.manual_seed(1)
    base = objectives.diffusion_loss(network, cfg, actions, memory, mask)
    torch.manual_seed(1)
    assert torch.allclose(objectives.diffusion_loss(network, cfg, changed, memory, mask), base)
    torch.manual_seed(1)
    assert not torch.allclose(objectives.diffusion_loss(network, cfg, changed, memory, None), base)


def test_action_normalizer_modes_round_trip():
    stats = {"mean": [1.0, -2.0], "std": [2.0, 0.0], "min": [-1.0, -3.0], "max": [3.0, -3.0],
             "q01": [-0.5, -3.0], "q99": [2.5, -3.0]}
    actions = torch.tensor([[0.0, -3.0], [2.5, -3.0]])
    for mode in ("quantile", "minmax", "meanstd"):
        norm = ActionNormalizer(2)
        norm.set_stats(mode, stats)
        assert torch.allclose(norm.denormalize(norm.normalize(actions)), actions)
    norm = ActionNormalizer(2)
    norm.set_stats("quantile", stats)
    assert torch.allclose(norm.normalize(torch.tensor([[-0.5, -3.0], [2.5, -3.0]]))[:, 0], torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="2 elements, the policy has 3"):
        ActionNormalizer(3).set_stats("meanstd", stats)


def test_proprio_token_is_a_named_option_of_the_release_denoiser():
    torch.manual_seed(0)
    perceiver = VideoFormerConfig.preset("tiny", in_channels=20, frames=4)
    policy = DenoiserConfig.preset("tiny", action_dim=3, chunk=5, goal_dim=6, cond_tokens=perceiver.num_latents,
                                   obs_dim=perceiver.dim, proprio_dim=4, proprio="token")
    model = ActionExpert(perceiver, policy)
    tokens, text, actions, state = torch.randn(2, 4, 9, 20), torch.randn(2, 6), torch.randn(2, 5, 3), torch.randn(2, 4)
    assert model.reads_proprio and model.memory(tokens, text, state).shape == (2, 1 + 1 + 8, 32)
    loss = model(tokens, text, actions, None, state)
    loss.backward()
    assert model.policy.inner_model.proprio_emb[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reads proprioception"):
        model(tokens, text, actions)
    release = ActionExpert(perceiver, policy.model_copy(update={"proprio": "unused"}))
    assert not release.reads_proprio and release.memory(tokens, text).shape == (2, 1 + 8, 32)
