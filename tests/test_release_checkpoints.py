"""Released S-VAM checkpoints (release parameter names) load through dir:/hf: specs and reproduce the
fixture; training starts from them (--init); presets are applied and recorded in the run config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.storage.fs import Root
from foresight.trainers.action_expert import ActionExpertRunConfig, load_action_expert, train_action_expert
from foresight.trainers.decoupler import DecouplerRunConfig, train_decoupler
from foresight.storage.runs import RunDir
from foresight.trainers.config import LoopConfig, OptimConfig
from foresight.trainers.models import objectives
from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
from foresight.trainers.models.denoiser import DenoiserConfig
from foresight.trainers.models.policy import ActionExpert
from foresight.trainers.models.video_former import VideoFormerConfig
from foresight.trainers.release_checkpoints import load_release_decoupler, load_release_policy
from trainers_world import C_IN, GRID, T, TEACHERS, TEXT_D, make_world

FIXTURE = Path(__file__).parent / "reference" / "svam_tiny"
IO = dict(np.load(FIXTURE / "io.npz"))
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def fixture_state(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / f"model_{name}.safetensors")  # float16, as released


def features_BTHWC() -> torch.Tensor:
    return torch.from_numpy(IO["extract.features"]).permute(0, 1, 3, 4, 2)


def test_released_decoupler_checkpoints_load_and_reproduce_the_fixture(tmp_path):
    # The DINO decoupler as a torch pickle with a wrapper key, the DA3 one as safetensors in a folder.
    torch.save({"model_state_dict": fixture_state("decoupler_dino"), "epoch": 3}, tmp_path / "dino.pt")
    (tmp_path / "dpa").mkdir()
    save_file(fixture_state("decoupler_dpa"), tmp_path / "dpa" / "model.safetensors")
    dino, provenance = load_release_decoupler(f"dir:{tmp_path / 'dino.pt'}", heads=2, frames=16, height=8, width=8)
    assert (dino.cfg.in_channels, dino.cfg.teacher_channels, dino.cfg.hidden, dino.cfg.depth) == (96, 16, 32, 1)
    assert provenance["file"] == "dino.pt" and len(provenance["sha256"]) == 64
    with torch.no_grad():
        out = dino(features_BTHWC(), torch.from_numpy(IO["glue.ref_dino_teacher"]))
    np.testing.assert_allclose(out.permute(0, 4, 1, 2, 3).numpy(), IO["decoupler.dino_out"], atol=1e-4, rtol=1e-4)
    dpa, _ = load_release_decoupler(f"dir:{tmp_path / 'dpa'}", heads=2, frames=16, height=8, width=8)
    with torch.no_grad():
        tokens = dpa.forward_tokens(features_BTHWC(), torch.from_numpy(IO["decoupler.dpa_ref"]))
    np.testing.assert_allclose(tokens.numpy(), IO["decoupler.dpa_out"], atol=1e-4, rtol=1e-4)


def write_policy_checkpoint(path: Path, former: dict, denoiser: dict) -> None:
    """A Lightning-style policy checkpoint: the release's prefixes plus keys foresight does not use."""
    state = {f"Video_Former.{k}": v for k, v in former.items()} | {f"model.{k}": v for k, v in denoiser.items()}
    state["language_goal.proj.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "global_step": 60000}, path)


def glue_tokens() -> torch.Tensor:
    batch, frames, channels, h, w = IO["extract.features"].shape
    svd = features_BTHWC().reshape(batch, frames, h * w, channels)
    dino = torch.from_numpy(IO["decoupler.dino_out"]).permute(0, 2, 3, 4, 1).reshape(batch, frames, h * w, -1)
    return torch.cat([svd, dino, torch.from_numpy(IO["decoupler.dpa_out"])], dim=-1)


def test_released_policy_checkpoint_loads_and_reproduces_aggregator_and_sampler(tmp_path):
    write_policy_checkpoint(tmp_path / "last.ckpt", fixture_state("video_former"), fixture_state("denoiser"))
    former, denoiser, provenance = load_release_policy(f"dir:{tmp_path}", former_heads=4, denoiser_heads=4)
    assert former.cfg.num_latents == 32 and denoiser.cfg.cond_tokens == 32 and denoiser.cfg.chunk == 10
    model = ActionExpert(former.cfg, denoiser.cfg)
    model.perceiver.load_state_dict(former.state_dict(), strict=True)
    model.policy.load_state_dict(denoiser.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        state_images = model.perceiver(glue_tokens())
        np.testing.assert_allclose(state_images.numpy(), IO["glue.state_images"], atol=1e-4, rtol=1e-4)
        memory = model.policy.encode(state_images, torch.from_numpy(IO["glue.latent_goal"]))
        sigmas = objectives.exponential_sigmas(10, 1.0, 80.0)
        x0, _, _ = objectives.sample_ddim(model.policy.network, model.objective, torch.from_numpy(IO["denoiser.x_T"]),
                                          memory, sigmas)
    np.testing.assert_allclose(x0.numpy(), IO["denoiser.x0_eval"], atol=1e-4, rtol=1e-4)


def test_hf_spec_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """An hf: spec goes through huggingface_hub (offline here: a populated cache)."""
    import huggingface_hub.constants as hub_constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--svam--decoupler-dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(fixture_state("decoupler_dino"), snapshot / "model.safetensors")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    dino, provenance = load_release_decoupler("hf:svam/decoupler-dino", heads=2, frames=16, height=8, width=8)
    assert provenance["spec"] == "hf:svam/decoupler-dino" and dino.cfg.teacher_channels == 16


def test_a_checkpoint_of_another_architecture_is_refused_naming_it(tmp_path):
    state = fixture_state("decoupler_dino")
    state["base_model.pos_space"] = torch.zeros(64, 32)  # half of foresight's variant
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="broken.safetensors: does not match.*Missing key.*base_model.pos_time"):
        load_release_decoupler(f"dir:{tmp_path / 'broken.safetensors'}", 2, 16, 8, 8)
    state["base_model.pos_time"] = torch.zeros(16, 32)  # foresight's variant loads as that variant
    save_file(state, tmp_path / "variant.safetensors")
    model, _ = load_release_decoupler(f"dir:{tmp_path / 'variant.safetensors'}", 2, 16, 8, 8)
    assert model.cfg.position_embeddings
    write_policy_checkpoint(tmp_path / "bad.ckpt", {}, fixture_state("denoiser"))
    with pytest.raises(ValueError, match="needs 'Video_Former.\\*' and 'model.\\*' keys"):
        load_release_policy(f"dir:{tmp_path / 'bad.ckpt'}", 4, 4)


# ----------------------------------------------------------------------------------------------
# training from released checkpoints, presets
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return make_world(tmp_path_factory.mktemp("release"))


def frozen_loop(steps: int = 2) -> LoopConfig:
    return LoopConfig(steps=steps, batch_size=2, num_workers=0, log_every=1, checkpoint_every=steps, device="cpu")


def test_decoupler_training_starts_from_a_released_checkpoint(world, tmp_path):
    torch.manual_seed(5)
    released = Decoupler(DecouplerConfig.preset("tiny", in_channels=C_IN, teacher_channels=TEACHERS["dinov2"],
                                                frames=T, height=GRID[0], width=GRID[1]))
    save_file({k: v.half() for k, v in released.state_dict().items()}, tmp_path / "model.safetensors")
    # lr 0: the weights after training are the checkpoint's, which shows training started from it.
    cfg = DecouplerRunConfig(size="tiny", init=f"dir:{tmp_path}", optim=OptimConfig(lr=0.0, warmup_steps=0),
                             loop=frozen_loop())
    root = Root(world["root"])
    train_decoupler(root, world["train"], cfg, run_id="dec-init")
    info, state = RunDir(root, "dec-init").load_model()
    assert info.config["init"]["spec"] == f"dir:{tmp_path}" and info.config["run"]["arch"] == "release"
    for key, value in released.state_dict().items():
        assert torch.equal(state[key], value.half().float()), key


@pytest.fixture(scope="module")
def decoupler_run(world):
    train_decoupler(Root(world["root"]), world["train"], DecouplerRunConfig(size="tiny", loop=frozen_loop()),
                    run_id="dec-ae")
    return "dec-ae"


def test_action_expert_training_starts_from_a_released_policy_checkpoint(world, decoupler_run, tmp_path):
    root = Root(world["root"])
    former = VideoFormerConfig.preset("tiny", in_channels=C_IN + TEACHERS["dinov2"], frames=T)
    denoiser = DenoiserConfig.preset("tiny", action_dim=4, chunk=5, goal_dim=TEXT_D, obs_dim=former.dim,
                                     cond_tokens=former.num_latents)
    torch.manual_seed(7)
    released = ActionExpert(former, denoiser)
    write_policy_checkpoint(tmp_path / "policy.ckpt", released.perceiver.state_dict(), released.policy.state_dict())
    cfg = ActionExpertRunConfig(decouplers=[decoupler_run], size="tiny", init=f"dir:{tmp_path / 'policy.ckpt'}",
                                optim=OptimConfig(lr=0.0, warmup_steps=0), loop=frozen_loop())
    train_action_expert(root, world["train"], cfg, run_id="ae-init")
    task, info = load_action_expert(root, "ae-init")
    assert info.config["arch"] == "release" and info.config["objective"]["kind"] == "release-edm"
    assert info.config["init"]["file"] == "policy.ckpt"
    for name in ("perceiver", "policy"):
        for key, value in getattr(released, name).state_dict().items():
            assert torch.equal(getattr(task.model, name).state_dict()[key], value), f"{name}.{key}"


def test_action_expert_with_the_proprio_token_reads_the_export_state(world, decoupler_run):
    root = Root(world["root"])
    cfg = ActionExpertRunConfig(decouplers=[decoupler_run], size="tiny", denoiser={"proprio": "token"},
                                loop=frozen_loop(3))
    result = train_action_expert(root, world["train"], cfg, run_id="ae-proprio", eval_export=world["val"])
    assert np.isfinite(result.eval["action_mse"])
    task, info = load_action_expert(root, "ae-proprio")
    assert info.config["policy"]["proprio"] == "token" and info.config["policy"]["proprio_dim"] == 3
    assert task.model.reads_proprio and "state" in task.collate_fn().keywords["fields"]
    assert not torch.equal(task.model.proprio_normalizer.scale, torch.ones(3))  # the export's state statistics


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=True)


