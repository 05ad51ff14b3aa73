"""Closed-loop MetaWorld evaluation through `foresight eval metaworld`: the loop, the record, resuming.

The scripted oracle (MetaWorld's expert behind the policy interface) must reach the expert's own
success on two easy tasks: that proves the action space, chunk execution, step limit and success flag.
Step limits are small and no frame is rendered except in the video test, to keep the file fast.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.flows.cli.common import user_error_message
from foresight.pipelines.eval.policy import Observation, Policy
from foresight.pipelines.eval.rollout import EVAL_SEED_BASE, check_disjoint_seeds, make_env, run_episode
from foresight.pipelines.eval.stats import wilson_interval
from foresight.pipelines.viz import mp4_frames
from foresight.schemas.eval import PolicyIdentity
from foresight.storage.evals import EvalStore

TASKS = ["reach", "button-press"]
SEEDS = [EVAL_SEED_BASE, EVAL_SEED_BASE + 1]
LIMIT = 150
runner = CliRunner()


def foresight_eval(root, *args: str) -> dict:
    result = runner.invoke(app, ["eval", "metaworld", "--root", str(root), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def episodes_of(outcome_root, eval_id: str) -> list[tuple]:
    return [(r.task, r.seed, r.success, r.steps, r.success_step, r.policy_calls)
            for r in EvalStore(outcome_root).episodes(eval_id)]


def expert_success(task: str, seed: int, limit: int) -> bool:
    """The scripted expert's own success, by a bare loop outside the eval machinery."""
    from metaworld.policies import ENV_POLICY_MAP

    env = make_env(task, seed, "corner2", 64, render=False)
    try:
        obs, _ = env.reset(seed=seed)
        expert = ENV_POLICY_MAP[f"{task}-v3"]()
        for _ in range(limit):
            obs, _, _, _, info = env.step(np.clip(expert.get_action(obs), -1, 1))
            if info["success"]:
                return True
        return False
    finally:
        env.close()


@pytest.fixture(scope="module")
def oracle_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    outcome = foresight_eval(root, "--policy", "oracle", "--tasks", ",".join(TASKS), "--seeds",
                             f"{SEEDS[0]}-{SEEDS[-1]}", "--max-steps", str(LIMIT))
    return root, outcome


def test_oracle_reaches_the_experts_success(oracle_eval):
    root, outcome = oracle_eval
    record = outcome["record"]
    assert outcome["ran"] == 4 and outcome["skipped"] == 0
    assert record["status"] == "complete"
    expected = {(t, s): expert_success(t, s, LIMIT) for t in TASKS for s in SEEDS}
    got = {(r[0], r[1]): r[2] for r in episodes_of(root, record["eval_id"])}
    assert got == expected and all(expected.values())
    rates = {row["task"]: row["rate"] for row in record["summary"]}
    assert rates == {"reach": 1.0, "button-press": 1.0}
    low, high = wilson_interval(2, 2)
    assert record["summary"][0]["ci_low"] == pytest.approx(low) and record["summary"][0]["ci_high"] == 1.0
    assert record["key"]["step_limits"] == {"reach": LIMIT, "button-press": LIMIT}
    assert [(g["task"], g["successes"], g["episodes"]) for g in record["groups"]] == [("easy", 4, 4)]


def test_random_policy_fails_and_reruns_identically(tmp_path):
    args = ["--policy", "random", "--tasks", ",".join(TASKS), "--episodes", "1", "--max-steps", "60"]
    first = foresight_eval(tmp_path / "a", *args)
    second = foresight_eval(tmp_path / "b", *args)
    assert first["record"]["overall"]["successes"] == 0
    eval_id = first["record"]["eval_id"]
    assert second["record"]["eval_id"] == eval_id
    one, two = episodes_of(tmp_path / "a", eval_id), episodes_of(tmp_path / "b", eval_id)
    assert one == two and [r[5] for r in one] == [6, 6]  # 60 steps in chunks of 10
    again = foresight_eval(tmp_path / "a", *args)
    assert again["ran"] == 0 and again["skipped"] == 2


