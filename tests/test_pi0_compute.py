"""π0 teacher targets and the Shallow-π student: pure compute on a tiny 4-layer teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foresight.pipelines import pi0, pi0_static
from foresight.trainers import shallow_pi

VERSION = "pi0-000000000000"


@pytest.fixture(scope="module")
def teacher():
    return pi0.load_pi0("tiny", tiny_layers=4).model


def make_params(**overrides) -> pi0.Pi0TargetParams:
    values = dict(cameras=["front"], tokenizer="bytes", image_size=28, pairs=3, attn_layers=[1, 2],
                  attn_dtype="float32", max_text_tokens=24)
    values.update(overrides)
    return pi0.Pi0TargetParams(**values)


def make_samples(params: pi0.Pi0TargetParams, count: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    samples = []
    for i in range(count):
        images = rng.integers(0, 256, size=(1, 40, 48, 3), dtype=np.uint8)
        actions = rng.normal(size=(50 - 15 * i, 4))  # later samples run into the episode end
        samples.append(pi0.assemble_sample(images, "put the block in the drawer" + " now" * i,
                                           rng.normal(size=9), actions, params, None))
    return pi0.stack_samples(samples)


def test_uniform_layer_map_matches_reference():
    assert pi0.uniform_layer_map(18, 6) == [0, 3, 7, 10, 14, 17]
    assert pi0.uniform_layer_map(4, 2) == [0, 3]
    assert pi0.uniform_layer_map(4, 4) == [0, 1, 2, 3]
    assert pi0.default_attn_layers(18) == [3, 7, 10, 14]
    with pytest.raises(ValueError, match="between 1"):
        pi0.uniform_layer_map(4, 5)


def test_student_layers_are_the_mapped_teacher_layers_in_both_stacks(teacher):
    student, layer_map = shallow_pi.build_student(teacher, 2)
    assert layer_map == [0, 3]
    stacks = [(student.model.vlm.language_model.layers, teacher.model.vlm.language_model.layers),
              (student.model.dit.layers, teacher.model.dit.layers)]
    for student_stack, teacher_stack in stacks:
        assert len(student_stack) == 2
        for i, t_layer in enumerate(layer_map):
            s_state, t_state = student_stack[i].state_dict(), teacher_stack[t_layer].state_dict()
            assert s_state.keys() == t_state.keys()
            assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
        # The public reference's defect kept the first L_S VLM layers: layer 1 must NOT be teacher layer 1.
        assert not torch.equal(student_stack[1].self_attn.q_proj.weight, teacher_stack[1].self_attn.q_proj.weight)
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if not name.startswith(shallow_pi.STACK_PREFIXES):
            assert torch.equal(tensor, teacher_state[name]), name


def test_full_depth_student_reproduces_teacher_velocity_exactly(teacher):
    params = make_params()
    samples = make_samples(params)
    student, layer_map = shallow_pi.build_student(teacher, 4)
    assert layer_map == [0, 1, 2, 3]
    arrays = pi0.compute_targets(teacher, samples, ["a", "b", "c"], VERSION, params)
    batch = pi0.make_batch(samples, student.config)
    for k in range(params.pairs):
        noise = pi0.noise_from_seeds(arrays["noise_seed"][:, k])
        with torch.no_grad():
            velocity, _ = pi0.pi0_forward(student, batch, torch.from_numpy(arrays["t"][:, k]), noise, [])
        assert torch.equal(velocity, torch.from_numpy(arrays["velocity"][:, k]))
    noise = torch.randn(3, 50, 32, generator=torch.Generator().manual_seed(1))
    chunk_kwargs = dict(state=batch.state, input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                        attention_mask=batch.attention_mask, pixel_attention_mask=batch.pixel_attention_mask)
    assert torch.equal(student.sample_actions(noise=noise.clone(), **chunk_kwargs),
                       teacher.sample_actions(noise=noise.clone(), **chunk_kwargs))


@pytest.mark.parametrize("attn_dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_attention_rows_sum_to_one_over_vl_keys(teacher, attn_dtype, tolerance):
    params = make_params(attn_dtype=attn_dtype)
    samples = make_samples(params)
    arrays = pi0.compute_targets(teacher, samples, ["a", "b", "c"], VERSION, params)
    shapes = pi0.array_shapes(params, teacher.config)
    assert {name: (arrays[name].shape[1:], str(arrays[name].dtype)) for name in arrays} == shapes
    num_keys = pi0.prefix_length(teacher.config, 1, params.max_text_tokens)
    assert arrays["attn"].shape == (3, params.pairs, 2, 50, num_keys)
    row_sums = arrays["attn"].astype(np.float64).sum(-1)
    np.testing.assert_allclose(row_sums, 1.0, atol=tolerance)
    # Padded instruction tokens are keys without mass; real ones have some.
    image_tokens = pi0.tokens_per_image(teacher.config)
    text_mask = np.concatenate([np.ones((3, image_tokens)), samples["text_mask"]], axis=1).astype(bool)
    assert np.all(arrays["attn"][~text_mask[:, None, None, None, :].repeat(params.pairs, 1)
                                 .repeat(2, 2).repeat(50, 3)] == 0)
    assert np.all(arrays["attn"][:, :, :, :, :image_tokens] > 0)
    assert np.array_equal(arrays["attn_layers"], np.array([[1, 2]] * 3, dtype=np.int16))


def test_pairs_are_fixed_per_version_and_sample():
    t_a, s_a = pi0.fixed_pairs(VERSION, "clip-1", 4)
    t_b, s_b = pi0.fixed_pairs(VERSION, "clip-1", 4)
    t_c, s_c = pi0.fixed_pairs("pi0-111111111111", "clip-1", 4)
    assert np.array_equal(t_a, t_b) and np.array_equal(s_a, s_b)
    assert not np.array_equal(t_a, t_c) and not np.array_equal(s_a, s_c)
    assert t_a.dtype == np.float32 and np.all((t_a >= 0.001) & (t_a <= 1.0))
    assert np.array_equal(pi0.pair_times(s_a), t_a)  # t is recovered from the integer seed alone
    many = pi0.beta_times(np.random.default_rng(0), 20000)
    # Beta(1.5, 1) has mean 0.6 -> 0.6 * 0.999 + 0.001.
    assert abs(float(many.mean()) - (0.6 * 0.999 + 0.001)) < 0.01
    assert torch.equal(pi0.noise_from_seeds(s_a), pi0.noise_from_seeds(s_b))


def test_sample_assembly_pads_masks_and_normalises():
    params = make_params(normalization={"action": {"mean": [1.0] * 4, "std": [2.0] * 4}}, state_indices=[0, 2])
    actions = np.arange(30 * 4, dtype=np.float64).reshape(30, 4)
    sample = pi0.assemble_sample(np.zeros((1, 28, 28, 3), np.uint8), "go", np.array([5.0, 6.0, 7.0]),
                                 actions, params, None)
    assert sample["state"][:3].tolist() == [5.0, 7.0, 0.0]
    assert sample["actions"].shape == (50, 32)
    np.testing.assert_allclose(sample["actions"][0, :4], (actions[0] - 1.0) / (2.0 + 1e-8), rtol=1e-3)
    # float16-exact, so an f16 export carries the teacher's inputs bit for bit
    assert np.array_equal(sample["actions"].astype(np.float16).astype(np.float32), sample["actions"])
    np.testing.assert_allclose(sample["actions"][40, :4], sample["actions"][29, :4])  # repeats the last
    assert sample["action_mask"][:30, :4].all() and not sample["action_mask"][30:].any()
    assert not sample["action_mask"][:, 4:].any()
    assert sample["text_mask"].sum() == 1 + len("go\n")
    with pytest.raises(ValueError, match="more than"):
        pi0.assemble_sample(np.zeros((1, 28, 28, 3), np.uint8), "go", np.zeros(40), actions,
                            make_params(), None)


def test_losses_are_zero_when_the_student_is_the_teacher(teacher):
    params = make_params()
    samples = make_samples(params)
    arrays = pi0.compute_targets(teacher, samples, ["a", "b", "c"], VERSION, params)
    student, layer_map = shallow_pi.build_student(teacher, 4)
    batch = pi0.make_batch(samples, student.config)
    student_layers = shallow_pi.middle_layers(4)
    teacher_layers = [layer_map[i] for i in student_layers]
    targets = shallow_pi.offline_targets(arrays, np.array([0, 2, 1]), teacher_layers, "cpu")
    losses = shallow_pi.distill_losses(student, batch, targets, student_layers, lambda_kd=1.0, lambda_attn=1.0)
    assert losses["kd"].item() == 0.0
    assert abs(losses["attn"].item()) < 1e-6
    assert losses["task"].item() > 0.0


def test_offline_and_online_give_the_same_first_step_loss(teacher):
    params = make_params()
    samples = make_samples(params)
    arrays = pi0.compute_targets(teacher, samples, ["a", "b", "c"], VERSION, params)
    student, layer_map = shallow_pi.build_student(teacher, 3)  # map [0, 2, 3], middle student layer 1 -> 2
    student_layers = shallow_pi.middle_layers(3)
    teacher_layers = [layer_map[i] for i in student_layers]
    assert teacher_layers == [2]
    batch = pi0.make_batch(samples, student.config)
    pair_index = np.array([1, 0, 2])
    offline = shallow_pi.offline_targets(arrays, pair_index, teacher_layers, "cpu")
    online = shallow_pi.online_targets(teacher, batch, offline.t_B.clone(), offline.noise_BAD.clone(),
                                       teacher_layers)
    loss_offline = shallow_pi.distill_losses(student, batch, offline, student_layers, 0.5, 2.0)
    loss_online = shallow_pi.distill_losses(student, batch, online, student_layers, 0.5, 2.0)
    for name in ("task", "kd", "attn", "total"):
        assert torch.equal(loss_offline[name], loss_online[name]), name
    assert loss_offline["kd"].item() > 0 and loss_offline["attn"].item() > 0


def test_missing_cached_attention_layer_is_a_clear_error(teacher):
    params = make_params(attn_layers=[1])
    samples = make_samples(params, count=1)
    arrays = pi0.compute_targets(teacher, samples, ["a"], VERSION, params)
    with pytest.raises(ValueError, match=r"teacher layers \[2\] are not among the cached attention layers \[1\]"):
        shallow_pi.offline_targets(arrays, np.array([0]), [2], "cpu")


def test_dir_checkpoint_round_trip(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "pi0")
    loaded = pi0.load_pi0(f"dir:{tmp_path / 'pi0'}")
    assert loaded.identity.is_real and loaded.identity.weights_sha256
    assert loaded.tokenizer is None and loaded.tokenizer_kind == "bytes"
    for (name, a), (_, b) in zip(teacher.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="no config.json"):
        pi0.load_pi0(f"dir:{tmp_path / 'missing'}")


@pytest.mark.parametrize("attention", pi0_static.ATTENTION)
def test_static_chunk_sampler_matches_transformers(teacher, attention):
    params = make_params(cameras=["front", "wrist"])
    rng = np.random.default_rng(2)
    samples = pi0.stack_samples([
        pi0.assemble_sample(rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8), "open" * (i + 1),
                            rng.normal(size=5), rng.normal(size=(50, 4)), params, None) for i in range(2)])
    student, _ = shallow_pi.build_student(teacher, 2)
    for model in (teacher, student):
        batch = pi0.make_batch(samples, model.config)
        inputs = dict(state=batch.state, input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                      pixel_attention_mask=batch.pixel_attention_mask, attention_mask=batch.attention_mask)
        noise = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(4))
        reference = model.sample_actions(noise=noise.clone(), **inputs)
        chunk = pi0_static.sample_chunk(model, noise=noise.clone(), attention=attention, **inputs)
        torch.testing.assert_close(chunk, reference, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_chunk_equals_the_eager_chunk(teacher):
    model = pi0.load_pi0("tiny", device="cuda").model
    params = make_params()
    batch = pi0.make_batch(make_samples(params, count=1), model.config, "cuda")
    inputs = dict(state=batch.state, input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                  pixel_attention_mask=batch.pixel_attention_mask, attention_mask=batch.attention_mask,
                  noise=torch.randn(1, 50, 32, device="cuda"))
    with torch.inference_mode():
        graphed = pi0_static.GraphedChunkSampler(model, **inputs)
        torch.testing.assert_close(graphed(**inputs), pi0_static.sample_chunk(model, **inputs))