def test_presets_apply_under_explicit_settings_and_are_recorded(world, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[optim]\nwarmup_steps = 0\n[loop]\nnum_workers = 0\nlog_every = 1\ndevice = "cpu"\n')
    result = cli("train", "decoupler", "--root", world["root"], "--export", world["train"], "--teacher", "dinov2",
                 "--preset", "svam-calvin", "--size", "tiny", "--steps", "2", "--batch-size", "2",
                 "--config", str(config), "--run-id", "dec-preset")
    assert result.exit_code == 0, result.output + repr(result.exception)
    record = RunDir(Root(world["root"]), "dec-preset").info(2).config
    run = record["run"]
    assert record["preset"] == run["preset"] == "svam-calvin"
    assert (run["arch"], run["optim"]["lr"], run["optim"]["weight_decay"], run["model"]["dropout"]) == (
        "release", 1e-4, 1e-4, 0.1)  # the preset's values ...
    assert run["loop"]["steps"] == 2 and run["size"] == "tiny" and run["optim"]["warmup_steps"] == 0  # ... under flags/file
    assert run["model"]["hidden"] is None and record["architecture"]["hidden"] == 32  # full-size widths dropped
    # The action-expert preset fixes the chunk length: an export of 5-step chunks is refused by name.
    result = cli("train", "action-expert", "--root", world["root"], "--export", world["train"],
                 "--decouplers", "dec-preset", "--preset", "svam-calvin", "--size", "tiny", "--steps", "1",
                 "--config", str(config), "--run-id", "ae-preset")
    assert result.exit_code != 0 and "needs 10; re-export with --action-chunk 10" in str(result.exception)
    result = cli("train", "decoupler", "--root", world["root"], "--export", world["train"], "--preset", "nope")
    assert result.exit_code != 0 and "unknown preset 'nope'" in result.output
    json.dumps(record)  # the record is plain JSON
