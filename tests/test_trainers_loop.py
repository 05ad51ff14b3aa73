"""The shared training loop on in-memory data: exact resume, overfitting, checkpoints, config, version guard."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from foresight.storage.fs import Root
from foresight.trainers.action_expert import ActionExpertTask, FrozenDecouplers
from foresight.trainers.decoupler import DecouplerRunConfig, DecouplerTask, build_decoupler_config
from foresight.storage.runs import RunDir, RunSpec, read_metrics
from foresight.trainers.batching import MemoryStream, ResumableLoader
from foresight.trainers.config import LoopConfig, OptimConfig, load_config
from foresight.trainers.distributed import seed_everything
from foresight.trainers.loop import fit
from foresight.trainers.prefetch import DevicePrefetcher
from foresight.trainers.schedule import WarmupSchedule
from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
from foresight.trainers.models.objectives import ObjectiveConfig
from foresight.trainers.models.policy import ActionExpert, PolicyConfig
from foresight.trainers.models.uniperceiver import UniPerceiverConfig

T, H, W, C_IN, C_T = 4, 2, 4, 16, 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def decoupler_samples(n: int, seed: int = 0) -> list[dict]:
    """Teacher maps = a fixed linear map of the features + the reference (learnable)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((C_IN, C_T)).astype(np.float32) / 4
    samples = []
    for _ in range(n):
        feats = rng.standard_normal((T, H, W, C_IN)).astype(np.float16)
        ref = rng.standard_normal((1, H, W, C_T)).astype(np.float16)
        target = feats.astype(np.float32) @ weight + ref
        samples.append({"onestep": feats, "dinov2.target": target.astype(np.float16), "dinov2.reference": ref})
    return samples


def decoupler_run(tmp_path, run_id: str, steps: int, workers: int = 0, versions=None, lr=3e-3, n=22):
    cfg = DecouplerRunConfig(size="tiny", optim=OptimConfig(lr=lr, warmup_steps=2),
                             loop=LoopConfig(steps=steps, batch_size=4, num_workers=workers, log_every=1,
                                             checkpoint_every=4, keep_last=2, device="cpu"))
    seed_everything(0)
    task = DecouplerTask(Decoupler(build_decoupler_config(cfg, [T, H, W, C_IN], [T, H, W, C_T])), "dinov2")
    spec = RunSpec(Root(tmp_path), run_id, "decoupler", "export-test", versions or {"onestep": "video-000000000001"},
                   cfg.model_dump(mode="json"))
    return task, MemoryStream(decoupler_samples(n), seed=1), spec, cfg


def train_losses(tmp_path, run_id: str) -> list[float]:
    return [m["loss"] for m in read_metrics(Root(tmp_path), run_id) if m["split"] == "train"]


