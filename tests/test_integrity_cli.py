"""Adversarial corpus, the command line (issue 23 rows D1-D4 and LeRobot path confinement).

Commands run in-process through the console entry point (``flows.cli.main``): the exit code and
stderr are what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import fixtures_sources as fx
import integrity_world as iw
from foresight.pipelines.ingest import lerobot


def foresight(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``foresight ARGS`` in this process; returns (exit code, stdout, stderr)."""
    from foresight.flows import cli

    monkeypatch.setattr(sys, "argv", ["foresight", *args])
    for name in ("FORESIGHT_DEBUG", "FORESIGHT_NO_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    for name in ("FORESIGHT_DEBUG", "FORESIGHT_NO_VERIFY"):  # the callback sets them for the process
        os.environ.pop(name, None)
    return exited.value.code, out, err


# D1: a failure inside a flow is one line; the traceback is in the run's log ----------------------
@pytest.fixture(scope="module")
def corrupt_world(tmp_path_factory):
    world = iw.build(tmp_path_factory.mktemp("integrity") / "root")
    iw.flip_byte(iw.shard_file(world, world["dinov2"], "target", 0), 99)
    return world


def test_d1_flow_failure_is_one_line_naming_the_log(corrupt_world, monkeypatch, capsys):
    args = ["export", "--root", corrupt_world["root"], "--plan", corrupt_world["plan"], "--targets",
            f"{corrupt_world['video']},{corrupt_world['dinov2']}", "--codec", "bf16", "--shard-size", "40KB"]
    code, _, err = foresight(monkeypatch, capsys, *args)
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: target version '{corrupt_world['dinov2']}', array 'target', shard 0: "
                           "checksum mismatch")
    log = Path(line.rsplit("(details: ", 1)[1].rstrip(")"))
    assert log.parent == Path(corrupt_world["root"]) / "logs" and "Traceback" in log.read_text()


def test_d1_a_bug_is_one_line_too_and_debug_shows_its_traceback(monkeypatch, capsys):
    from foresight.flows import cli

    @cli.app.command("integrity-bug", hidden=True)
    def bug() -> None:
        print(1 / 0)  # a bug, not a user error

    try:
        code, _, err = foresight(monkeypatch, capsys, "integrity-bug")
        [line] = err.strip().splitlines()
        assert code == 1 and line.startswith("error: ZeroDivisionError: division by zero (details: ")
        assert "Traceback" in Path(line.rsplit("(details: ", 1)[1].rstrip(")")).read_text()
        code, _, err = foresight(monkeypatch, capsys, "--debug", "integrity-bug")
        assert code == 1 and "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1] == "error: ZeroDivisionError: division by zero"
    finally:
        cli.app.registered_commands.pop()


# D2-D4: LeRobot usage errors exit 2 before anything is written --------------------------------------
@pytest.fixture(scope="module")
def lerobot_v3(tmp_path_factory):
    return fx.make_lerobot_v3(tmp_path_factory.mktemp("lerobot") / "v3")


@pytest.fixture()
def src(lerobot_v3, tmp_path):
    return Path(shutil.copytree(lerobot_v3, tmp_path / "src"))


def _set_info(src: Path, change) -> None:
    path = src / "meta/info.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps(change(info)))


BROKEN_INFO = {
    "missing folder": (lambda src: shutil.rmtree(src), "no such folder"),
    "missing info.json": (lambda src: (src / "meta/info.json").unlink(), "meta/info.json: file missing"),
    "truncated info.json": (lambda src: (src / "meta/info.json").write_text('{\n  "fps": 10,\n  "features": {'),
                            "meta/info.json: malformed JSON at line 3 column"),
    "not UTF-8": (lambda src: (src / "meta/info.json").write_bytes(b'{"fps": "\xff"}'), "not UTF-8 text"),
    "a list": (lambda src: (src / "meta/info.json").write_text("[1, 2]"), "expected a JSON object, found list"),
    "v1.6": (lambda src: _set_info(src, lambda i: {**i, "codebase_version": "v1.6"}),
             "field 'codebase_version': unsupported version 'v1.6'"),
    "feature not a dict": (lambda src: _set_info(src, lambda i: {**i, "features": {**i["features"], "action": 3}}),
                           "field 'features.action': expected an object, found int"),
    "fps a string": (lambda src: _set_info(src, lambda i: {**i, "fps": "fast"}), "field 'fps': expected a positive"),
    "data_path escapes": (lambda src: _set_info(src, lambda i: {**i, "data_path": "../../etc/{episode_index}"}),
                          "field 'data_path': template '../../etc/{episode_index}' leaves the dataset folder"),
    "absolute video_path": (lambda src: _set_info(src, lambda i: {**i, "video_path": "/etc/{video_key}.mp4"}),
                            "field 'video_path': template '/etc/{video_key}.mp4' leaves the dataset folder"),
    "unknown placeholder": (lambda src: _set_info(src, lambda i: {**i, "data_path": "{secret.__class__}"}),
                            "uses unknown placeholders"),
    "attribute of a placeholder": (lambda src: _set_info(src, lambda i: {
        **i, "data_path": "{file_index.__class__.__name__}.parquet"}), "uses unknown placeholders"),
    "fps NaN": (lambda src: _set_info(src, lambda i: {**i, "fps": float("nan")}), "field 'fps': expected a positive finite"),
    "fps Infinity": (lambda src: _set_info(src, lambda i: {**i, "fps": float("inf")}), "field 'fps': expected a positive finite"),
    "no video_path": (lambda src: _set_info(src, lambda i: {k: v for k, v in i.items() if k != "video_path"}),
                      "field 'video_path': key missing (the dataset has video features)"),
    "camera shape empty": (lambda src: _set_info(src, lambda i: _camera_shape(i, [])),
                           "field 'features.observation.images.top.shape': a camera needs (height, width, 3)"),
    "negative size": (lambda src: _set_info(src, lambda i: {**i, "features": {**i["features"], "action": {
        **i["features"]["action"], "shape": [-6]}}}), "field 'features.action.shape': expected positive sizes"),
}


