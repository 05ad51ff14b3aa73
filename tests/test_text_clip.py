"""CLIP text embeddings: shapes, once per distinct instruction, tokenizer, dir: round trip."""

from __future__ import annotations

import numpy as np
import pytest

from foresight.pipelines.text import MAX_LENGTH, byte_level_tokenizer, embed_instructions, embed_texts, load_text_model, \
    save_text_model


@pytest.fixture(scope="module")
def model():
    return load_text_model("tiny")


def test_states_shape_and_dtype(model):
    states = embed_texts(model, ["open the drawer", "push the red block to the left"])
    assert states.shape == (2, MAX_LENGTH, 16) and states.dtype == np.float32
    assert np.isfinite(states).all()
    assert not np.array_equal(states[0], states[1])


def test_each_distinct_instruction_is_encoded_once(model):
    rows_per_call = []
    pre = model.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: rows_per_call.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        instructions = ["lift the block", "open the drawer", "lift the block", "lift the block"]
        states = embed_instructions(model, instructions)
    finally:
        pre.remove()
    assert rows_per_call == [2]
    assert states.shape == (4, MAX_LENGTH, 16)
    assert np.array_equal(states[0], states[2]) and np.array_equal(states[0], states[3])
    assert not np.array_equal(states[0], states[1])


def test_byte_level_tokenizer_pads_and_marks_ends():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer(["ab"], padding="max_length", truncation=True, max_length=MAX_LENGTH)["input_ids"][0]
    assert len(ids) == MAX_LENGTH
    assert ids[0] == 512 and ids[3] == 513 and ids[-1] == 513  # start, 'a', 'b</w>', end, padding
    long_ids = tokenizer(["x" * 100], padding="max_length", truncation=True, max_length=MAX_LENGTH)["input_ids"][0]
    assert len(long_ids) == MAX_LENGTH and long_ids[-1] == 513


def test_random_is_the_clip_b32_text_tower():
    model = load_text_model("random")
    assert model.width == 512 and model.encoder.config.num_hidden_layers == 12
    assert model.identity.source == "random" and not model.identity.is_real
    assert embed_texts(model, ["close the drawer"]).shape == (1, MAX_LENGTH, 512)


def test_dir_round_trip(model, tmp_path):
    save_text_model(model, tmp_path / "clip")
    loaded = load_text_model(f"dir:{tmp_path / 'clip'}")
    assert loaded.identity.source == "dir" and loaded.identity.family == "clip-text"
    assert list(loaded.identity.weights_sha256) == ["text_encoder/model.safetensors"]
    texts = ["turn on the lightbulb", "rotate the blue block right"]
    assert np.array_equal(embed_texts(loaded, texts), embed_texts(model, texts))


def test_bad_dir_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a CLIP text model"):
        load_text_model(f"dir:{tmp_path / 'empty'}")
