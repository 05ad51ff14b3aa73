"""``foresight pi0-targets``: cache π0 teacher targets (velocities + action->VL attention) over a plan."""

from __future__ import annotations

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root
from foresight.flows.cli.options import comma_list, config_command, config_option, given, int_list
from foresight.flows.cli.runner import runner_options
from foresight.flows.configs import Pi0TargetsConfig
from foresight.flows.runtime import RunnerChoice


def register(app: typer.Typer) -> None:
    app.command("pi0-targets")(pi0_targets)


@runner_options
@config_command
def pi0_targets(
    plan: str = config_option(Pi0TargetsConfig, "plan", "--plan"),
    model: str = config_option(Pi0TargetsConfig, "model", "--model"),
    family: str = config_option(Pi0TargetsConfig, "family", "--family"),
    pairs: int = config_option(Pi0TargetsConfig, "pairs", "--pairs"),
    attn_layers: str = config_option(Pi0TargetsConfig, "attn_layers", "--attn-layers",
                                     extra_help="E.g. '3,7,10,14'; '' = none."),
    attn_dtype: str = config_option(Pi0TargetsConfig, "attn_dtype", "--attn-dtype"),
    cameras: str = config_option(Pi0TargetsConfig, "cameras", "--cameras", extra_help="Comma-separated."),
    state_key: str = config_option(Pi0TargetsConfig, "state_key", "--state-key"),
    action_key: str = config_option(Pi0TargetsConfig, "action_key", "--action-key"),
    state_indices: str = config_option(Pi0TargetsConfig, "state_indices", "--state-indices",
                                       extra_help="E.g. '0-17,36-38'."),
    normalize: str = config_option(Pi0TargetsConfig, "normalize", "--normalize"),
    max_text_tokens: int = config_option(Pi0TargetsConfig, "max_text_tokens", "--max-text-tokens"),
    tiny_layers: int = config_option(Pi0TargetsConfig, "tiny_layers", "--tiny-layers"),
    shard_size: int = config_option(Pi0TargetsConfig, "shard_size", "--shard-size"),
    batch: int = config_option(Pi0TargetsConfig, "batch", "--batch"),
    device: str = config_option(Pi0TargetsConfig, "device", "--device"),
    dtype: str = config_option(Pi0TargetsConfig, "dtype", "--dtype"),
    limit: int = config_option(Pi0TargetsConfig, "limit", "--limit"),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `pi0` target version: inputs, velocity (N, K, 50, 32) and attention (N, K, L, 50, P)."""
    from foresight.flows.pi0 import run_pi0_targets
    from foresight.schemas.model import ModelSpec

    config = Pi0TargetsConfig(workers=runner.tasks, **given(
        plan=plan, model=model, family=family, pairs=pairs, attn_layers=int_list(attn_layers, "--attn-layers"),
        attn_dtype=attn_dtype, cameras=comma_list(cameras), state_key=state_key, action_key=action_key,
        state_indices=int_list(state_indices, "--state-indices"), normalize=normalize,
        max_text_tokens=max_text_tokens, tiny_layers=tiny_layers, shard_size=shard_size, batch=batch, device=device,
        dtype=dtype, limit=limit))
    ModelSpec.parse(config.model)  # a malformed spec fails here, before Prefect starts
    data_root = get_root(root, writable=True)
    result = run_pi0_targets(data_root, config, runner)
    if result.skipped:
        typer.echo(f"{result.version} already complete (nothing to do)")
        return
    rate = result.clips / result.seconds if result.seconds > 0 else 0.0
    typer.echo(f"{result.version} {result.status}: {result.clips} samples in {result.seconds:.1f}s ({rate:.2f} samples/s)")
