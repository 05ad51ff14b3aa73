"""``foresight targets list|show|verify|diff|gc``: audit the target versions of a data root."""

from __future__ import annotations

import json
import uuid
from typing import Any

import typer
from pydantic import Field

from foresight.flows.cli.common import EXIT_FAILED, ROOT_OPTION, fail, get_root, sub_app
from foresight.pipelines.audit import (
    DriftAccumulator,
    DriftStats,
    FieldChange,
    StatsAccumulator,
    record_diff,
    sample_clip_indices,
)
from foresight.schemas.base import StrictModel
from foresight.schemas.eval import EvalRecord
from foresight.schemas.refs import TargetKind
from foresight.storage import audit, layout, references
from foresight.storage.evals import EvalStore
from foresight.storage.targets import TargetReader, TargetStore

DEFAULT_STATS_SAMPLE = 16
"""Clips the array statistics of `show`/`report` are computed over (all clips when fewer)."""


# glue shared with flows/cli/viz.py -----------------------------------------------------------
def array_statistics(reader: TargetReader, sample: int | None = DEFAULT_STATS_SAMPLE, seed: int = 0) -> list[dict[str, Any]]:
    """Per array: name, shape, dtype and value statistics over ``sample`` clips (all when None)."""
    indices = sample_clip_indices(reader.manifest.num_clips, sample, seed)
    rows = []
    for spec in reader.manifest.arrays:
        acc = StatsAccumulator()
        for batch in audit.iter_batches(reader, spec.name, indices):
            acc.update(batch)
        stats = acc.result().model_dump() if len(indices) else {}
        rows.append({"array": spec.name, "shape": spec.shape, "dtype": spec.dtype, **stats})
    return rows


class ArrayDrift(StrictModel):
    """Drift of one array between two versions, or why it was not compared."""

    array: str
    compared: bool
    reason: str = ""
    stats: DriftStats | None = None


class VersionDiff(StrictModel):
    """Everything ``targets diff`` reports."""

    a: str
    b: str
    recipe: list[FieldChange] = Field(description="Recipe fields (what keys a version) that differ.")
    layout: list[FieldChange] = Field(description="Array specs, clip count and shard size that differ.")
    provenance: list[FieldChange] = Field(description="Recorded but unkeyed facts (git commit, host, packages).")
    plan_a: str | None
    plan_b: str | None
    arrays: list[ArrayDrift]


def version_diff(store: TargetStore, a: str, b: str, sample: int | None = None, seed: int = 0) -> VersionDiff:
    """Recipe differences of two versions, and drift of each same-shape array over the same plan."""
    ma, mb = store.manifest(a), store.manifest(b)
    layout_a = {"num_clips": ma.num_clips, "shard_size": ma.shard_size, "arrays": {s.name: s.shape for s in ma.arrays},
                "dtypes": {s.name: s.dtype for s in ma.arrays}}
    layout_b = {"num_clips": mb.num_clips, "shard_size": mb.shard_size, "arrays": {s.name: s.shape for s in mb.arrays},
                "dtypes": {s.name: s.dtype for s in mb.arrays}}
    facts = ("git_commit", "host", "packages")
    diff = VersionDiff(a=a, b=b, recipe=record_diff(ma.recipe.model_dump(mode="json"), mb.recipe.model_dump(mode="json")),
                       layout=record_diff(layout_a, layout_b),
                       provenance=record_diff({k: getattr(ma, k) for k in facts}, {k: getattr(mb, k) for k in facts}),
                       plan_a=audit.resolve_plan(store, a), plan_b=audit.resolve_plan(store, b), arrays=[])
    for spec in ma.arrays:
        diff.arrays.append(_array_drift(store, diff, spec.name, sample, seed))
    diff.arrays.extend(ArrayDrift(array=s.name, compared=False, reason=f"only in {b}")
                       for s in mb.arrays if s.name not in layout_a["arrays"])
    return diff


def _array_drift(store: TargetStore, diff: VersionDiff, name: str, sample: int | None, seed: int) -> ArrayDrift:
    ra, rb = store.open(diff.a), store.open(diff.b)
    spec_a = ra.manifest.array_spec(name)
    if name not in {s.name for s in rb.manifest.arrays}:
        return ArrayDrift(array=name, compared=False, reason=f"only in {diff.a}")
    spec_b = rb.manifest.array_spec(name)
    if spec_a.shape != spec_b.shape:
        return ArrayDrift(array=name, compared=False, reason=f"shapes differ: {spec_a.shape} vs {spec_b.shape}")
    if diff.plan_a is None or diff.plan_a != diff.plan_b:
        return ArrayDrift(array=name, compared=False, reason=f"not over the same plan ({diff.plan_a} vs {diff.plan_b})")
    if ra.manifest.status != "complete" or rb.manifest.status != "complete":
        return ArrayDrift(array=name, compared=False, reason="a version is still building")
    indices = sample_clip_indices(spec_a.shape[0], sample, seed)
    acc = DriftAccumulator()
    for batch_a, batch_b in zip(audit.iter_batches(ra, name, indices), audit.iter_batches(rb, name, indices)):
        acc.update(batch_a, batch_b)
    return ArrayDrift(array=name, compared=True, stats=acc.result())


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def lineage_lines(node: audit.LineageNode, depth: int = 0) -> list[str]:
    """The lineage tree as indented text lines."""
    role = f"{node.role}: " if node.role else ""
    details = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, sort_keys=True)}"
                        for k, v in node.details.items())
    lines = [f"{'  ' * depth}{role}{node.type} {node.id}  [{details}]"]
    for child in node.children:
        lines.extend(lineage_lines(child, depth + 1))
    return lines


