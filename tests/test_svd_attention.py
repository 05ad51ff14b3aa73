"""Attention settings of the SVD UNet (pipelines/svd/attention.py) on the tiny model (CPU): every
backend computes the default's attention up to float32 rounding, the features follow, the
compiled graph traces the planned processor, and a non-default setting is keyed and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from factories import make_dataset, write_episode
import svd_world
from foresight.flows.configs import GenerateConfig, PlanConfig, TextConfig
from foresight.flows.generate import generate_flow, make_plan, text_flow, video_params
from foresight.flows.runtime import RunnerChoice, run_flow
from foresight.pipelines.svd import SVDParams, generate_clips, load_svd, one_step_features
from foresight.pipelines.svd.attention import PlannedAttnProcessor, attend, install_attention, pack_factor
from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups
from foresight.schemas.svd import check_attention, parse_attention
from foresight.storage.targets import TargetStore

PARAMS = SVDParams(num_frames=4, size=32, steps=1)
# Settings whose backends run on a CPU (cuDNN and memory-efficient SDPA are CUDA-only).
CPU_SETTINGS = ["short-math", "short-reduce", "short-flex", "math/explicit@16", "flash/flex", "explicit/sdpa@20"]


def unet_inputs(model, batch=2, frames=4):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, frames, model.unet.config.in_channels, 16, 16, generator=g)
    states = torch.randn(batch, 20, model.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(1.5), states, torch.tensor([[3.0, 127.0, 0.02]]).repeat(batch, 1)


def unet_call(model, inputs):
    sample, t, states, ids = inputs
    with torch.no_grad():
        return model.unet(sample, t, encoder_hidden_states=states, added_time_ids=ids, return_dict=False)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def model():
    return load_svd("tiny")


@pytest.fixture(scope="module")
def clips():
    return svd_world.two_clips()


def test_settings_parse_to_a_canonical_plan():
    assert parse_attention("default") is None
    assert check_attention("short-flex") == check_attention("sdpa/packed-flex") == "sdpa/packed-flex@64"
    plan = parse_attention("cudnn/reduce@20")
    assert (plan.backend(20), plan.backend(21)) == ("reduce", "cudnn")
    for bad in ("fast", "sdpa/bogus", "sdpa/flex@", "sdpa"):
        with pytest.raises(ValueError, match="attention setting"):
            parse_attention(bad)
    with pytest.raises(ValueError, match="attention"):
        GenerateConfig(plan="p", text="t", model="tiny", attention="sdpa/bogus")


def test_pack_factor_divides_and_fills_a_tile():
    assert pack_factor(32768, 16) == 8  # 8 x 16 = 128 queries
    assert pack_factor(6, 16) == 6 and pack_factor(7, 16) == 7 and pack_factor(9, 16) == 3
    assert pack_factor(512, 1024) == 1


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash", "explicit", "reduce", "flex", "packed-flex"])
@pytest.mark.parametrize("sequences, queries, keys", [(24, 4, 4), (24, 4, 20), (4, 64, 64)])
def test_every_cpu_backend_is_attention(backend, sequences, queries, keys):
    """Same inputs, laid out as diffusers lays them out: the fp64 reference within fp32 rounding."""
    heads, dim = 2, 16
    g = torch.Generator().manual_seed(1)

    def view(length):
        return torch.randn(sequences, length, heads * dim, generator=g).view(sequences, length, heads, dim).transpose(1, 2)

    q, k, v = view(queries), view(keys), view(keys)
    reference = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel(attend(backend, q, k, v), reference) < 1e-5


def test_default_setting_is_diffusers_processor_bit_for_bit(model):
    inputs = unet_inputs(model)
    reference = unet_call(model, inputs)
    try:
        assert install_attention(model.unet, "sdpa/sdpa") == 40  # 10 transformers x 4 attention layers
        assert all(isinstance(p, PlannedAttnProcessor) for p in model.unet.attn_processors.values())
        assert torch.equal(unet_call(model, inputs), reference)
    finally:
        install_attention(model.unet, "default")
    assert all(type(p) is AttnProcessor2_0 for p in model.unet.attn_processors.values())
    assert torch.equal(unet_call(model, inputs), reference)


@pytest.mark.parametrize("setting", CPU_SETTINGS)
def test_setting_matches_the_default_within_fp32_rounding(model, clips, setting):
    inputs = unet_inputs(model)
    reference, features = unet_call(model, inputs), one_step_features(model, PARAMS, *clips)
    try:
        install_attention(model.unet, setting)
        out = unet_call(model, inputs)
        planned = one_step_features(model, PARAMS, *clips)
    finally:
        install_attention(model.unet, "default")
    assert not torch.equal(out, reference) or setting.startswith("explicit/sdpa")  # another kernel ran
    assert rel(out, reference) < 1e-5
    # features are stored in float16: within its rounding of the default's
    np.testing.assert_allclose(planned.astype(np.float32), features.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_compiled_graph_traces_the_planned_processor(clips):
    """``reduce`` runs its compiled-only formulation inside the graph (aot_eager: the capture
    without generated kernels); the first step's features still reach the generation."""
    eager = generate_clips(load_svd("tiny"), PARAMS, *clips)
    compiled = apply_speedups(load_svd("tiny"), SpeedOptions(compile="unet", compile_backend="aot_eager",
                                                             attention="short-reduce"))
    assert all(p.plan.short == "reduce" for p in compiled.unet.attn_processors.values())
    out = generate_clips(compiled, PARAMS, *clips)
    assert np.array_equal(out.onestep, one_step_features(compiled, PARAMS, *clips))
    np.testing.assert_allclose(out.onestep.astype(np.float32), eager.onestep.astype(np.float32), atol=1e-2)
    assert np.abs(out.frames.astype(int) - eager.frames).max() <= 1


def test_attention_is_keyed_only_when_not_default():
    plain = GenerateConfig(plan="p", text="t", model="tiny")
    assert "attention" not in video_params(plain)  # default versions keep the ids they always had
    planned = GenerateConfig(plan="p", text="t", model="tiny", attention="short-math")
    assert video_params(planned)["attention"] == "sdpa/explicit@64"


def test_setting_is_recorded_in_the_version_manifest(tmp_path):
    root = str(tmp_path)
    store = make_dataset(root, "toy", camera="cam", size=24)
    write_episode(store, "ep0", length=8, camera="cam")
    plan = make_plan(root, PlanConfig(dataset="toy", frames=4, stride=1, every=4, limit=2))
    text = run_flow(text_flow, RunnerChoice(), None, root_url=root,
                    config=TextConfig(plan=plan.plan_id, model="tiny", shard_size=2))
    common = dict(plan=plan.plan_id, text=text.version, model="tiny", params=PARAMS, batch=2, shard_size=2)
    planned = run_flow(generate_flow, RunnerChoice(), None, root_url=root,
                       config=GenerateConfig(**common, attention="short-flex"))
    reader = TargetStore(root).open(planned.version)
    assert reader.manifest.status == "complete"
    assert reader.manifest.recipe.params["attention"] == "sdpa/packed-flex@64"
    default = run_flow(generate_flow, RunnerChoice(), None, root_url=root, config=GenerateConfig(**common))
    assert default.version != planned.version
    assert "attention" not in TargetStore(root).open(default.version).manifest.recipe.params
