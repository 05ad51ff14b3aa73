"""One source of defaults: every stage option is derived from its config field, the CLI and
``pipeline.toml`` build the same configs (``auto`` devices included) and the same versions, and
a numerics setting other than the default is keyed."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

import foresight.pipelines.devices
from foresight.flows.cli import app
from foresight.flows.cli.options import CHOICES, CONFIG_FIELD, field_default, literal_choices, shown_default
from foresight.flows.export import ExportConfig
from foresight.flows.generate import GenerateConfig, PlanConfig, TextConfig, video_params
from foresight.flows.pi0 import Pi0TargetsConfig
from foresight.flows.pipeline import PipelineConfig, pipeline_flow
from foresight.flows.runtime import RunnerChoice, run_flow
from foresight.flows.teachers import TeachersConfig

from foresight.storage.exports import ExportStore
from foresight.storage.fs import open_root
from foresight.storage.targets import TargetStore
from factories import make_dataset, write_episode

STAGE_COMMANDS = ("plan", "text", "generate", "teachers", "pi0-targets", "export")
NOT_CONFIG = {"root", "runner_workers", "runner_dask_local", "runner_dask_address"}
"""Options of the stage commands that set no config field: the data root and the task runner."""
REQUIRED = {
    "plan": (PlanConfig, ["--dataset", "toy"], {"dataset": "toy"}),
    "text": (TextConfig, ["--plan", "p", "--model", "tiny"], {"plan": "p", "model": "tiny"}),
    "generate": (GenerateConfig, ["--plan", "p", "--text", "t", "--model", "tiny"],
                 {"plan": "p", "text": "t", "model": "tiny"}),
    "teachers": (TeachersConfig, ["--video", "v", "--teacher", "dinov2", "--model", "tiny"],
                 {"video": "v", "teacher": "dinov2", "model": "tiny"}),
    "pi0-targets": (Pi0TargetsConfig, ["--plan", "p"], {"plan": "p"}),
    "export": (ExportConfig, ["--plan", "p", "--targets", "a,b"], {"plan": "p", "targets": ["a", "b"]}),
}
"""Per command: its config model, the required options, and the config fields they set."""


def stage_command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


def test_every_stage_option_is_derived_from_its_config_field():
    for name in STAGE_COMMANDS:
        command = stage_command(name)
        by_name = {param.name: param for param in command.params}
        for parameter in inspect.signature(command.callback).parameters.values():
            if parameter.name in NOT_CONFIG:
                continue
            option = parameter.default
            assert hasattr(option, CONFIG_FIELD), f"{name} --{parameter.name}: not derived from a config field"
            model, field = getattr(option, CONFIG_FIELD)
            info = model.model_fields[field]
            clicked = by_name[parameter.name]
            where = f"{name} --{parameter.name} ({model.__name__}.{field})"
            if info.is_required():
                assert clicked.required, where
            else:
                # Not given = None: the config model (or a preset) fills in its own default.
                assert clicked.default is None and not clicked.required, where
                if parameter.name == "onestep":  # words for the field's two states: the default model or None
                    assert clicked.show_default == "extractor" and field_default(info) is not None, where
                else:
                    assert clicked.show_default == shown_default(field_default(info)), where
            assert clicked.help.startswith(info.description), where
            choices = getattr(option, CHOICES)
            if choices is not None and parameter.name != "onestep":  # onestep maps words onto a model or None
                assert choices == literal_choices(info.annotation), where
            assert literal_choices(clicked.type_descriptor.annotation) == choices, where


class Captured(Exception):
    """Raised by the stubbed runners with the config the command built."""

    def __init__(self, config):
        super().__init__("captured")
        self.config = config


def capture_configs(monkeypatch) -> None:
    """Stub what each stage command hands its config to, so invoking it only builds the config."""
    def stop(*args, config=None, **kwargs):
        raise Captured(config if config is not None else args[1])

    monkeypatch.setattr("foresight.flows.runtime.run_flow", stop)
    monkeypatch.setattr("foresight.flows.export.run_export", lambda root, config, runner=None: stop(config=config))
    monkeypatch.setattr("foresight.flows.pi0.run_pi0_targets", lambda root, config, runner=None: stop(config=config))
    monkeypatch.setattr("foresight.flows.generate.make_plan", lambda root, config: stop(config=config))
    monkeypatch.setattr("foresight.flows.teachers_io.open_video", lambda root, video: None)


def cli_config(name: str, root: Path, *extra: str):
    result = CliRunner().invoke(app, [name, *REQUIRED[name][1], *extra, "--root", str(root)])
    assert isinstance(result.exception, Captured), result.output
    return result.exception.config


def test_a_command_given_only_its_required_options_builds_the_models_defaults(monkeypatch, tmp_path):
    capture_configs(monkeypatch)
    for name, (model, _, values) in REQUIRED.items():
        assert cli_config(name, tmp_path) == model(**values), name


def test_a_value_outside_the_fields_choices_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["generate", *REQUIRED["generate"][1], "--compile", "fast"])
    assert result.exit_code == 2 and "fast" in result.output


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_resolves_the_same_from_the_cli_the_config_and_the_pipeline_file(monkeypatch, tmp_path, cuda):
    monkeypatch.setattr(foresight.pipelines.devices, "cuda_available", lambda: cuda)
    capture_configs(monkeypatch)
    device = "cuda" if cuda else "cpu"
    expected = {"text": (device, None), "generate": (device, "fp16" if cuda else "fp32"),
                "teachers": (device, "fp32"), "pi0-targets": (device, "float32")}
    for name, (model, _, values) in REQUIRED.items():
        if name not in expected:
            continue
        built = cli_config(name, tmp_path), model(**values)
        for config in built:
            assert (config.device, getattr(config, "dtype", None)) == expected[name], name
    pipeline = PipelineConfig(dataset="toy", text={"model": "tiny"}, generate={"model": "tiny"},
                              teachers=[{"teacher": "dinov2", "model": "tiny"}])
    configs = pipeline.stage_configs("p", "t", "v")
    assert configs["generate"] == cli_config("generate", tmp_path)
    assert configs["text"] == cli_config("text", tmp_path)
    assert configs["teachers"][0] == cli_config("teachers", tmp_path)
    assert video_params(configs["generate"])["dtype"] == expected["generate"][1]


def test_an_explicit_device_or_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(foresight.pipelines.devices, "cuda_available", lambda: True)
    config = GenerateConfig(plan="p", text="t", model="tiny", device="cpu")
    assert (config.device, config.dtype) == ("cpu", "fp32")
    config = GenerateConfig(plan="p", text="t", model="tiny", device="cuda:1", dtype="bf16")
    assert (config.device, config.dtype) == ("cuda:1", "bf16")


def test_compile_is_keyed_only_when_it_is_not_none():
    plain = GenerateConfig(plan="p", text="t", model="tiny")
    assert "compile" not in video_params(plain)  # uncompiled versions keep the ids they always had
    for scope in ("blocks", "unet"):
        assert video_params(GenerateConfig(plan="p", text="t", model="tiny", compile=scope))["compile"] == scope


# ---------------------------------------------------------------- the same chain, two ways
PLAN = {"frames": 4, "stride": 1, "every": 4, "limit": 4}
TINY_SVD = {"size": 32, "steps": 1}


def write_toy(root: str) -> None:
    store = make_dataset(root, "toy", camera="cam", size=24)
    for index, length in enumerate((16, 12)):
        write_episode(store, f"ep{index}", length=length, seed=index, camera="cam", task=f"task{index}")


def build_with_cli(root: str) -> dict[str, str]:
    """plan -> text -> generate -> teachers -> export through ``foresight``; the ids it printed."""
    def call(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--root", root])
        assert result.exit_code == 0, result.output
        return result.output.split()[0]

    ids = {"plan": call("plan", "--dataset", "toy", *(f"--{k}={v}" for k, v in PLAN.items()))}
    ids["text"] = call("text", "--plan", ids["plan"], "--model", "tiny")
    ids["generate"] = call("generate", "--plan", ids["plan"], "--text", ids["text"], "--model", "tiny",
                           "--steps", "1", "--size", "32", "--batch", "2")
    ids["teachers"] = call("teachers", "--video", ids["generate"], "--teacher", "dinov2", "--model", "tiny")
    ids["export"] = call("export", "--plan", ids["plan"], "--targets",
                         ",".join(ids[stage] for stage in ("text", "generate", "teachers")))
    return ids


def build_with_pipeline(root: str) -> dict[str, str]:
    config = PipelineConfig(dataset="toy", plan=PLAN, text={"model": "tiny"},
                            generate={"model": "tiny", "params": TINY_SVD, "batch": 2},
                            teachers=[{"teacher": "dinov2", "model": "tiny"}], export={})
    summary = run_flow(pipeline_flow, RunnerChoice(), open_root(root), config=config, root_url=root)
    return {row.stage.split(":")[0]: row.output for row in summary.stages}


def stored_bytes(root: str, ids: dict[str, str]) -> dict[str, object]:
    """The checksums every version's manifest records for its shards, and the export's shard hashes."""
    digests: dict[str, object] = {stage: TargetStore(root).open(ids[stage]).sums.by_shard()
                                  for stage in ("text", "generate", "teachers")}
    digests["export"] = [(shard.name, shard.sha256) for shard in ExportStore(open_root(root)).index(ids["export"]).shards]
    return digests


@pytest.mark.slow
def test_the_cli_and_the_pipeline_file_build_the_same_versions_and_bytes(tmp_path):
    roots = {way: str(tmp_path / way) for way in ("cli", "pipeline")}
    for root in roots.values():
        write_toy(root)
    by_cli, by_pipeline = build_with_cli(roots["cli"]), build_with_pipeline(roots["pipeline"])
    assert {stage: by_cli[stage] for stage in by_pipeline} == by_pipeline
    assert stored_bytes(roots["cli"], by_cli) == stored_bytes(roots["pipeline"], by_pipeline)
