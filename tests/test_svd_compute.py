"""SVD generation and one-step features on the tiny model (CPU, 32x32 frames, 4 frames, 2 steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import svd_world
from foresight.pipelines.svd import SVDParams, clip_seed, generate_clips, load_svd, one_step_features, save_svd
from foresight.pipelines.svd.conditioning import clip_noise, text_states
from foresight.pipelines.svd.features import feature_shape
from foresight.pipelines.svd.loading import describe_svd

PARAMS = SVDParams(num_frames=4, size=32, steps=2)


@pytest.fixture(scope="module")
def model():
    return load_svd("tiny")


@pytest.fixture(scope="module")
def inputs():
    frames, text = svd_world.random_clips(0, 3, height=40, width=48)
    seeds = np.array([clip_seed("video-abc", f"clip{i}") for i in range(3)], dtype=np.int64)
    return frames, text, seeds


@pytest.fixture(scope="module")
def generated(model, inputs):
    return generate_clips(model, PARAMS, *inputs)


def test_shapes_and_dtypes(model, generated):
    desc = describe_svd("tiny")
    h, w, c = feature_shape(desc.unet_config, desc.vae_config, PARAMS.size, PARAMS.feature_blocks)
    assert generated.frames.dtype == np.uint8 and generated.frames.shape == (3, 4, 32, 32, 3)
    assert generated.onestep.dtype == np.float16 and generated.onestep.shape == (3, 4, h, w, c)
    # tiny: up_blocks[0] 64 ch at 4x4 upsampled to up_blocks[1]'s 8x8, 64 ch
    assert (h, w, c) == (8, 8, 128)
    assert np.isfinite(generated.onestep).all()
    assert generated.frames.std() > 0


def test_full_size_feature_shape_is_the_s_vam_layout():
    desc = describe_svd("random")
    assert feature_shape(desc.unet_config, desc.vae_config, 256, [0, 1]) == (16, 16, 2560)


def test_same_seed_same_bytes(model, inputs, generated):
    again = generate_clips(model, PARAMS, *inputs)
    assert again.frames.tobytes() == generated.frames.tobytes()
    assert again.onestep.tobytes() == generated.onestep.tobytes()


def test_other_seed_other_features(model, inputs, generated):
    frames, text, seeds = inputs
    other = one_step_features(model, PARAMS, frames, text, seeds + 1)
    assert not np.array_equal(other, generated.onestep)


def test_capture_equals_standalone_extraction(model, inputs, generated):
    standalone = one_step_features(model, PARAMS, *inputs)
    assert standalone.dtype == np.float16
    assert np.array_equal(standalone, generated.onestep)


def test_single_clip_standalone_matches_batched(model, inputs, generated):
    frames, text, seeds = inputs
    single = one_step_features(model, PARAMS, frames[1], text[1], int(seeds[1]))
    assert single.shape == generated.onestep.shape[1:]
    np.testing.assert_allclose(single.astype(np.float32), generated.onestep[1].astype(np.float32), atol=2e-3)


def test_clip_noise_does_not_depend_on_the_batch():
    alone = clip_noise([7], (2, 4, 4, 4), (3, 8, 8))
    batched = clip_noise([5, 7], (2, 4, 4, 4), (3, 8, 8))
    assert torch.equal(alone[0][0], batched[0][1]) and torch.equal(alone[1][0], batched[1][1])


def test_clip_seed_is_stable_and_distinct():
    seed = clip_seed("video-0123456789ab", "ep0-000008")
    assert seed == clip_seed("video-0123456789ab", "ep0-000008")
    assert 0 <= seed < 2**63
    assert seed != clip_seed("video-0123456789ab", "ep0-000016")
    assert seed != clip_seed("video-ba9876543210", "ep0-000008")


def test_text_width_must_match_the_unet(model):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        text_states(model, np.zeros((1, 20, 512), dtype=np.float32), position_encoding=True)


def test_text_states_are_duplicated(model):
    states = np.arange(2 * 20 * 16, dtype=np.float32).reshape(2, 20, 16)
    out = text_states(model, states, position_encoding=False).float().numpy()
    assert out.shape == (2, 20, 32)
    np.testing.assert_array_equal(out[..., :16], out[..., 16:])
    np.testing.assert_array_equal(out[..., :16], states)


def test_bad_feature_block_is_named(model):
    with pytest.raises(ValueError, match="feature block 9"):
        model.split([0, 9])


def test_dir_round_trip_records_digests_and_reproduces(model, inputs, generated, tmp_path):
    save_svd(model, tmp_path / "svd")
    loaded = load_svd(f"dir:{tmp_path / 'svd'}")
    identity = loaded.identity
    assert identity.source == "dir" and identity.is_real
    assert set(identity.weights_sha256) == {"unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors"}
    assert all(len(d) == 64 for d in identity.weights_sha256.values())
    assert np.array_equal(one_step_features(loaded, PARAMS, *inputs), generated.onestep)


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_svd(f"dir:{tmp_path / 'nothing'}")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="no 'vae/' folder"):
        load_svd(f"dir:{tmp_path / 'partial'}")


def test_hf_spec_resolves_through_the_offline_hub_cache(model, inputs, generated, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-svd"
    save_svd(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_svd("hf:acme/tiny-svd@main")
    assert loaded.identity.source == "hf" and loaded.identity.ref == "acme/tiny-svd"
    assert loaded.identity.revision == "main" and len(loaded.identity.weights_sha256) == 2
    assert np.array_equal(one_step_features(loaded, PARAMS, *inputs), generated.onestep)
    with pytest.raises(ValueError, match="cannot resolve hub snapshot"):
        load_svd("hf:acme/not-cached")


@pytest.mark.gpu
@pytest.mark.parametrize("scope,dtype", [("blocks", "fp16"), ("unet", "fp16"), ("unet", "fp8")])
def test_compiled_keeps_capture_equal_to_standalone_on_gpu(inputs, scope, dtype):
    from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups

    compiled = apply_speedups(load_svd("tiny", "cuda", dtype), SpeedOptions(compile=scope))
    out = generate_clips(compiled, PARAMS, *inputs)
    again = generate_clips(compiled, PARAMS, *inputs)
    assert np.array_equal(out.onestep, one_step_features(compiled, PARAMS, *inputs))
    assert out.frames.tobytes() == again.frames.tobytes()