@pytest.mark.parametrize("workers,reuse", [(0, False), (2, False), (2, True)])
def test_exact_resume_gives_the_same_losses(tmp_path, workers, reuse):
    task, stream, spec, cfg = decoupler_run(tmp_path, "whole", 14, workers)
    fit(task, stream, spec, cfg.loop, cfg.optim)
    # Stop at an odd step (mid-epoch, mid round robin over the workers), then resume in a fresh process state.
    # The interrupted run may collate into reusable buffers: the same batches, the same resume state.
    task, stream, spec, cfg = decoupler_run(tmp_path, "parts", 14, workers)
    cfg.loop.reuse_buffers = reuse
    stopped = fit(task, stream, spec, cfg.loop, cfg.optim, stop_at=7)
    assert stopped.step == 7 and RunDir(Root(tmp_path), "parts").latest() == 7
    task, stream, spec, cfg = decoupler_run(tmp_path, "parts", 14, workers)
    cfg.loop.reuse_buffers = reuse
    resumed = fit(task, stream, spec, cfg.loop, cfg.optim)
    assert resumed.resumed_from == 7 and resumed.step == 14
    whole, parts = train_losses(tmp_path, "whole"), train_losses(tmp_path, "parts")
    assert len(whole) == 14 and parts == whole
    a = RunDir(Root(tmp_path), "whole").load_model()[1]
    b = RunDir(Root(tmp_path), "parts").load_model()[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_reused_batch_buffers_hold_the_same_batches_as_fresh_ones(tmp_path, workers):
    """A tight ring (prefetch 1: two buffers per worker) under a slow consumer: no batch is
    overwritten before it was taken out of its buffer, and the loader states are unchanged."""
    import time

    task, _, _, _ = decoupler_run(tmp_path, "ring", 1)

    def batches(reuse: bool) -> tuple[bool, list, list]:
        loop = LoopConfig(batch_size=4, num_workers=workers, prefetch_factor=1, device="cpu", reuse_buffers=reuse)
        fed = ResumableLoader(task.collate_fn(), MemoryStream(decoupler_samples(22), seed=1), loop,
                              torch.device("cpu"), threaded=True)
        taken, states = [], []
        for _ in range(12):  # more than two epochs
            taken.append(next(iter(fed)))
            states.append(fed.state_dict())
            time.sleep(0.02)  # let the workers run ahead into their rings
        fed.close()
        return fed.reuses_buffers, taken, states

    (fresh_reused, fresh, fresh_states), (reused_reused, reused, reused_states) = batches(False), batches(True)
    assert reused_reused and not fresh_reused
    assert fresh_states == reused_states
    for a, b in zip(fresh, reused):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Each batch owns its memory once it left the prefetcher: later batches do not change it.
    assert len({batch["onestep"].data_ptr() for batch in reused}) == len(reused)


def test_decoupler_overfits_a_tiny_set(tmp_path):
    task, _, spec, cfg = decoupler_run(tmp_path, "overfit", 60, lr=1e-2)
    result = fit(task, MemoryStream(decoupler_samples(8), seed=1), spec, cfg.loop, cfg.optim,
                 eval_stream=MemoryStream(decoupler_samples(8), seed=1))
    losses = train_losses(tmp_path, "overfit")
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5])
    assert result.eval["dinov2/cosine"] > 0.8 and result.eval["dinov2/rel_l2"] < 0.6


def action_samples(n: int) -> list[dict]:
    rng = np.random.default_rng(3)
    return [{"onestep": rng.standard_normal((T, H, W, C_IN)).astype(np.float16),
             "dinov2.reference": rng.standard_normal((1, H, W, C_T)).astype(np.float16),
             "text": rng.standard_normal((3, 6)).astype(np.float16),
             "actions": (rng.standard_normal((5, 3)) * 2 + 1).astype(np.float32),
             "actions_mask": np.ones(5, dtype=bool)} for _ in range(n)]


def test_action_expert_overfits_a_tiny_set(tmp_path):
    seed_everything(0)
    decoupler = Decoupler(DecouplerConfig.preset("tiny", in_channels=C_IN, teacher_channels=C_T, frames=T,
                                                 height=H, width=W))
    perceiver = UniPerceiverConfig.preset("tiny", in_channels=C_IN + C_T, frames=T)
    # Training noise levels centred higher than the reference (log-normal -1.2, 1.2) reach the high-noise
    # end the sampler starts from within a short run.
    policy = PolicyConfig.preset("tiny", action_dim=3, chunk=5, text_dim=6, cond_tokens=perceiver.num_latents,
                                 cond_dim=perceiver.dim, dropout=0.0)
    model = ActionExpert(perceiver, policy, ObjectiveConfig.for_kind("edm", p_mean=-0.5, p_std=1.5))
    samples = action_samples(4)
    actions = np.concatenate([s["actions"] for s in samples])
    model.normalizer.set_stats("meanstd", {"mean": actions.mean(0).tolist(), "std": actions.std(0).tolist()})
    task = ActionExpertTask(model, FrozenDecouplers([decoupler], ["dinov2"]))
    loop = LoopConfig(steps=500, batch_size=4, num_workers=0, log_every=10, checkpoint_every=500, device="cpu")
    spec = RunSpec(Root(tmp_path), "expert", "action-expert", None, {}, {})
    before = task.evaluate(model.eval(), [task.collate(samples)])
    result = fit(task, MemoryStream(samples, seed=1), spec, loop,
                 OptimConfig(lr=2e-3, warmup_steps=5, schedule="constant"), eval_stream=MemoryStream(samples, seed=1))
    losses = train_losses(tmp_path, "expert")  # each line is the mean of 10 steps
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5])
    assert result.eval["action_mse"] < 0.3 * before["action_mse"]
    assert all(not p.requires_grad for p in task.decouplers.parameters())


