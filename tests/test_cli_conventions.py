"""click's CLI conventions: ``--version``, exit 2 on usage errors (1 on a failed command), ``--root``
on every command that reads a data root, and choices for enum-like options."""

from __future__ import annotations

import re
import sys
from importlib import metadata

import pytest
import typer
from typer.testing import CliRunner

from foresight import DISTRIBUTION
from foresight.flows.cli import app, main
from foresight.flows.cli.options import literal_choices


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["foresight", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_version_prints_the_installed_distributions_version(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"foresight {metadata.version(DISTRIBUTION)}"


USAGE_ERRORS = {"unknown option": ("--no-such-option",), "unknown command": ("no-such-command",),
                "not a choice": ("targets", "list", "--kind", "model"),
                "not a policy": ("eval", "metaworld", "--policy", "greedy"),
                "missing argument": ("targets", "show", "--root", "."),
                "not a number": ("plan", "--dataset", "d", "--frames", "zero"),
                "eval seeds not numbers": ("eval", "metaworld", "--policy", "random", "--seeds", "abc"),
                "eval unknown task": ("eval", "metaworld", "--policy", "random", "--tasks", "nonsense-task"),
                "refused by the config model": ("export", "--plan", "plan-000000000000", "--targets",
                                                "video-000000000000", "--shard-size", "0")}


@pytest.mark.parametrize("args", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_a_usage_error_exits_2_with_one_line(monkeypatch, capsys, args):
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_a_failed_command_still_exits_1(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "info", "--root", str(tmp_path / "missing"))
    assert code == 1 and "does not exist" in err


def test_enum_like_options_list_their_choices():
    command = typer.main.get_command(app)
    expected = {("targets", "list", "kind"): ["video", "teacher", "text", "pi0"],
                ("eval", "metaworld", "policy"): ["oracle", "random"],
                ("ingest", "lerobot", "frame_codec"): ["raw", "raw-lz4", "source-jpeg", "video"],
                ("ingest", "teleop", "frame_codec"): ["raw", "raw-lz4", "source-jpeg", "video"],
                ("ingest", "calvin", "frame_codec"): ["raw", "raw-lz4", "source-jpeg", "video"]}
    for (group, name, option), choices in expected.items():
        param = {p.name: p for p in command.commands[group].commands[name].params}[option]
        assert literal_choices(param.type_descriptor.annotation) == choices, (group, name, option)
    result = CliRunner().invoke(app, ["targets", "list", "--help"])
    assert "<video|teacher|text|pi0>" in result.output


def _commands(group, path=()):
    for name, sub in group.commands.items():
        if hasattr(sub, "commands"):
            yield from _commands(sub, (*path, name))
        else:
            yield (*path, name), sub


NO_DATA_ROOT = {("presets",), ("conformance",), ("eval", "calvin-check")}
"""Commands that read no data root (recipe tables, a fixture folder, an import check)."""


def test_every_command_that_reads_a_data_root_takes_root_as_an_option():
    for path, command in _commands(typer.main.get_command(app)):
        flags = {flag for param in command.params for flag in getattr(param, "opts", ())}
        assert ("--root" in flags) != (path in NO_DATA_ROOT), " ".join(path)


def test_info_takes_root_as_an_option_and_still_as_a_deprecated_argument(tmp_path, monkeypatch):
    monkeypatch.delenv("FORESIGHT_ROOT", raising=False)
    option = CliRunner().invoke(app, ["info", "--root", str(tmp_path)])
    assert option.exit_code == 0 and f"root: {tmp_path}" in option.output and "deprecated" not in option.output
    positional = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert positional.exit_code == 0 and f"root: {tmp_path}" in positional.stdout
    assert "deprecated: use `foresight info --root" in positional.stderr
    both = CliRunner().invoke(app, ["info", str(tmp_path), "--root", str(tmp_path / "other")])
    # rich boxes and wraps the message to the terminal's width: compare its words
    assert both.exit_code == 2 and "give one" in " ".join(re.sub(r"[│╭╮╰╯─]", " ", both.output).split())
    monkeypatch.setenv("FORESIGHT_ROOT", str(tmp_path / "other"))  # the argument wins over the variable, as before
    from_env = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert from_env.exit_code == 0 and f"root: {tmp_path}" in from_env.stdout
