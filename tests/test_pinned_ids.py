"""Version ids of unchanged recipes never move: a tiny chain built through the CLI gives these ids.

The ids below were recorded at commit f3f5282 (before the build-seam redesign of issue 17). A
change that moves one of them changes what an existing root's versions are called, so users'
pinned exports and audits would no longer find them: it must come with a keyed reason (a new
stage_version or parameter), and this table is then updated on purpose, never to make a test pass.
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from factories import make_dataset, write_episode
from foresight.flows.cli import app

ID = re.compile(r"\b(plan|text|video|teacher|pi0|export)-[0-9a-f]{12}\b")

PINNED = {
    "plan": "plan-09d9703e9cd7",
    "text": "text-2971ab6dded8",
    "video": "video-b0a5baaccfd8",
    "dinov2": "teacher-4c1b74de4ab7",
    "da3": "teacher-666ea39664b6",
    "pi0": "pi0-695584692072",
    "export": "export-10a7a8025b65",
}


def _first_token(cli: CliRunner, args: list[str]) -> str:
    """The id the command prints (the first ``<kind>-<12 hex>`` in its output: log lines may come first)."""
    result = cli.invoke(app, args)
    assert result.exit_code == 0, f"{args[0]}: {result.output}"
    found = ID.search(result.output)
    assert found, f"{args[0]}: no id in {result.output!r}"
    return found.group(0)


@pytest.fixture(scope="module")
def chain_ids(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("pins"))
    store = make_dataset(root, name="pins", camera="cam", size=32)
    for index in range(2):
        write_episode(store, f"ep{index}", length=20, seed=index, camera="cam")
    cli, at = CliRunner(), ["--root", root]
    ids = {"plan": _first_token(cli, ["plan", "--dataset", "pins", "--frames", "4", "--stride", "1", "--every", "6",
                                      "--limit", "4", *at])}
    ids["text"] = _first_token(cli, ["text", "--plan", ids["plan"], "--model", "tiny", "--shard-size", "2", *at])
    ids["video"] = _first_token(cli, ["generate", "--plan", ids["plan"], "--text", ids["text"], "--model", "tiny",
                                      "--steps", "2", "--size", "32", "--batch", "2", "--shard-size", "2",
                                      "--device", "cpu", "--dtype", "fp32", *at])
    for teacher in ("dinov2", "da3"):
        ids[teacher] = _first_token(cli, ["teachers", "--video", ids["video"], "--teacher", teacher,
                                          "--model", "tiny", "--batch", "2", *at])
    ids["pi0"] = _first_token(cli, ["pi0-targets", "--plan", ids["plan"], "--model", "tiny", "--pairs", "1",
                                    "--state-indices", "0-5", "--shard-size", "2", "--batch", "2",
                                    "--max-text-tokens", "24", *at])
    ids["export"] = _first_token(cli, ["export", "--plan", ids["plan"], "--targets",
                                       f"{ids['video']},{ids['dinov2']},{ids['da3']}", *at])
    return ids


@pytest.mark.parametrize("stage", list(PINNED))
def test_unchanged_recipes_keep_their_ids(chain_ids, stage):
    assert chain_ids[stage] == PINNED[stage], f"{stage}: the id of an unchanged recipe moved"


# ---------------------------------------------------------------- the fast SVD recipe (issue 19)
PINNED_FAST_VIDEO = "video-0c1c295142db"
"""``generate --recipe fast`` on the chain above (same plan, text and options as ``video``)."""


def test_fast_recipe_has_its_own_stable_id(tmp_path_factory):
    """The id ``generate ... --recipe fast`` would write (tests/test_svd_fast.py builds one through
    the CLI); here from the stage's recipe, which is what the build keys, without generating."""
    from foresight.flows.configs import GenerateConfig
    from foresight.flows.generate import GENERATE
    from foresight.schemas.svd import SVDParams

    root = str(tmp_path_factory.mktemp("pins-fast"))
    store = make_dataset(root, name="pins", camera="cam", size=32)
    for index in range(2):
        write_episode(store, f"ep{index}", length=20, seed=index, camera="cam")
    cli, at = CliRunner(), ["--root", root]
    plan = _first_token(cli, ["plan", "--dataset", "pins", "--frames", "4", "--stride", "1", "--every", "6",
                              "--limit", "4", *at])
    text = _first_token(cli, ["text", "--plan", plan, "--model", "tiny", "--shard-size", "2", *at])
    assert (plan, text) == (PINNED["plan"], PINNED["text"])
    config = GenerateConfig(plan=plan, text=text, model="tiny", params=SVDParams(steps=2, size=32), batch=2,
                            shard_size=2, device="cpu", dtype="fp32", recipe="fast")
    fast = GENERATE.recipe(root, config).version_id()
    assert fast != PINNED["video"]
    assert fast == PINNED_FAST_VIDEO, "the id of the unchanged fast recipe moved"
