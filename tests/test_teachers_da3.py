"""DA3 any-view backbone: checkpoint loading and the teacher. Every array of the official fixture
is compared by ``pipelines.conformance.da3`` (tests/test_conformance_extract.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from foresight.pipelines.teachers import load_teacher
from foresight.pipelines.teachers.da3 import PRESETS, infer_arch, load_backbone_state, save_checkpoint
from foresight.pipelines.teachers.da3_model import DA3Backbone
from foresight.pipelines.teachers.preprocess import preprocess_frames

FIXTURE = Path(__file__).resolve().parent / "reference" / "da3_tiny"
TOL = 1e-4



@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURE / "io.npz"))


@pytest.fixture(scope="module")
def fixture_state():
    return load_file(str(FIXTURE / "model.safetensors"))


def test_fixture_weights_load_under_the_bare_prefix(fixture_state):
    model = DA3Backbone(infer_arch(fixture_state, "fixture")).eval()
    report = load_backbone_state(model, fixture_state, "fixture")
    assert report.prefix == "pretrained." and report.loaded == 143 and report.ignored == 0


def max_err(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float(np.abs(a.detach().numpy() - b).max())


def test_arch_inferred_from_the_fixture_weights(fixture_state):
    arch = infer_arch(fixture_state, "fixture")
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.alt_start) == (32, 8, 2, 2)
    assert arch.out_layers == [3, 4, 5, 7] and arch.pos_grid == 37


def test_official_full_checkpoint_prefix_loads_and_ignores_heads(fixture_state, io, tmp_path):
    full = {"model.backbone." + k: v for k, v in fixture_state.items()}
    full["model.head.proj.weight"] = torch.zeros(3, 3)
    save_file(full, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"da3_arch": PRESETS["tiny"].model_dump()}))
    teacher = load_teacher("da3", f"dir:{tmp_path}", {"stage": 0, "preprocess": {"height": 56, "width": 56}})
    assert teacher.identity.is_real and set(teacher.identity.weights_sha256) == {"model.safetensors"}
    with torch.no_grad():
        tokens = teacher.encode_pixels(torch.from_numpy(io["input_multiview"]))
    assert tokens.shape == (2, 4, 4, 4, 64)
    assert max_err(tokens.reshape(2, 4, 16, 64), io["svam_targets"]) <= TOL


def test_missing_and_unexpected_keys_are_named(fixture_state):
    broken = dict(fixture_state)
    del broken["pretrained.blocks.3.attn.q_norm.weight"]
    broken["pretrained.blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ValueError) as err:
        load_backbone_state(DA3Backbone(PRESETS["tiny"]), broken, "broken.safetensors")
    message = str(err.value)
    assert "broken.safetensors" in message
    assert "missing keys ['pretrained.blocks.3.attn.q_norm.weight']" in message
    assert "unexpected keys ['pretrained.blocks.0.attn.q_norm.weight']" in message


def test_official_model_name_config_selects_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "da3-giant"}))
    save_file({"pretrained.cls_token": torch.zeros(1, 1, 1536)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model_name 'da3-giant' is not supported"):
        load_teacher("da3", f"dir:{tmp_path}")


def test_teacher_shapes_reference_and_cross_view_attention():
    teacher = load_teacher("da3", "tiny")
    assert teacher.params()["layer"] == 3 and teacher.channels == 64 and teacher.grid == (16, 16)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 4, 64, 64, 3), dtype=np.uint8))
    target, reference = teacher.encode_clips(frames, frames[:, 0])
    assert target.shape == (2, 4, 16, 16, 64) and target.dtype == torch.float16
    assert reference.shape == (2, 1, 16, 16, 64) and reference.dtype == torch.float16
    # The reference map is the teacher applied to the observed frame alone (one view).
    pixels = preprocess_frames(frames[:, 0], teacher.preprocess).reshape(2, 1, 3, 224, 224)
    with torch.no_grad():
        (alone, _), = teacher.module.intermediate_layers(pixels, [3])
    assert torch.equal(reference, alone.reshape(2, 1, 16, 16, 64).half())
    # ... which differs from frame 0 seen together with the other views.
    assert (target[:, 0].float() - reference[:, 0].float()).abs().max() > 1e-3


def test_stage_layer_and_cat_token_settings():
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, 56, 56, 3), dtype=np.uint8))
    small = {"height": 56, "width": 56}
    by_stage = load_teacher("da3", "tiny", {"stage": 2, "preprocess": small})
    by_layer = load_teacher("da3", "tiny", {"layer": 5, "preprocess": small})
    assert by_stage.layer == by_layer.layer == 5
    assert torch.equal(by_stage.encode_frames(frames), by_layer.encode_frames(frames))
    plain = load_teacher("da3", "tiny", {"stage": 2, "cat_token": False, "preprocess": small})
    tokens = plain.encode_frames(frames)
    assert tokens.shape == (1, 3, 4, 4, 32)
    with pytest.raises(ValueError, match="stage 4 but the backbone has out_layers"):
        load_teacher("da3", "tiny", {"stage": 4})


def test_saved_checkpoint_round_trip(tmp_path):
    source = DA3Backbone(PRESETS["tiny"])
    source.init_random(7)
    save_checkpoint(source, tmp_path, prefix="model.backbone.pretrained.")
    teacher = load_teacher("da3", f"dir:{tmp_path}")
    for name, value in source.state_dict().items():
        assert torch.equal(teacher.module.state_dict()[name], value), name