# commands -------------------------------------------------------------------------------------
def _store(root: str | None) -> TargetStore:
    return TargetStore(get_root(root))


def cmd_list(kind: TargetKind | None = typer.Option(None, "--kind", help="Only versions of this kind."),
             as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
             root: str | None = ROOT_OPTION) -> None:
    """List target versions: id, kind, model (real/random/tiny weights), inputs, status, clips, bytes, created."""
    store = _store(root)
    summaries, broken = [], []
    for version_id in store.ids(kind):
        try:
            summaries.append(audit.summarize(store, version_id))
        except ValueError as err:  # one unreadable manifest must not hide the others
            broken.append({"id": version_id, "error": str(err)})
            typer.echo(f"warning: {version_id}: {err}", err=True)
    if as_json:
        typer.echo(json.dumps([s.model_dump() for s in summaries] + broken, indent=2))
        return
    if not summaries:
        typer.echo(f"no target versions under {store.root.url}" + (f" of kind '{kind}'" if kind else ""))
        return
    typer.echo(f"{'ID':<20} {'STATUS':<9} {'CLIPS':>6} {'SIZE':>10} {'WEIGHTS':<7} {'MODEL':<28} {'CREATED':<26} INPUTS")
    for s in summaries:
        inputs = ",".join(f"{k}={v}" for k, v in sorted(s.inputs.items()))
        typer.echo(f"{s.id:<20} {s.status:<9} {s.clips:>6} {human_bytes(s.bytes):>10} {s.weights:<7} "
                   f"{s.model[:28]:<28} {s.created:<26} {inputs}")


def cmd_show(version: str = typer.Argument(..., help="Target version id."),
             as_json: bool = typer.Option(False, "--json", help="Manifest, lineage, users and events as JSON."),
             root: str | None = ROOT_OPTION) -> None:
    """The whole manifest, the lineage tree down to the source datasets, and the exports/runs using it."""
    store = _store(root)
    manifest = store.manifest(version)
    tree = audit.lineage_tree(store.root, version)
    users = references.users_of(store, version)
    events = audit.version_events(store.root, version)
    evals = [eval_row(record) for record in EvalStore(store.root).using_version(version)]
    if as_json:
        typer.echo(json.dumps({"manifest": manifest.model_dump(mode="json"), "lineage": tree.model_dump(),
                               "used_by": [u.model_dump() for u in users], "evals": evals, "events": events},
                              indent=2, default=str))
        return
    typer.echo(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True))
    typer.echo("\nlineage:")
    typer.echo("\n".join("  " + line for line in lineage_lines(tree)))
    typer.echo("\nused by:")
    for use in users:
        typer.echo(f"  {use.kind} {use.id}" + ("" if use.direct else "  (through a downstream version)"))
    if not users:
        typer.echo("  no export or run")
    typer.echo("\nevals of policies built from it:")
    for row in evals:
        typer.echo(f"  {row['eval_id']}  {row['policy']}  {row['status']}  {row['success']}  tasks {row['tasks']}")
    if not evals:
        typer.echo("  none")
    typer.echo(f"\nlineage events: {len(events)}")
    for event in events:
        typer.echo(f"  {event.get('eventTime')}  {event.get('job', {}).get('name')}  run {event.get('run', {}).get('runId')}")


def eval_row(record: EvalRecord) -> dict[str, Any]:
    """One line's facts about an eval for `targets show`."""
    overall = record.overall
    success = f"{overall.successes}/{overall.episodes} ({overall.rate:.0%})" if overall else "running"
    return {"eval_id": record.eval_id, "policy": record.key.policy.label(), "status": record.status,
            "success": success, "tasks": ",".join(record.key.tasks)}


