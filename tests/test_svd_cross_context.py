"""The folded cross-attention context of the SVD UNet (pipelines/svd/cross_context.py) on the tiny
model (CPU, fp32): ``temporal`` and ``folded`` compute diffusers' ``repeat`` numbers up to float32
rounding under every attention setting (a UNet call, the one-step head, a few-step generation),
under FP8 and in a whole-graph compile without graph breaks; a non-default setting is keyed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

from typer.testing import CliRunner

import svd_world
from foresight.flows.cli import app
from foresight.flows.configs import GenerateConfig
from foresight.flows.generate import cached_svd, svd_settings, video_params
from foresight.pipelines.svd import SVDParams, generate_clips, load_svd, one_step_features
from foresight.pipelines.svd.attention import install_attention
from foresight.pipelines.svd.cross_context import FoldedAllTransformer, FoldedTransformer, install_cross_context
from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups
from foresight.schemas.svd import DEFAULT_CROSS_CONTEXT

PARAMS = SVDParams(num_frames=4, size=32, steps=2)
FEATURE_BLOCKS = PARAMS.feature_blocks
# The default and every attention setting whose backends run on a CPU (tests/test_svd_attention.py).
ATTENTION_SETTINGS = ["default", "short-math", "short-reduce", "short-flex", "math/explicit@16", "flash/flex",
                      "explicit/sdpa@20"]
# The sampler amplifies float32 rounding: on this model any change of attention kernel moves the final
# latents of 2 guided steps by about 2e-5 relative (short-math against default: 1.8e-5), a UNet call by 1e-6.
LATENTS_RTOL = 5e-5


def unet_inputs(model, batch=2, frames=4):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, frames, model.unet.config.in_channels, 16, 16, generator=g)
    states = torch.randn(batch, 20, model.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(1.5), states, torch.tensor([[3.0, 127.0, 0.02]]).repeat(batch, 1)


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).norm() / b.norm())


def outputs(model, clips) -> dict:
    """A UNet call, the head's features (float32), the one-step features (float16) and a 2-step generation."""
    inputs = unet_inputs(model)
    with torch.no_grad():
        call = model.unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], added_time_ids=inputs[3],
                          return_dict=False)[0]
        head = model.split(FEATURE_BLOCKS).features(*inputs)
    generated = generate_clips(model, PARAMS, *clips, keep_latents=True)
    return {"call": call, "head": torch.cat([f.flatten() for f in head.values()]),
            "onestep": one_step_features(model, PARAMS, *clips), "generated": generated}