def test_checkpoints_count_only_when_complete_and_keep_last(tmp_path):
    task, stream, spec, cfg = decoupler_run(tmp_path, "ckpt", 12)
    fit(task, stream, spec, cfg.loop, cfg.optim)
    run = RunDir(Root(tmp_path), "ckpt")
    assert run.checkpoints() == [8, 12]  # every 4 steps, the last 2 kept
    info = run.info(12)
    assert info.step == 12 and info.export_id == "export-test" and info.target_versions == spec.target_versions
    assert info.config["loop"]["steps"] == 12 and set(info.files) == {"model.safetensors", "trainer.pt"}
    # A folder without its _COMPLETE marker (a crash mid-write) does not exist for the loop.
    partial = tmp_path / "runs" / "ckpt" / "step-16"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert run.latest() == 12
    # A modified checkpoint file is refused.
    (tmp_path / "runs" / "ckpt" / "step-12" / "trainer.pt").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256 does not match"):
        run.load(12)


def test_version_guard_refuses_other_target_versions_unless_allowed(tmp_path):
    task, stream, spec, cfg = decoupler_run(tmp_path, "guard", 4)
    fit(task, stream, spec, cfg.loop, cfg.optim)
    other = {"onestep": "video-000000000002"}
    task, stream, spec, cfg = decoupler_run(tmp_path, "guard", 8, versions=other)
    with pytest.raises(ValueError, match="video-000000000001 -> video-000000000002.*--allow-version-change"):
        fit(task, stream, spec, cfg.loop, cfg.optim)
    result = fit(task, stream, spec, cfg.loop, cfg.optim, allow_version_change=True)
    assert result.step == 8 and result.resumed_from == 4
    change = RunDir(Root(tmp_path), "guard").info(8).version_changes[0]
    assert change["from_versions"] == {"onestep": "video-000000000001"} and change["to_versions"] == other
    run_json = json.loads((tmp_path / "runs" / "guard" / "run.json").read_text())
    assert run_json["version_changes"][0]["step"] == 4


def test_a_checkpoint_of_another_run_or_architecture_is_refused_in_one_line(tmp_path):
    import shutil

    task, stream, spec, cfg = decoupler_run(tmp_path, "first", 4)
    fit(task, stream, spec, cfg.loop, cfg.optim)
    shutil.copytree(tmp_path / "runs" / "first", tmp_path / "runs" / "copied")
    task, stream, spec, cfg = decoupler_run(tmp_path, "copied", 8)
    with pytest.raises(ValueError, match="run copied: step-4 belongs to run 'first' \\(decoupler\\), not this"):
        fit(task, stream, spec, cfg.loop, cfg.optim)
    task, stream, spec, cfg = decoupler_run(tmp_path, "first", 8)
    task.model = Decoupler(build_decoupler_config(cfg, [T, H, W, C_IN], [T, H, W, 2 * C_T]))  # another width
    with pytest.raises(ValueError) as err:
        fit(task, stream, spec, cfg.loop, cfg.optim)
    line = str(err.value)
    assert "run first: step-4 does not fit this run's model or optimizer" in line and "\n" not in line


