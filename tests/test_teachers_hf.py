"""Generic `hf` teacher: any transformers vision backbone, patch tokens at its own grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foresight.pipelines.teachers import load_teacher
from foresight.pipelines.teachers.preprocess import preprocess_frames


def clips(seed: int, shape=(1, 2, 64, 64, 3)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def test_clip_vision_drops_cls_and_uses_its_processor(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=112, patch_size=16)).eval()
    model.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}).save_pretrained(tmp_path)
    teacher = load_teacher("hf", f"dir:{tmp_path}")
    assert teacher.grid == (7, 7) and teacher.channels == 32 and teacher.num_prefix == 1
    assert teacher.preprocess.height == 112 and teacher.preprocess.mean[0] == pytest.approx(0.48145466)
    frames = clips(0)
    target, reference = teacher.encode_clips(frames, frames[:, 0])
    assert target.shape == (1, 2, 7, 7, 32) and target.dtype == torch.float16
    assert reference.shape == (1, 1, 7, 7, 32)
    pixels = preprocess_frames(frames[0], teacher.preprocess)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert torch.equal(target[0], hidden[:, 1:].reshape(2, 7, 7, 32).half())
    assert torch.equal(reference[:, 0], target[:, 0])  # one frame alone: per-frame model


def test_siglip_full_model_uses_its_vision_tower(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=56, patch_size=14))
    SiglipModel(config).save_pretrained(tmp_path)
    teacher = load_teacher("hf", f"dir:{tmp_path}", {"preprocess": {"height": 56, "width": 56}})
    assert teacher.grid == (4, 4) and teacher.num_prefix == 0
    assert teacher.encode_frames(clips(1)).shape == (1, 2, 4, 4, 32)


def test_conv_backbone_gives_its_feature_grid(tmp_path):
    from transformers import ConvNextConfig, ConvNextModel

    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(tmp_path)
    teacher = load_teacher("hf", f"dir:{tmp_path}")
    assert teacher.grid == (28, 28) and teacher.channels == 16  # 224 / 4 (stem) / 2 (stage 2)
    assert teacher.encode_frames(clips(2)).shape == (1, 2, 28, 28, 16)


def test_non_vision_model_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'bert'.*is not a vision backbone"):
        load_teacher("hf", f"dir:{tmp_path}")


def test_random_has_no_architecture_and_tiny_works():
    with pytest.raises(ValueError, match="'random' names no architecture"):
        load_teacher("hf", "random")
    teacher = load_teacher("hf", "tiny")
    assert teacher.identity.source == "tiny" and not teacher.identity.is_real
    assert teacher.encode_frames(clips(3)).shape == (1, 2, 16, 16, 32)


def test_missing_folder_and_unknown_teacher():
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher("hf", "dir:/nonexistent/model")
    with pytest.raises(ValueError, match="teacher 'sam': unknown"):
        load_teacher("sam", "tiny")