def assert_close(out: dict, ref: dict) -> None:
    assert rel(out["call"], ref["call"]) < 1e-5
    assert rel(out["head"], ref["head"]) < 1e-5
    assert rel(out["generated"].latents, ref["generated"].latents) < LATENTS_RTOL
    assert np.abs(out["generated"].frames.astype(int) - ref["generated"].frames).max() <= 1
    # one-step features are stored in float16: within its rounding of repeat's
    np.testing.assert_allclose(out["onestep"].astype(np.float32), ref["onestep"].astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    assert np.array_equal(out["generated"].onestep, out["onestep"])  # capture == standalone head


@pytest.fixture(scope="module")
def model():
    return load_svd("tiny")


@pytest.fixture(scope="module")
def clips():
    return svd_world.two_clips()


def test_install_changes_only_the_transformer_class(model):
    keys = list(model.unet.state_dict())
    try:
        assert install_cross_context(model.unet, "temporal") == 10  # 10 spatio-temporal transformers
        transformers = [m for m in model.unet.modules() if isinstance(m, TransformerSpatioTemporalModel)]
        assert all(type(m) is FoldedTransformer for m in transformers)
        install_cross_context(model.unet, "folded")
        assert all(type(m) is FoldedAllTransformer for m in transformers)
        assert list(model.unet.state_dict()) == keys
    finally:
        install_cross_context(model.unet, "repeat")
    assert all(type(m) is TransformerSpatioTemporalModel for m in transformers)
    with pytest.raises(ValueError, match="cross-context setting 'fold'"):
        install_cross_context(model.unet, "fold")


def test_a_chunked_feed_forward_is_refused():
    unet = load_svd("tiny").unet
    unet.down_blocks[0].attentions[0].temporal_transformer_blocks[0].set_chunk_feed_forward(2)
    with pytest.raises(ValueError, match="down_blocks.0.attentions.0: temporal block 0 has a chunked"):
        install_cross_context(unet, "temporal")


@pytest.mark.parametrize("attention", ATTENTION_SETTINGS)
def test_folded_matches_repeat_under_every_attention_setting(model, clips, attention):
    """``folded`` (with ``default`` also ``temporal``, whose code it contains) against ``repeat``."""
    try:
        install_attention(model.unet, attention)
        model._splits.clear()
        reference = outputs(model, clips)
        for setting in ["temporal", "folded"] if attention == "default" else ["folded"]:
            install_cross_context(model.unet, setting)
            model._splits.clear()
            assert_close(outputs(model, clips), reference)
    finally:
        install_cross_context(model.unet, "repeat")
        install_attention(model.unet, "default")
        model._splits.clear()


@pytest.mark.slow
def test_folded_composes_with_fp8(clips):
    model = load_svd("tiny", dtype="fp8")
    reference = generate_clips(model, PARAMS, *clips, keep_latents=True)
    install_cross_context(model.unet, "folded")
    folded = generate_clips(model, PARAMS, *clips, keep_latents=True)
    # float16 activations: each query row is quantised and multiplied as in repeat's layout
    assert rel(folded.latents, reference.latents) < 1e-3
    assert np.abs(folded.frames.astype(int) - reference.frames).max() <= 1
    np.testing.assert_allclose(folded.onestep.astype(np.float32), reference.onestep.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_folded_compiles_as_whole_graphs_without_breaks(clips):
    """Both UNet halves compile with ``fullgraph=True`` (a graph break would raise) through
    aot_eager, the graph capture without generated kernels, and compute the eager numbers."""
    eager = generate_clips(load_svd("tiny"), PARAMS, *clips, keep_latents=True)
    compiled = apply_speedups(load_svd("tiny"), SpeedOptions(cross_context="folded", attention="short-reduce"))
    compiled.compile_unet({"backend": "aot_eager", "dynamic": False, "fullgraph": True})
    out = generate_clips(compiled, PARAMS, *clips, keep_latents=True)
    assert rel(out.latents, eager.latents) < LATENTS_RTOL
    assert np.array_equal(out.onestep, one_step_features(compiled, PARAMS, *clips))


def test_cross_context_is_keyed_only_when_not_the_default():
    plain = GenerateConfig(plan="p", text="t", model="tiny")
    assert plain.cross_context == DEFAULT_CROSS_CONTEXT == "folded"
    assert "cross_context" not in video_params(plain)  # default versions keep the ids they always had
    repeat = GenerateConfig(plan="p", text="t", model="tiny", cross_context="repeat")
    params = video_params(repeat)
    assert params["cross_context"] == "repeat"
    settings, dtype = svd_settings(params)
    assert SVDParams(**settings) == plain.params and dtype == "fp32"
    with pytest.raises(ValueError, match="cross_context"):
        GenerateConfig(plan="p", text="t", model="tiny", cross_context="fold")


def test_the_generate_option_reaches_the_loaded_model(monkeypatch, tmp_path):
    """``foresight generate --cross-context repeat`` builds its config and the flow's model loader
    keeps diffusers' transformers; the default installs the folded ones."""
    built = []

    def capture(*args, config=None, **kwargs):
        built.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("foresight.flows.runtime.run_flow", capture)
    for option, expected in ((["--cross-context", "repeat"], TransformerSpatioTemporalModel), ([], FoldedAllTransformer)):
        built.clear()
        result = CliRunner().invoke(app, ["generate", "--plan", "p", "--text", "t", "--model", "tiny", *option,
                                          "--root", str(tmp_path)])
        assert result.exit_code == 0 and built[0].cross_context == (option[1:] or ["folded"])[0], result.output
        unet = cached_svd(built[0]).unet
        assert {type(m) for m in unet.modules() if isinstance(m, TransformerSpatioTemporalModel)} == {expected}
