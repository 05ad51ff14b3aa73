"""``foresight export``: target versions -> webdataset shards; ``foresight export-check``: verify and read back."""

from __future__ import annotations

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root
from foresight.flows.cli.options import comma_list, config_command, config_option, given
from foresight.flows.cli.runner import runner_options
from foresight.flows.configs import ExportConfig
from foresight.flows.runtime import RunnerChoice


def register(app: typer.Typer) -> None:
    app.command("export")(runner_options(config_command(export)))
    app.command("export-check")(export_check)


def export(
    plan: str = config_option(ExportConfig, "plan"),
    targets: str = config_option(ExportConfig, "targets", extra_help="Comma-separated."),
    fields: str = config_option(ExportConfig, "fields", extra_help="Comma-separated."),
    shard_size: str = config_option(ExportConfig, "shard_size"),
    codec: str = config_option(ExportConfig, "codec"),
    split: str = config_option(ExportConfig, "split"),
    action_chunk: int = config_option(ExportConfig, "action_chunk"),
    allow_null: bool = config_option(ExportConfig, "allow_null", "--allow-null/--refuse-null"),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Export pinned target versions of PLAN as webdataset tar shards with a checksummed index.json."""
    from foresight.flows.export import run_export

    config = ExportConfig(plan=plan, targets=comma_list(targets) or [], workers=runner.tasks, **given(
        fields=comma_list(fields), shard_size=shard_size, codec=codec, split=split, action_chunk=action_chunk,
        allow_null=allow_null))
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

    from foresight.storage.exports import ExportStore
    from foresight.trainers.data import ShardStream, collate_samples

    data_root = get_root(root)
    store = ExportStore(data_root)
    index = store.index(export_id)
    if verify:
        problems = store.verify(export_id)
        if problems:
            raise ValueError("; ".join(problems))
        typer.echo(f"{export_id}: {len(index.shards)} shards verified ({index.total_bytes / 1e6:.1f} MB)")
    if not index.verified_inputs:
        typer.echo(f"warning: {export_id} was built with --no-verify: its input versions were not checked as it "
                   f"was made (`foresight targets verify <id>` audits each of {', '.join(index.version_ids)})", err=True)
    stream = ShardStream(data_root, export_id, index.version_ids, verify=verify)
    loader = DataLoader(stream, batch_size=min(batch, index.num_samples), collate_fn=collate_samples)
    first = next(iter(loader))
    typer.echo(f"batch of {len(first['meta'])} samples (clips {[m['clip_index'] for m in first['meta']]}):")
    for name, value in first.items():
        if name not in ("meta", "__key__"):
            typer.echo(f"  {name:<24} {str(value.dtype).removeprefix('torch.'):<8} {tuple(value.shape)}")
    typer.echo(f"  versions: {index.versions}")
