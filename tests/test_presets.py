"""Presets: a stage built with one records the preset and every resolved setting in its recipe;
explicit settings win; an unknown preset is a one-line error; docs/RECIPES.md is generated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from factories import make_dataset, make_version, write_episode
from foresight.flows.cli import app
from foresight.flows.generate import GenerateConfig, PlanConfig, TextConfig, make_plan, text_recipe, video_recipe
from foresight.flows.pipeline import PipelineConfig
from foresight.flows.teachers import TeachersConfig
from foresight.flows.teachers_engine import teacher_recipe
from foresight.pipelines.svd import SVDParams
from foresight.pipelines.teachers import load_teacher, parse_settings
from foresight.pipelines.teachers.preprocess import POLICY_TIME, preprocess_frames
from foresight.pipelines.text import load_text_model
from foresight.schemas.presets import PRESET_NAMES, STAGE_MODULES, preset_table, preset_values
from foresight.schemas.presets.docs import recipes_markdown

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("presets"))
    store = make_dataset(root, size=16)
    write_episode(store, "ep0", length=12)
    plan = make_plan(root, PlanConfig(dataset="toy", frames=4, stride=1, every=4, limit=2)).plan_id
    text = make_version(root, "text", "clip.text", {"embedding": np.zeros((2, 20, 16), np.float32)},
                        {"plan": plan}, {"max_length": 20})
    return root, plan, text


def tiny_generate(plan: str, text: str, **values) -> GenerateConfig:
    return GenerateConfig(plan=plan, text=text, model="tiny", params=SVDParams(size=32, steps=1), **values)


def test_video_recipe_names_the_preset_and_its_resolved_settings(world):
    root, plan, text = world
    recipe, _, _ = video_recipe(root, tiny_generate(plan, text, preset="svam-calvin"))
    params = recipe.params
    assert params["preset"] == "svam-calvin"
    assert params["text_position_encoding"] is False and params["feature_blocks"] == [0, 1]
    assert params["onestep"] == {"fps_id": "fps", "noise_aug_strength": 0.0, "schedule_steps": 20}
    assert (params["fps_id"], params["noise_aug_strength"], params["max_guidance"]) == ("fps-1", 0.02, 3.0)
    # explicit settings win over the preset's
    assert (params["size"], params["steps"]) == (32, 1)
    plain, _, _ = video_recipe(root, tiny_generate(plan, text))
    assert "preset" not in plain.params and plain.version_id() != recipe.version_id()


def test_each_preset_keys_its_own_version(world):
    root, plan, text = world
    ids = {video_recipe(root, tiny_generate(plan, text, preset=name))[0].version_id() for name in PRESET_NAMES}
    assert len(ids) == len(PRESET_NAMES)


def test_explicit_nested_setting_overrides_the_preset():
    params = SVDParams(onestep=None, text_position_encoding=True)
    config = GenerateConfig(plan="p", text="t", model="tiny", preset="svam-calvin", params=params)
    assert config.params.onestep is None and config.params.text_position_encoding is True
    assert config.params.steps == 30  # the preset's
    again = GenerateConfig.model_validate(config.model_dump(mode="json"))
    assert again == config  # resolving is idempotent (Prefect re-validates flow parameters)


def test_text_recipe_records_the_preset():
    config = TextConfig(plan="plan-a", model="tiny", preset="svam-calvin")
    recipe = text_recipe(config, load_text_model("tiny").identity)
    assert recipe.params == {"max_length": 20, "preset": "svam-calvin"}
    plain = text_recipe(TextConfig(plan="plan-a", model="tiny"), load_text_model("tiny").identity)
    assert plain.params == {"max_length": 20} and plain.version_id() != recipe.version_id()
    assert TextConfig(plan="plan-a", preset="svam-calvin").model == "hf:openai/clip-vit-base-patch32"
    assert TextConfig(plan="plan-a", preset="svam-calvin", model="tiny", max_length=8).max_length == 8


def test_teacher_recipe_records_the_preset_settings_and_explicit_ones_win():
    config = TeachersConfig(video="video-x", teacher="dinov2", model="tiny", preset="svam-calvin",
                            settings={"preprocess": {"interpolation": "bilinear"}})
    teacher = load_teacher(config.teacher, config.model, config.settings)
    params = teacher_recipe(teacher, config.video, config.preset).params
    assert params["preset"] == "svam-calvin"
    assert params["preprocess"]["interpolation"] == "bilinear"  # explicit
    assert params["preprocess"]["mean"] == [0.485, 0.456, 0.406] and params["preprocess"]["height"] == 224
    da3 = TeachersConfig(video="video-x", teacher="da3", preset="svam-calvin")
    assert da3.model == "hf:depth-anything/DA3-LARGE" and da3.settings["stage"] == 0
    assert "preset" not in teacher_recipe(teacher, config.video).params


def test_unknown_preset_is_a_one_line_error(world):
    root, plan, text = world
    with pytest.raises(ValueError, match="unknown preset 'svam-nope'"):
        GenerateConfig(plan=plan, text=text, model="tiny", preset="svam-nope")
    for args in (["generate", "--plan", plan, "--text", text, "--model", "tiny"], ["text", "--plan", plan],
                 ["teachers", "--video", "v", "--teacher", "dinov2"]):
        result = runner.invoke(app, [*args, "--preset", "svam-nope", "--root", root])
        assert result.exit_code != 0
        assert "unknown preset 'svam-nope'" in str(result.exception) or "unknown preset" in result.output


def test_pipeline_preset_applies_to_sections_without_their_own():
    config = PipelineConfig.model_validate({
        "dataset": "demo", "preset": "svam-calvin",
        "text": {"model": "tiny"},
        "generate": {"model": "tiny", "params": {"steps": 1}},
        "teachers": [{"teacher": "dinov2", "model": "tiny"}, {"teacher": "da3", "model": "tiny", "preset": "vpp"}],
    })
    stages = config.stage_configs("plan-a", "text-b", "video-c")
    generate = stages["generate"]
    assert generate.preset == "svam-calvin" and generate.params.steps == 1
    assert generate.params.text_position_encoding is False and generate.params.size == 256
    assert stages["text"].preset == "svam-calvin" and stages["text"].model == "tiny"
    dino, da3 = stages["teachers"]
    assert dino.settings["preprocess"]["interpolation"] == "bicubic"
    assert da3.preset == "vpp" and da3.settings == {}  # vpp fixes no teacher setting


def test_pipeline_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        PipelineConfig.model_validate({"dataset": "demo", "preset": "nope", "text": {"model": "tiny"}})


def test_every_preset_setting_is_sourced_and_applies():
    for name in PRESET_NAMES:
        for stage in STAGE_MODULES:
            for key, item in preset_table(name, stage).items():
                assert item.source.strip(), (name, stage, key)
                if item.source.startswith("ours"):
                    assert len(item.source) > len("ours: ") + 10, (name, stage, key)  # says why
        # The svd tables are real settings: they validate as foresight's own config models.
        GenerateConfig(plan="p", text="t", model="tiny", preset=name)
        TextConfig(plan="p", preset=name, model="tiny")
        for teacher in ("dinov2", "da3"):
            parse_settings(teacher, TeachersConfig(video="v", teacher=teacher, model="tiny", preset=name).settings)
    assert preset_values("svam-calvin", "extract")["onestep.fps_id"] == "fps"


def test_shallow_pi_preset_is_the_releases_training_recipe_and_resolves_as_a_run_config():
    from foresight.trainers.shallow_pi import ShallowPiRunConfig

    table = preset_table("shallow-pi", "shallow_pi")
    run = ShallowPiRunConfig.model_validate({"preset": "shallow-pi"})
    # pi0_libero_l06 of the authors' release: 30k steps, global batch 64, float32, openpi's AdamW + schedule.
    assert (run.loop.steps, run.loop.batch_size, run.loop.bf16) == (30000, 64, False)
    assert (run.optim.lr, run.optim.warmup_steps, run.optim.min_lr_ratio) == (2.5e-5, 1000, 0.1)
    assert (run.optim.betas, run.optim.eps, run.optim.weight_decay) == ((0.9, 0.95), 1e-8, 1e-10)
    assert run.layers == 6 and run.lambda_kd == 1.0 and run.mode == "online"
    for key in ("loop.steps", "loop.batch_size", "loop.bf16", "optim.lr", "lambda_kd", "mode"):
        assert "release" in table[key].source, key
    # What neither the release nor the poster fixes stays ours, with the reason.
    for key in ("lambda_attn", "attn_layers", "attn_heads"):
        assert table[key].source.startswith("ours:"), key


def test_policy_time_preprocessing_is_the_releases_minus_one_to_one_bilinear():
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8))
    got = preprocess_frames(frames, POLICY_TIME)
    release = F.interpolate(frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0, size=(224, 224), mode="bilinear",
                            align_corners=False)
    torch.testing.assert_close(got, release, atol=1e-5, rtol=0)


def test_recipes_md_is_generated_from_the_presets():
    assert (REPO / "docs" / "RECIPES.md").read_text() == recipes_markdown(), \
        "docs/RECIPES.md is stale: run `foresight presets --markdown > docs/RECIPES.md`"
    result = runner.invoke(app, ["presets", "--markdown"])
    assert result.exit_code == 0 and result.output == recipes_markdown()
    for title in ("SVD generation", "One-step feature extraction", "DINOv2 teacher", "DA3 teacher", "Decouplers",
                  "Action expert", "Shallow-π"):
        assert f"## {title}" in result.output