def _camera_shape(info: dict, shape: list) -> dict:
    info["features"]["observation.images.top"]["shape"] = shape
    return info


@pytest.mark.parametrize("case", sorted(BROKEN_INFO))
def test_d2_d4_lerobot_usage_errors_exit_2_and_write_nothing(src, tmp_path, monkeypatch, capsys, case):
    damage, expected = BROKEN_INFO[case]
    damage(src)
    root = tmp_path / "root"
    code, out, err = foresight(monkeypatch, capsys, "ingest", "lerobot", str(src), "--dataset", "lr",
                               "--root", str(root))
    [line] = err.strip().splitlines()
    assert code == 2 and expected in line and line.startswith("error: "), line
    assert not root.exists() and out == ""


@pytest.mark.parametrize("source, expected", [("teleop", "teleop source folder not found"),
                                              ("calvin", "CALVIN folder not found")])
def test_d2_teleop_and_calvin_missing_folders_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, source,
                                                                       expected):
    root = tmp_path / "root"
    code, out, err = foresight(monkeypatch, capsys, "ingest", source, str(tmp_path / "nowhere"), "--dataset", "d",
                               "--root", str(root))
    [line] = err.strip().splitlines()
    assert code == 2 and line.startswith("error: ") and expected in line, line
    assert not root.exists() and out == ""


def test_d4_broken_episodes_jsonl_names_file_and_line(tmp_path):
    src = fx.make_lerobot_v21(tmp_path / "v21")
    path = src / "meta/episodes.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"episode_index": 1, "tasks": [', *lines[2:]]) + "\n")
    with pytest.raises(lerobot.LeRobotUsageError, match=r"meta/episodes.jsonl: line 2: malformed JSON"):
        lerobot.load_meta(src)


# confinement of every path resolved from info.json ---------------------------------------------------
def test_a_symlinked_data_file_leaving_the_dataset_is_refused(src, tmp_path):
    meta = lerobot.load_meta(src)
    target = meta.data_file(0)
    outside = tmp_path / "outside.parquet"
    shutil.move(target, outside)
    target.symlink_to(outside)
    with pytest.raises(ValueError, match="is a link to .*outside the dataset folder"):
        meta.data_file(0)


def test_a_video_key_with_dotdot_is_refused(tmp_path):
    meta = lerobot.load_meta(fx.make_lerobot_v21(tmp_path / "v21"))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        meta.video_file(0, "../../../../etc/passwd")


def test_d11_a_full_disk_without_a_file_name_still_names_where(tmp_path):
    import errno

    from foresight.flows.cli.common import user_error_message

    assert user_error_message(OSError(errno.ENOSPC, "No space left on device")) == \
        "disk full writing a file (the writer did not name it)"
    named = OSError(errno.ENOSPC, "No space left on device")
    named.filename = str(tmp_path)  # what flow_log sets: the data root the flow wrote under
    assert user_error_message(named).startswith(f"disk full writing under {tmp_path} (")


def test_d11_flow_log_names_the_root_for_a_full_disk_deep_in_the_chain(tmp_path):
    import errno

    from foresight.flows.runtime import flow_log
    from foresight.storage.fs import Root

    root = Root(tmp_path)
    with pytest.raises(RuntimeError) as raised:
        with flow_log(root, "probe-run"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as err:
                raise RuntimeError("task failed") from err
    assert raised.value.__cause__.filename == root.url
    assert raised.value.log_path == root.url_of("logs", "probe-run.log")
    assert "Traceback" in (tmp_path / "logs" / "probe-run.log").read_text()
