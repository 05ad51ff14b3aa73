"""``foresight ingest metaworld``: collect demonstrations with MetaWorld's scripted experts."""

from __future__ import annotations

import logging

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root, sub_app
from foresight.flows.cli.ingest_sources import CRF_OPTION, FRAME_CODEC_OPTION, ZSTD_OPTION, frame_codec_options
from foresight.flows.cli.runner import runner_options
from foresight.flows.runtime import RunnerChoice


log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    ingest = sub_app(app, "ingest", "Ingest demonstrations into the episode store.")
    ingest.command("metaworld")(runner_options(ingest_metaworld))


def ingest_metaworld(
    dataset: str = typer.Option(..., help="Dataset name in the store."),
    tasks: str = typer.Option(..., help="Comma list of task names, or easy|medium|hard|very-hard|all."),
    episodes_per_task: int = typer.Option(2, help="Successful episodes per task."),
    camera: str = typer.Option("corner2", help="MetaWorld camera."),
    size: int = typer.Option(256, help="Frame height and width in pixels."),
    seed: int = typer.Option(0, help="First seed."),
    frame_codec: str = FRAME_CODEC_OPTION,
    crf: int = CRF_OPTION,
    zstd_level: int = ZSTD_OPTION,
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Collect successful expert demonstrations, rendered upright, into DATASET.

    Local runs collect one rollout at a time (one rendering env per process); ``--dask-local N``
    spreads the (task, seed batch) tasks over N worker processes."""
    from foresight.flows.ingest import MetaWorldIngestConfig, ingest_metaworld_flow
    from foresight.flows.runtime import run_flow
    from foresight.pipelines.ingest.metaworld import resolve_tasks

    config = MetaWorldIngestConfig(dataset=dataset, tasks=resolve_tasks(tasks), episodes_per_task=episodes_per_task,
                                   camera=camera, size=size, seed=seed,
                                   **frame_codec_options(frame_codec, crf, zstd_level))
    data_root = get_root(root, writable=True)
    if not runner.uses_dask and runner.workers > 1:
        log.warning("--workers %d ignored: MetaWorld renders one env per process; use --dask-local N",
                    runner.workers)
        runner = RunnerChoice()
    results = run_flow(ingest_metaworld_flow, runner, data_root, root_url=data_root.url, config=config)
    typer.echo(f"{'task':<28} {'attempted':>9} {'succeeded':>9} {'rate':>6}")
    for name, result in results.items():
        rate = result.succeeded / result.attempted if result.attempted else 0.0
        typer.echo(f"{name:<28} {result.attempted:>9} {result.succeeded:>9} {rate:>6.0%}")