def cmd_verify(version: str | None = typer.Argument(None, help="Target version id (or --all)."),
               all_versions: bool = typer.Option(False, "--all", help="Verify every complete version."),
               root: str | None = ROOT_OPTION) -> None:
    """Re-hash every stored shard against the manifest's checksums; name each corrupt or missing one."""
    if (version is None) == (not all_versions):
        fail("give a VERSION or --all (not both)")
    store = _store(root)
    if version is not None and not store.root.exists(layout.target_dir(version), layout.MANIFEST):
        fail(f"target version '{version}': not found under {store.root.url}")
    ids = store.ids() if all_versions else [version]
    failed = 0
    for version_id in ids:
        problems = _verify_problems(store, version_id, skip_building=all_versions)
        if problems is None:
            typer.echo(f"skip    {version_id} (still building)")
            continue
        failed += bool(problems)
        typer.echo(f"{'FAILED' if problems else 'ok':<7} {version_id}")
        for problem in problems:
            typer.echo(f"  {problem}")
    if failed:
        typer.echo(f"{failed} of {len(ids)} versions failed verification", err=True)
        raise typer.Exit(EXIT_FAILED)


def _verify_problems(store: TargetStore, version_id: str, skip_building: bool) -> list[str] | None:
    """Problems of one version; None when it is building and ``skip_building``; an unreadable manifest is one."""
    try:
        if skip_building and store.status(version_id) != "complete":
            return None
        return audit.verify_version(store, version_id)
    except ValueError as err:
        return [f"{version_id}: {err}"]


def cmd_diff(a: str = typer.Argument(..., help="First (reference) version."),
             b: str = typer.Argument(..., help="Second version."),
             sample: int | None = typer.Option(None, "--sample", min=1, help="Compare N random clips, not all."),
             seed: int = typer.Option(0, "--seed", help="Seed of the clip sample."),
             as_json: bool = typer.Option(False, "--json", help="JSON output."),
             root: str | None = ROOT_OPTION) -> None:
    """Recipe fields that differ, and drift statistics of same-shape arrays over the same plan."""
    diff = version_diff(_store(root), a, b, sample, seed)
    if as_json:
        typer.echo(diff.model_dump_json(indent=2))
        return
    typer.echo(f"A = {a}\nB = {b}\nplans: {diff.plan_a} / {diff.plan_b}")
    for title, changes in (("recipe", diff.recipe), ("layout", diff.layout), ("provenance (not keyed)", diff.provenance)):
        typer.echo(f"\n{title} fields that differ: {len(changes)}")
        for change in changes:
            typer.echo(f"  {change.path}: {json.dumps(change.a, default=str)} -> {json.dumps(change.b, default=str)}")
    typer.echo("\narrays:")
    for drift in diff.arrays:
        typer.echo(f"  {drift.array}: " + (_drift_text(drift.stats) if drift.stats else f"not compared ({drift.reason})"))


def _drift_text(stats: DriftStats) -> str:
    cos = stats.cosine
    return (f"{stats.clips} clips  mean|d|={stats.mean_abs_diff:.4g}  max|d|={stats.max_abs_diff:.4g}  "
            f"relL2={stats.rel_l2:.4g}  cosine min={cos['q0']:.4f} p5={cos['q0.05']:.4f} "
            f"median={cos['q0.5']:.4f} p95={cos['q0.95']:.4f} max={cos['q1']:.4f} mean={cos['mean']:.4f}"
            + (f"  nonfinite A={stats.nonfinite_a} B={stats.nonfinite_b}" if stats.nonfinite_a or stats.nonfinite_b else ""))


def cmd_gc(dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
           max_age_hours: float = typer.Option(24.0, "--max-age-hours", min=0.0,
                                               help="A building version untouched this long is abandoned."),
           root: str | None = ROOT_OPTION) -> None:
    """Remove abandoned building versions and complete versions no export or run references."""
    resolved = get_root(root, writable=not dry_run)
    plan = references.plan_gc(resolved, max_age_s=max_age_hours * 3600)
    for item in plan.keep:
        typer.echo(f"keep    {item.version_id:<20} {human_bytes(item.bytes):>10}  {item.reason}")
    for item in plan.remove:
        typer.echo(f"remove  {item.version_id:<20} {human_bytes(item.bytes):>10}  {item.reason}")
    if not plan.remove:
        typer.echo("nothing to remove")
        return
    summary = f"{len(plan.remove)} versions, {human_bytes(plan.bytes_freed)}"
    if dry_run:
        typer.echo(f"dry run: would remove {summary}")
        return
    if not yes and not typer.confirm(f"remove {summary}?", default=False):
        typer.echo("nothing removed")
        return
    removed = references.apply_gc(resolved, plan, run_id=str(uuid.uuid4()))
    typer.echo(f"removed {len(removed)} versions, freed {human_bytes(plan.bytes_freed)}")


def register(app: typer.Typer) -> None:
    """Add the ``targets`` commands."""
    targets = sub_app(app, "targets", "Target versions: list, show, verify, diff, gc.")
    targets.command("list")(cmd_list)
    targets.command("show")(cmd_show)
    targets.command("verify")(cmd_verify)
    targets.command("diff")(cmd_diff)
    targets.command("gc")(cmd_gc)