def test_interrupted_eval_finishes_only_the_missing_episodes(oracle_eval):
    root, outcome = oracle_eval
    eval_id = outcome["record"]["eval_id"]
    folder = root / "evals" / eval_id / "episodes"
    kept = {p: p.stat().st_mtime_ns for p in folder.rglob("*.json") if p.name != f"{SEEDS[1]}.json"
            or p.parent.name != "reach"}
    before = episodes_of(root, eval_id)
    (folder / "reach" / f"{SEEDS[1]}.json").unlink()  # what a kill before that episode's end leaves
    resumed = foresight_eval(root, "--policy", "oracle", "--tasks", ",".join(TASKS), "--seeds",
                             f"{SEEDS[0]}-{SEEDS[-1]}", "--max-steps", str(LIMIT))
    assert resumed["ran"] == 1 and resumed["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert episodes_of(root, eval_id) == before  # the rerun episode is the same rollout
    assert resumed["record"]["overall"]["successes"] == 4


class FixedChunk(Policy):
    """Zero actions in chunks of 7."""

    def identity(self) -> PolicyIdentity:
        return PolicyIdentity(kind="random", settings={"test": "fixed"})

    def reset(self, task: str, instruction: str, seed: int) -> None:
        """Stateless: every episode gets the same zero chunks."""

    def act(self, obs: Observation) -> np.ndarray:
        assert obs.frame is None and obs.state.shape == (39,)
        return np.full((7, 4), 3.0, np.float32)  # clipped to the action box


def test_chunks_run_open_loop_for_their_length_up_to_the_step_limit():
    rollout = run_episode(FixedChunk(), "reach", EVAL_SEED_BASE, step_limit=20)
    assert rollout.result.steps == 20 and rollout.result.policy_calls == 3 and not rollout.result.success


def test_video_contact_sheet_and_report(tmp_path):
    outcome = foresight_eval(tmp_path, "--policy", "oracle", "--tasks", "reach", "--episodes", "1", "--max-steps", "8",
                             "--size", "32", "--video")
    eval_id = outcome["record"]["eval_id"]
    folder = tmp_path / "evals" / eval_id
    frames = mp4_frames((folder / "videos" / f"reach-{EVAL_SEED_BASE}.mp4").read_bytes())
    assert frames.shape == (4, 32, 32, 3)  # 8 steps, every second one kept
    html = (folder / "report.html").read_text()
    assert "success.png" in html and "rollouts.png" in html and f"videos/reach-{EVAL_SEED_BASE}.mp4" in html
    assert (folder / "success.png").stat().st_size > 0 and (folder / "rollouts.png").stat().st_size > 0


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_eval_seeds_must_not_be_demonstration_seeds():
    with pytest.raises(ValueError, match="demonstration seeds"):
        check_disjoint_seeds([3, 4], {"reach": {0, 1, 2, 3}}, ["reach"], "eval")


def test_run_whose_versions_are_missing_is_refused_in_one_line(tmp_path):
    step = tmp_path / "runs" / "ghost" / "step-5"
    step.mkdir(parents=True)
    info = {"step": 5, "run_id": "ghost", "kind": "action-expert", "export_id": None, "world": 1, "stream": {},
            "target_versions": {"onestep": "video-000000000000", "text": "text-000000000000"},
            "config": {"run": {"text_field": "text"}, "decouplers": []}}
    (step / "checkpoint.json").write_text(json.dumps(info))
    (step / "_COMPLETE").write_text("")
    result = runner.invoke(app, ["eval", "metaworld", "--run", "ghost", "--tasks", "reach", "--root", str(tmp_path)])
    message = user_error_message(result.exception)  # what `foresight` prints, as one line, on stderr
    assert result.exit_code != 0 and message is not None and "\n" not in message
    assert "video-000000000000" in message and "text-000000000000" in message and "not (completely) in" in message


def test_difficulty_groups_pool_their_tasks_episodes():
    from foresight.pipelines.eval.stats import summarize_groups
    from foresight.schemas.eval import EpisodeResult

    def result(task: str, seed: int, success: bool) -> EpisodeResult:
        return EpisodeResult(task=task, seed=seed, success=success, steps=10, policy_calls=1, wall_s=0.1)

    results = [result("reach", 0, True), result("door-open", 0, False), result("pick-place", 0, True),
               result("pick-place", 1, True)]
    groups = summarize_groups(results, ["reach", "pick-place", "door-open"])
    assert [(g.task, g.successes, g.episodes) for g in groups] == [("easy", 1, 2), ("hard", 2, 2)]
    assert groups[0].ci_low == pytest.approx(wilson_interval(1, 2)[0])
