"""Speed paths of the SVD pipeline on the tiny model (CPU): the split UNet, whole-graph
compilation keeping the one-step features, FP8 Linear layers, noise drawn on threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import svd_world
from foresight.pipelines.svd import SVDParams, generate_clips, load_svd, one_step_features
from foresight.pipelines.svd.conditioning import clip_noise
from foresight.pipelines.svd.fp8 import Fp8Linear, quantize_transformer_linears
from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups
from foresight.pipelines.svd.unet_split import UNetSplit

PARAMS = SVDParams(num_frames=4, size=32, steps=1)


@pytest.fixture(scope="module")
def inputs():
    return svd_world.two_clips()


def unet_inputs(model, batch=2, frames=4):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, frames, model.unet.config.in_channels, 16, 16, generator=g)
    states = torch.randn(batch, 20, model.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(1.5), states, torch.tensor([[3.0, 127.0, 0.02]]).repeat(batch, 1)


@pytest.mark.parametrize("last_block", [0, 1, 3])
def test_head_then_tail_is_the_diffusers_forward_bit_for_bit(last_block):
    model = load_svd("tiny")
    sample, t, states, ids = unet_inputs(model)
    with torch.no_grad():
        reference = model.unet(sample, t, encoder_hidden_states=states, added_time_ids=ids, return_dict=False)[0]
        out, features = UNetSplit(model.unet, last_block)(sample, t, states, ids)
        head_only = UNetSplit(model.unet, last_block).features(sample, t, states, ids)
    assert torch.equal(out, reference)
    assert sorted(features) == list(range(last_block + 1))
    assert all(torch.equal(features[i], head_only[i]) for i in features)
    # up_blocks[1] of the tiny UNet: 64 channels at half the 16x16 latent side, per frame
    assert features[0].shape[0] == 2 * 4 and (last_block < 1 or features[1].shape[1:] == (64, 8, 8))


def test_whole_graph_compile_keeps_capture_equal_to_standalone(inputs):
    """The compiled head and tail (graph capture checked with the aot_eager backend, which
    generates no kernels) still hand the first step's features to the generation."""
    eager = generate_clips(load_svd("tiny"), PARAMS, *inputs)
    compiled = apply_speedups(load_svd("tiny"), SpeedOptions(compile="unet", compile_backend="aot_eager"))
    out = generate_clips(compiled, PARAMS, *inputs)
    assert compiled.compile_kwargs["backend"] == "aot_eager"
    assert np.array_equal(out.onestep, one_step_features(compiled, PARAMS, *inputs))
    np.testing.assert_allclose(out.onestep.astype(np.float32), eager.onestep.astype(np.float32), atol=1e-2)
    assert np.abs(out.frames.astype(int) - eager.frames).max() <= 1


def test_fp8_linear_is_close_to_the_float_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64) * torch.logspace(-2, 2, 7).view(1, 7, 1)  # rows of very different scales
    fp8 = Fp8Linear(linear)
    with torch.no_grad():
        ref, out = linear(x), fp8(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert 1e-4 < rel < 0.08  # e4m3 keeps 3 mantissa bits: a few percent, never exact
    fp8.to(torch.float64)  # a dtype cast leaves the quantised weight and its scales alone
    assert fp8.weight_bits.dtype == torch.uint8 and fp8.weight_scale.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(fp8(x.double()), out.double(), rtol=1e-5, atol=1e-5)
    fp8.to(torch.float16)
    zero = fp8(torch.zeros(3, 64, dtype=torch.float16))
    assert torch.isfinite(zero).all() and torch.allclose(zero.float(), linear.bias.float(), atol=1e-2)


def test_fp8_quantizes_only_the_transformer_linears():
    model = load_svd("tiny")
    converted = quantize_transformer_linears(model.unet)
    fp8_names = [n for n, m in model.unet.named_modules() if isinstance(m, Fp8Linear)]
    assert converted == len(fp8_names) > 0
    assert all(".attentions." in n and "time_pos_embed" not in n for n in fp8_names)
    assert isinstance(model.unet.time_embedding.linear_1, torch.nn.Linear)


def test_fp8_precision_generates_with_capture_equal_to_standalone(inputs):
    model = load_svd("tiny", dtype="fp8")
    assert model.precision == "fp8" and model.dtype == torch.float16
    out = generate_clips(model, PARAMS, *inputs, keep_latents=True)
    assert out.onestep.dtype == np.float16 and np.isfinite(out.onestep).all()
    assert out.latents.dtype == np.float32 and np.isfinite(out.latents).all()
    assert np.array_equal(out.onestep, one_step_features(model, PARAMS, *inputs))


def test_threaded_noise_is_each_clips_own_stream():
    seeds = list(range(100, 112))
    latents, images = clip_noise(seeds, (2, 4, 4, 4), (3, 8, 8))
    for index in (0, 7, 11):
        generator = torch.Generator().manual_seed(seeds[index])
        assert torch.equal(latents[index], torch.randn((2, 4, 4, 4), generator=generator))
        assert torch.equal(images[index], torch.randn((3, 8, 8), generator=generator))
