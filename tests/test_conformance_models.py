"""Conformance of the decouplers, the aggregator and the action expert to the released S-VAM code.

Every ``decoupler.*``, ``glue.*`` and ``denoiser.*`` output array of the vendored ``svam_tiny``
fixture is recomputed by foresight's production modules (loaded strictly from the fixture's
release-named weights) and must match within SPEC.md's tolerances.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from foresight.pipelines.conformance import group_arrays, load_fixture
from foresight.pipelines.conformance import _models as models
from foresight.trainers.models import objectives
from foresight.trainers.models.decoupler import Decoupler
from foresight.trainers.models.denoiser import GCDenoiser

FIXTURE = Path(__file__).parent / "reference" / "svam_tiny"
INPUTS = {
    "decoupler": {"dpa_target"},
    "glue": {"latent_goal", "ref_dino_teacher", "ref_dpa_teacher"},
    "denoiser": {"actions", "probe_sigmas", "x_probe", "sigma_probe", "density_u01", "train_u01", "train_noise",
                 "x_T"},
}


@pytest.fixture(scope="module")
def fixture():
    torch.set_num_threads(1)
    return load_fixture(FIXTURE)


@pytest.mark.parametrize("group", ["decoupler", "glue", "denoiser"])
def test_every_array_of_the_group_matches_the_release(fixture, group):
    io, config = fixture
    module = importlib.import_module(f"foresight.pipelines.conformance.{group}")
    assert module.GROUP == group and module.applies(io)
    checks = module.check(FIXTURE, io, config)
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
    # Every output array the fixture holds for the group was recomputed (inputs are not outputs).
    assert {c.name for c in checks} == set(group_arrays(io, group)) - INPUTS[group]


def test_the_release_quirks_are_what_the_fixture_pins(fixture):
    """Each foresight fix of a release quirk changes the outputs: the release default is the faithful one."""
    io, config = fixture
    state = torch.from_numpy(io["glue.state_images"])
    goal = torch.from_numpy(io["glue.latent_goal"])
    x, sigma = torch.from_numpy(io["denoiser.x_probe"]), torch.from_numpy(io["denoiser.sigma_probe"])
    ref = io["denoiser.inner_out_probe"]
    weights = models.load_weights(FIXTURE, "denoiser")
    base = models.denoiser(FIXTURE, config).cfg
    c_in = objectives.scalings(sigma, 0.5)[2][:, None, None]
    errors = {}
    for option in ({"cross_attn_mask": "top-left-causal"}, {"cross_attn_mask": "none"},
                   {"modulation": "one-plus-scale"}, {"action_positions": "pos_emb"}):
        model = models.strict_load(GCDenoiser(base.model_copy(update=option)), weights, "fixture")
        with torch.no_grad():
            out = model.network(x * c_in, sigma, model.encode(state, goal)).numpy()
        errors[next(iter(option.values()))] = float(np.abs(out - ref).max())
    assert errors["top-left-causal"] < 1e-5
    assert errors["none"] > 1e-3 and errors["one-plus-scale"] > 1e-3 and errors["pos_emb"] > 1e-3


def test_position_embeddings_variant_keeps_release_names_plus_its_own(fixture):
    """foresight's decoupler variant is the release's module plus two named parameters."""
    io, config = fixture
    release = models.decoupler(FIXTURE, config, "dino")
    variant_cfg = release.cfg.model_copy(update={"position_embeddings": True})
    variant = Decoupler(variant_cfg)
    extra = set(variant.state_dict()) - set(release.state_dict())
    assert extra == {"base_model.pos_space", "base_model.pos_time"}
    assert set(release.state_dict()) <= set(variant.state_dict())