def test_schedule_warms_up_then_decays():
    cosine = WarmupSchedule(100, OptimConfig(warmup_steps=10, min_lr_ratio=0.1))
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    tri = WarmupSchedule(100, OptimConfig(warmup_steps=10, schedule="tristage", hold_fraction=0.5))
    assert tri(50) == 1.0 and tri(54) == 1.0 and tri(100) == pytest.approx(0.0)
    assert WarmupSchedule(20, OptimConfig(warmup_steps=100))(2) == 1.0  # warm-up is at most a tenth of the run


def test_load_config_reads_toml_applies_overrides_and_names_unknown_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('teacher = "da3"\nsize = "tiny"\n[optim]\nlr = 0.002\n[loop]\nsteps = 50\n')
    cfg = load_config(DecouplerRunConfig, path, {"loop.steps": 7, "loop.device": None})
    assert (cfg.teacher, cfg.size, cfg.optim.lr, cfg.loop.steps, cfg.loop.device) == ("da3", "tiny", 0.002, 7, "auto")
    path.write_text("[loop]\nstepz = 3\n")
    with pytest.raises(ValueError, match=r"run.toml: unknown key 'loop.stepz'"):
        load_config(DecouplerRunConfig, path)


def _ddp_rank(rank: int, world: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    task, _, spec, cfg = decoupler_run(tmp, "ddp", 4)
    fit(task, MemoryStream(decoupler_samples(16), seed=1, rank=rank, world=world), spec, cfg.loop, cfg.optim)
    torch.distributed.destroy_process_group()


def test_ddp_two_ranks_on_cpu(tmp_path):
    with socket.socket() as probe:  # a free port: other jobs on this machine may run their own groups
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path)), nprocs=2)
    info = RunDir(Root(tmp_path), "ddp").info(4)
    assert info.world == 2 and set(info.stream) == {"0", "1"}
    assert info.stream["0"]["workers"] != info.stream["1"]["workers"] or info.stream["0"] == info.stream["1"]
    metrics = read_metrics(Root(tmp_path), "ddp")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[0]["samples_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_with_prefetch_thread_bf16_and_resume(tmp_path):
    task, stream, spec, cfg = decoupler_run(tmp_path, "gpu", 12, workers=2)
    cfg.loop.device = "cuda"
    stopped = fit(task, stream, spec, cfg.loop, cfg.optim, stop_at=6)
    assert stopped.step == 6 and next(task.model.parameters()).is_cuda
    task, stream, spec, cfg = decoupler_run(tmp_path, "gpu", 12, workers=2)
    cfg.loop.device = "cuda"
    resumed = fit(task, stream, spec, cfg.loop, cfg.optim)
    assert resumed.resumed_from == 6 and resumed.step == 12
    losses = train_losses(tmp_path, "gpu")
    assert len(losses) == 12 and all(np.isfinite(losses))


def test_prefetch_thread_closes_on_an_endless_source_and_passes_errors():
    def endless():
        step = 0
        while True:
            step += 1
            yield torch.full((2,), float(step)), {"worker": 0, "state": step}

    fed = DevicePrefetcher(endless(), torch.device("cpu"), threaded=True)
    firsts = [next(fed) for _ in range(5)]
    assert [tag["state"] for _, tag in firsts] == [1, 2, 3, 4, 5]
    fed.close()  # must return although the source never ends and the queue refills
    assert not fed.thread.is_alive()

    def broken():
        yield torch.zeros(1), {"worker": 0, "state": 1}
        raise ValueError("shard 3 is corrupt")

    fed = DevicePrefetcher(broken(), torch.device("cpu"), threaded=True)
    next(fed)
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        next(fed)
    fed.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefetcher_accepts_a_bare_cuda_device():
    def batches():
        while True:
            yield {"x": torch.ones(4)}, {"worker": 0, "state": 0}

    fed = DevicePrefetcher(batches(), torch.device("cuda"))
    batch, _ = next(fed)
    assert batch["x"].is_cuda and float(batch["x"].sum()) == 4.0
    fed.close()
