"""π0.5 (transformers PI05ForConditionalGeneration) as a Shallow-π teacher, tiny: the state in the
prompt, targets, the student cut, the losses, the flow's version and online training from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers.models.pi05")

from foresight.flows import pi0 as pi0_flow
from foresight.flows.build import build, in_process  # noqa: E402
from foresight.pipelines import pi0  # noqa: E402
from foresight.storage.fs import open_root  # noqa: E402
from foresight.storage.targets import TargetStore  # noqa: E402
from tests.test_pi0_train import PLAN, export_version, write_dataset  # noqa: E402
from foresight.trainers import shallow_pi  # noqa: E402
from foresight.trainers.config import LoopConfig  # noqa: E402

PARAMS = dict(cameras=["front"], tokenizer="bytes", image_size=28, pairs=2, attn_layers=[1, 2],
              attn_dtype="float32", max_text_tokens=96)


@pytest.fixture(scope="module")
def teacher():
    loaded = pi0.load_pi0("tiny", tiny_layers=4, family="pi05")
    assert loaded.identity.family == "pi05"
    return loaded.model


def samples(count: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    params = pi0.Pi0TargetParams(**PARAMS)
    return pi0.stack_samples([pi0.assemble_sample(rng.integers(0, 256, (1, 28, 28, 3), dtype=np.uint8),
                                                  f"open_drawer {i}", rng.uniform(-1, 1, 5),
                                                  rng.normal(size=(50, 4)), params, None, family="pi05")
                              for i in range(count)])


def test_pi05_prompt_is_the_processors_with_the_discretised_state():
    from types import SimpleNamespace

    from transformers import PI05Processor

    state = np.array([-1.0, -0.3, 0.0, 0.999, 0.42], dtype=np.float32)
    ours = pi0.pi05_prompt(" open_drawer\n", state)
    stub = SimpleNamespace(image_token="<image>", image_seq_length=2, tokenizer=SimpleNamespace(bos_token="<bos>"))
    theirs = PI05Processor.build_prompts(stub, [" open_drawer\n"], [[None]], torch.from_numpy(state)[None])[0]
    assert theirs == "<image><image><bos>" + ours
    assert ours.startswith("Task: open drawer, State: 0 ") and ours.endswith(" 255 181;\nAction: ")
    arrays = samples(1)
    text = bytes(int(i) - pi0.BYTE_TOKEN_OFFSET for i in arrays["text_ids"][0][1:arrays["text_mask"][0].sum()])
    assert text.decode().startswith("Task: open drawer 0, State: ") and text.decode().endswith(";\nAction: ")


def test_pi05_targets_student_and_losses(teacher):
    params = pi0.Pi0TargetParams(**PARAMS)
    arrays = pi0.compute_targets(teacher, samples(), ["a", "b", "c"], "pi0-000000000005", params)
    assert arrays["velocity"].shape == (3, 2, 50, 32)
    assert arrays["attn"].shape == (3, 2, 2, 50, pi0.prefix_length(teacher.config, 1, 96))
    np.testing.assert_allclose(arrays["attn"].sum(-1), 1.0, atol=1e-5)
    student, layer_map = shallow_pi.build_student(teacher, 3)  # map [0, 2, 3]; middle student layer 1 -> 2
    assert type(student).__name__ == "PI05ForConditionalGeneration" and layer_map == [0, 2, 3]
    shallow_pi.freeze_unused(student)  # π0.5's expert has no token embedding: nothing to freeze, no error
    batch = pi0.make_batch(arrays, teacher.config)
    offline = shallow_pi.offline_targets(arrays, np.array([1, 0, 1]), [2], "cpu")
    online = shallow_pi.online_targets(teacher, batch, offline.t_B.clone(), offline.noise_BAD.clone(), [2])
    torch.testing.assert_close(offline.velocity_BAD, online.velocity_BAD)
    losses = shallow_pi.distill_losses(student, batch, online, [1], 1.0, 1.0)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["kd"] > 0 and losses["attn"] > 0
    losses["total"].backward()
    assert student.model.dit.layers[0].input_layernorm.dense.weight.grad is not None  # π0.5's adaptive norm


def test_pi05_flow_version_and_online_training(tmp_path):
    root = str(tmp_path)
    write_dataset(root)
    config = pi0_flow.Pi0TargetsConfig(plan=PLAN, model="tiny", family="pi05", pairs=0, attn_layers=[],
                                       shard_size=3, batch=3, max_text_tokens=96)
    result = build(pi0_flow.PI0, root, config, in_process)
    assert TargetStore(root).manifest(result.version).recipe.model.family == "pi05"
    export = export_version(root, result.version)
    loop = LoopConfig(steps=2, batch_size=2, num_workers=0, device="cpu", log_every=1, progress=False)
    cfg = shallow_pi.ShallowPiRunConfig(layers=2, attn_layers=[1], loop=loop)  # family read from the version
    fit = shallow_pi.train_shallow_pi(open_root(root), export, cfg, run_id="spi-pi05", eval_export=export)
    assert fit.step == 2 and fit.eval["teacher_velocity_mse"] > 0 and fit.eval["attn"] > 0
    student, info = shallow_pi.load_student(open_root(root), "spi-pi05")
    assert type(student).__name__ == "PI05ForConditionalGeneration"
    assert info.config["run"]["teacher_family"] == "pi05" and info.config["teacher"]["family"] == "pi05"
