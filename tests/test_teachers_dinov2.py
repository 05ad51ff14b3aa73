"""DINOv2 teacher: equality with transformers' own outputs, reference map, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from foresight.pipelines.teachers import load_teacher, parse_settings
from foresight.pipelines.teachers.dinov2 import TINY
from foresight.pipelines.teachers.preprocess import PreprocessSettings, preprocess_frames, settings_from_processor


def clips(seed: int, shape=(2, 3, 64, 64, 3)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def saved_registers(tmp_path_factory):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    folder = tmp_path_factory.mktemp("dinov2reg")
    torch.manual_seed(3)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY)).save_pretrained(folder)
    return folder


def test_tokens_equal_transformers_outputs_with_registers(saved_registers):
    from transformers import Dinov2WithRegistersModel

    teacher = load_teacher("dinov2", f"dir:{saved_registers}")
    assert teacher.identity.is_real and "model.safetensors" in teacher.identity.weights_sha256
    frames = clips(0)
    tokens = teacher.encode_frames(frames)
    assert tokens.shape == (2, 3, 16, 16, 32) and tokens.dtype == torch.float16
    reference_model = Dinov2WithRegistersModel.from_pretrained(saved_registers).eval()
    pixels = preprocess_frames(frames.reshape(6, 64, 64, 3), PreprocessSettings())
    with torch.no_grad():
        hidden = reference_model(pixel_values=pixels).last_hidden_state  # final LayerNorm applied
    expected = hidden[:, 1 + TINY["num_register_tokens"]:].reshape(2, 3, 16, 16, 32).half()
    assert torch.equal(tokens, expected)


def test_tokens_equal_transformers_outputs_without_registers(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(4)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                             image_size=518)).save_pretrained(tmp_path)
    teacher = load_teacher("dinov2", f"dir:{tmp_path}")
    frames = clips(1, (1, 2, 48, 48, 3))
    pixels = preprocess_frames(frames.reshape(2, 48, 48, 3), PreprocessSettings())
    with torch.no_grad():
        hidden = Dinov2Model.from_pretrained(tmp_path).eval()(pixel_values=pixels).last_hidden_state
    assert torch.equal(teacher.encode_frames(frames), hidden[:, 1:].reshape(1, 2, 16, 16, 32).half())


def test_reference_map_is_the_teacher_on_the_observed_frame_alone():
    teacher = load_teacher("dinov2", "tiny")
    frames, observed = clips(2), clips(5, (2, 80, 80, 3))
    target, reference = teacher.encode_clips(frames, observed)
    assert target.shape == (2, 3, 16, 16, 32) and reference.shape == (2, 1, 16, 16, 32)
    assert torch.equal(reference, teacher.encode_frames(observed[:, None]))


def test_other_model_types_are_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=56, patch_size=14)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'vit' model.*--teacher hf"):
        load_teacher("dinov2", f"dir:{tmp_path}")


def test_random_spec_is_full_size_vit_b14_with_registers():
    from foresight.pipelines.teachers.dinov2 import VIT_B14_REG

    assert (VIT_B14_REG["hidden_size"], VIT_B14_REG["num_hidden_layers"], VIT_B14_REG["patch_size"],
            VIT_B14_REG["num_register_tokens"]) == (768, 12, 14, 4)


def test_resize_is_bicubic_antialiased_like_pil():
    rng = np.random.default_rng(6)
    # Mid-range values: PIL clamps its uint8 intermediate pass, which only matters near 0 and 255.
    image = rng.integers(64, 192, (256, 256, 3), dtype=np.uint8)
    settings = PreprocessSettings(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = preprocess_frames(torch.from_numpy(image)[None], settings)[0].permute(1, 2, 0).numpy() * 255.0
    pil = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    error = np.abs(ours - pil)  # PIL rounds to uint8 after each of its two separable passes
    assert error.max() <= 1.5 and error.mean() < 0.5


def test_normalisation_uses_imagenet_mean_and_std():
    frames = torch.full((1, 224, 224, 3), 255, dtype=torch.uint8)
    pixels = preprocess_frames(frames, PreprocessSettings())
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :, 0, 0], expected)


def test_processor_settings_are_read():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 288}, crop_size={"height": 256, "width": 256},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], resample=2)
    settings = settings_from_processor(processor)
    assert (settings.height, settings.width, settings.interpolation) == (256, 256, "bilinear")
    assert settings.mean == (0.5, 0.5, 0.5) and settings.std == (0.25, 0.25, 0.25)


def test_unknown_setting_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="unknown key 'layers'"):
        parse_settings("dinov2", {"layers": 3})
