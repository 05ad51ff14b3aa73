"""``foresight ingest calvin|teleop|lerobot``: recorded datasets into the episode store.

Episodes run in parallel as Prefect tasks: ``--workers N`` threads (decoding and compression
release the GIL), ``--dask-local N`` worker processes, or ``--dask-address`` an existing cluster.

Exit codes: 0 every item landed (or was already stored); 3 (EXIT_PARTIAL) the run finished but
some items were quarantined (listed on stderr, one line each, and in the dataset's
quarantine.jsonl); 2 (EXIT_USAGE) the source is not an ingestible dataset (a missing folder, an
unreadable or unsupported LeRobot info.json): refused before anything is written; 1 the command
failed (bad arguments, unreadable source, or with --strict the first bad item).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from foresight.flows.cli.common import EXIT_PARTIAL, EXIT_USAGE, ROOT_OPTION, fail, get_root, sub_app, usage_value
from foresight.flows.cli.runner import runner_options
from foresight.flows.runtime import RunnerChoice
from foresight.schemas.dataset import FrameCodecName

STRICT_OPTION = typer.Option(False, "--strict", help="Fail on the first bad item instead of quarantining it.")
FRAME_CODEC_OPTION = typer.Option(None, "--frame-codec", help="How frames are stored. Default: keep the source's "
                                  "JPEG or video bytes, raw under zstd for decoded frames.")
CRF_OPTION = typer.Option(None, "--crf", help="With --frame-codec video on decoded frames: x264 CRF (lossy); "
                          "default lossless.")
ZSTD_OPTION = typer.Option(3, "--zstd-level", help="zstd level of raw frames.")


def register(app: typer.Typer) -> None:
    ingest = sub_app(app, "ingest", "Ingest demonstrations into the episode store.")
    ingest.command("calvin")(runner_options(ingest_calvin))
    ingest.command("teleop")(runner_options(ingest_teleop))
    ingest.command("lerobot")(runner_options(ingest_lerobot))


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def frame_codec_options(frame_codec: str | None, crf: int | None, zstd_level: int) -> dict:
    """The FrameCodecOptions fields of the --frame-codec, --crf and --zstd-level flags."""
    return {"frame_codec": frame_codec, "crf": crf, "zstd_level": zstd_level}


def _run(flow, runner: RunnerChoice, root: str | None, **params) -> None:
    """Run an ingest flow, print its summary, and exit 3 when items were quarantined."""
    from foresight.flows.runtime import run_flow

    data_root = get_root(root, writable=True)
    summary = run_flow(flow, runner, data_root, root_url=data_root.url, **params)
    typer.echo(f"dataset {summary.dataset}: {len(summary.written)} written ({summary.frames_written} frames), "
               f"{len(summary.skipped)} unchanged, {len(summary.quarantined)} quarantined "
               f"in {summary.seconds:.1f} s")
    for line in summary.quarantined:
        typer.echo(f"quarantined: {line}", err=True)
    if summary.partial:
        sys.exit(EXIT_PARTIAL)  # SystemExit passes the CLI boundary with its code intact


def ingest_calvin(
    src: Path = typer.Argument(..., help="CALVIN folder holding the split folders (e.g. task_D_D)."),
    dataset: str = typer.Option(..., help="Dataset name in the store."),
    splits: str = typer.Option("training,validation", help="Comma list of split folders."),
    cameras: str = typer.Option("rgb_static,rgb_gripper", help="Comma list of rgb_* keys to store."),
    depth: bool = typer.Option(False, "--depth", help="Also store depth_* of each camera (24-bit packed, 10 um)."),
    lang_folder: str = typer.Option("lang_annotations", help="Annotation folder inside each split."),
    frame_codec: FrameCodecName | None = FRAME_CODEC_OPTION,
    crf: int = CRF_OPTION,
    zstd_level: int = ZSTD_OPTION,
    strict: bool = STRICT_OPTION,
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Ingest CALVIN splits: one stored episode per row of ep_start_end_ids.npy, language segments."""
    from foresight.flows.ingest_sources import ingest_calvin_flow
    from foresight.pipelines.ingest.calvin import CalvinOptions, check_splits

    options = CalvinOptions(splits=_csv(splits), cameras=_csv(cameras), depth=depth, lang_folder=lang_folder,
                            **frame_codec_options(frame_codec, crf, zstd_level))
    usage_value(check_splits, src, options)  # before the root is touched
    _run(ingest_calvin_flow, runner, root, dataset=dataset, src=str(src), options=options,
         strict=strict)


def ingest_teleop(
    src: Path = typer.Argument(..., help="Folder of episode_<idx>.hdf5 files (ALOHA, Mobile ALOHA, AgileX)."),
    dataset: str = typer.Option(..., help="Dataset name in the store."),
    fps: float = typer.Option(50.0, help="Recording rate (ALOHA 50, AgileX 30)."),
    instruction: str = typer.Option(None, help="Instruction shared by every episode."),
    task: str = typer.Option(None, help="Task name (default: the folder name)."),
    frame_codec: FrameCodecName | None = FRAME_CODEC_OPTION,
    crf: int = CRF_OPTION,
    zstd_level: int = ZSTD_OPTION,
    strict: bool = STRICT_OPTION,
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Ingest teleoperation HDF5 episodes, raw or JPEG-compressed, every camera found (JPEG kept as recorded)."""
    from foresight.flows.ingest_sources import ingest_teleop_flow
    from foresight.pipelines.ingest.teleop import TeleopOptions, list_episode_files

    options = TeleopOptions(fps=fps, instruction=instruction, task=task, **frame_codec_options(frame_codec, crf, zstd_level))
    usage_value(list_episode_files, src)  # before the root is touched
    _run(ingest_teleop_flow, runner, root, dataset=dataset, src=str(src), options=options,
         strict=strict)


def ingest_lerobot(
    src: Path = typer.Argument(..., help="Local LeRobot dataset folder (codebase v3.0 or v2.x)."),
    dataset: str = typer.Option(..., help="Dataset name in the store."),
    cameras: str = typer.Option(None, help="Comma list of video/image feature keys (default all)."),
    frame_codec: FrameCodecName | None = FRAME_CODEC_OPTION,
    crf: int = CRF_OPTION,
    zstd_level: int = ZSTD_OPTION,
    strict: bool = STRICT_OPTION,
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Ingest a LeRobot dataset: video kept as its packets (keyframe-aligned segments), tasks as instructions."""
    from foresight.flows.ingest_sources import ingest_lerobot_flow
    from foresight.pipelines.ingest.lerobot import LeRobotOptions, LeRobotUsageError, load_meta

    options = LeRobotOptions(cameras=_csv(cameras) if cameras else None, **frame_codec_options(frame_codec, crf, zstd_level))
    try:
        load_meta(src)  # usage errors exit 2 here, before the root is touched
    except LeRobotUsageError as err:
        fail(str(err), EXIT_USAGE)
    _run(ingest_lerobot_flow, runner, root, dataset=dataset, src=str(src), options=options,
         strict=strict)
