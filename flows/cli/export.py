"""``foresight export``: target versions -> webdataset shards; ``foresight export-check``: verify and read back."""

from __future__ import annotations

import typer

from flows.cli.common import ROOT_OPTION, get_root
from flows.cli.runner import runner_options
from flows.runtime import RunnerChoice


def register(app: typer.Typer) -> None:
    app.command("export")(runner_options(export))
    app.command("export-check")(export_check)


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def export(
    plan: str = typer.Option(..., help="Plan id whose clips become samples."),
    targets: str = typer.Option(..., help="Comma list of target version ids (each optionally alias=id)."),
    fields: str | None = typer.Option(None, help="Comma list of fields to export (default: every field)."),
    shard_size: str = typer.Option("1GB", help="Target shard size, e.g. 1GB, 256MiB."),
    codec: str = typer.Option("f16", help="Codec of float target fields: f16, bf16 or fp8 (e4m3 + per-channel scales)."),
    split: str | None = typer.Option(None, help="Only clips of episodes of this split (train, val, ...)."),
    action_chunk: int = typer.Option(10, help="Action rows per sample, from the clip's first frame."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Export pinned target versions of PLAN as webdataset tar shards with a checksummed index.json."""
    from flows.export import ExportConfig, run_export

    config = ExportConfig(plan=plan, targets=_split_list(targets) or [], fields=_split_list(fields),
                          shard_size=shard_size, codec=codec, split=split, action_chunk=action_chunk,
                          workers=runner.tasks)
    data_root = get_root(root, writable=True)
    result = run_export(data_root.url, config, runner)
    state = "already exported" if result.skipped else "exported"
    typer.echo(f"{result.export_id} {state}: {result.num_samples} samples in {result.num_shards} shards, "
               f"{result.total_bytes / 1e6:.1f} MB")
    typer.echo(result.url)


def export_check(
    export_id: str = typer.Argument(..., help="Export id (export-<12 hex>)."),
    batch: int = typer.Option(4, help="Samples in the batch read back."),
    verify: bool = typer.Option(True, help="Re-hash every shard against index.json first."),
    root: str = ROOT_OPTION,
) -> None:
    """Verify an export's shards and read one batch back through ShardStream (pinned to its versions)."""
    from torch.utils.data import DataLoader

    from storage.exports import ExportStore
    from trainers.data import ShardStream, collate_samples

    data_root = get_root(root)
    store = ExportStore(data_root)
    index = store.index(export_id)
    if verify:
        problems = store.verify(export_id)
        if problems:
            raise ValueError("; ".join(problems))
        typer.echo(f"{export_id}: {len(index.shards)} shards verified ({index.total_bytes / 1e6:.1f} MB)")
    stream = ShardStream(data_root, export_id, index.version_ids, verify=verify)
    loader = DataLoader(stream, batch_size=min(batch, index.num_samples), collate_fn=collate_samples)
    first = next(iter(loader))
    typer.echo(f"batch of {len(first['meta'])} samples (clips {[m['clip_index'] for m in first['meta']]}):")
    for name, value in first.items():
        if name not in ("meta", "__key__"):
            typer.echo(f"  {name:<24} {str(value.dtype).removeprefix('torch.'):<8} {tuple(value.shape)}")
    typer.echo(f"  versions: {index.versions}")
