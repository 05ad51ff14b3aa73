"""Pipeline files: typed sections, clear errors, linked ids, the summary table, and the configs
shipped in docs/ and prefect.yaml (which must stay valid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from foresight.flows.generate import GenerateConfig, TextConfig
from foresight.flows.pipeline import PipelineConfig, PipelineSummary, StageResult, format_summary, load_pipeline
from foresight.flows.teachers import TeachersConfig

REPO = Path(__file__).resolve().parent.parent

CHAIN = """
dataset = "toy"
[ingest]
kind = "teleop"
src = "/data/aloha"
[plan]
frames = 4
[text]
model = "tiny"
[generate]
model = "tiny"
params = { num_frames = 4, size = 32, steps = 2 }
[[teachers]]
teacher = "dinov2"
model = "tiny"
[[teachers]]
teacher = "dinov2"
model = "random"
alias = "dino_full"
[export]
codec = "fp8"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_sections_are_the_stage_configs_with_ids_linked(tmp_path):
    config = load_pipeline(write(tmp_path, CHAIN))
    assert config.ingest.kind == "teleop" and config.runner.uses_dask is False
    configs = config.stage_configs("plan-aaaaaaaaaaaa", "text-bbbbbbbbbbbb", "video-cccccccccccc")
    assert configs["plan"].dataset == "toy" and configs["plan"].frames == 4
    assert configs["text"] == TextConfig(plan="plan-aaaaaaaaaaaa", model="tiny")
    assert isinstance(configs["generate"], GenerateConfig)
    assert (configs["generate"].plan, configs["generate"].text) == ("plan-aaaaaaaaaaaa", "text-bbbbbbbbbbbb")
    assert configs["generate"].params.steps == 2
    assert configs["teachers"][1] == TeachersConfig(video="video-cccccccccccc", teacher="dinov2", model="random")
    assert config.teachers[1].alias == "dino_full"


@pytest.mark.parametrize("text, message", [
    (CHAIN.replace('model = "tiny"\n[generate]', 'model = "tiny"\nplan = "plan-x"\n[generate]'),
     "unknown key 'text.plan'"),  # ids the chain links cannot be set by hand
    (CHAIN.replace("steps = 2", "steps = 0"), "generate.params.steps"),
    (CHAIN.replace('kind = "teleop"', 'kind = "ftp"'), "ingest"),
    ('dataset = "toy"\n[generate]\nmodel = "tiny"\n', "[generate] needs a [text] section"),
    ('dataset = "toy"\n[text]\nmodel = "tiny"\n[[teachers]]\nteacher = "dinov2"\nmodel = "tiny"\n',
     "[[teachers]] need a [generate] section"),
    ('dataset = "toy"\n[text]\nmodel = "tiny"\nbatch_size = 3\n', "unknown key 'text.batch_size'"),
    ('dataset = "a/b"\n', "only letters, digits"),
    ('dataset = "toy"\n[runner]\ndask_local = 2\ndask_address = "tcp://h:1"\n', "not both"),
])
def test_bad_pipeline_files_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_pipeline(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unreadable_pipeline_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_pipeline(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_pipeline(write(tmp_path, "dataset = \n"))


def test_summary_table_lists_each_stage():
    summary = PipelineSummary(name="tiny", root="s3://bucket/x", runner="2 local thread(s)", seconds=12.5, stages=[
        StageResult(stage="plan", status="skipped", output="plan-aaaaaaaaaaaa", seconds=0.01, detail="8 clips"),
        StageResult(stage="generate", status="ran", output="video-cccccccccccc", seconds=12.3,
                    detail="4 shard(s), 8 clips")])
    lines = format_summary(summary).splitlines()
    assert lines[0] == "pipeline tiny on s3://bucket/x (2 local thread(s))"
    assert lines[1].split() == ["stage", "status", "seconds", "output", "detail"]
    assert lines[3].split()[:4] == ["plan", "skipped", "0.0", "plan-aaaaaaaaaaaa"]
    assert lines[4].split()[:4] == ["generate", "ran", "12.3", "video-cccccccccccc"]
    assert lines[-1] == "1 stage(s) ran, 1 skipped, 12.5 s in total"


def test_shipped_pipeline_configs_are_valid():
    assert load_pipeline(REPO / "docs" / "pipeline-tiny.toml").teachers[1].teacher == "da3"
    deployments = [deployment for path in (REPO / "prefect.yaml", REPO / "docs" / "prefect-svam-calvin.yaml")
                   for deployment in yaml.safe_load(path.read_text())["deployments"]]
    for deployment in deployments:
        assert deployment["entrypoint"] == "foresight.flows.pipeline.pipeline_flow"
        config = PipelineConfig.model_validate(deployment["parameters"]["config"])
        assert config.name == deployment["name"]
