"""``foresight pi0-targets``: cache π0 teacher targets (velocities + action->VL attention) over a plan."""

from __future__ import annotations

import typer

from flows.cli.common import ROOT_OPTION, get_root
from flows.cli.runner import runner_options
from flows.runtime import RunnerChoice


def register(app: typer.Typer) -> None:
    app.command("pi0-targets")(pi0_targets)


def int_list(text: str | None, option: str) -> list[int] | None:
    """'3,7,10' or '0-17,36-38' -> [ints]; ValueError naming the option otherwise."""
    if text is None:
        return None
    values: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            low, _, high = part.partition("-")
            values.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected integers like '3,7,10' or ranges like '0-17'") from None
    return values


@runner_options
def pi0_targets(
    plan: str = typer.Option(..., "--plan", help="Clip plan id (a clip's first frame is the observation)."),
    model: str = typer.Option("tiny", "--model", help="π0 teacher: hf:<repo>[@rev] | dir:<path> | random | tiny."),
    family: str = typer.Option("pi0", "--family", help="pi0 | pi05: architecture of a random/tiny teacher."),
    pairs: int = typer.Option(4, "--pairs", min=0, help="K fixed (t, noise-seed) pairs per sample (0: inputs only)."),
    attn_layers: str = typer.Option(None, "--attn-layers", help="Teacher layers whose attention is stored, e.g. "
                                    "'3,7,10,14' (default: middle layers of a 6-layer student's map; '' = none)."),
    attn_dtype: str = typer.Option("float16", "--attn-dtype", help="float16 | float32."),
    cameras: str = typer.Option(None, "--cameras", help="Comma-separated cameras (default: the plan's camera)."),
    state_key: str = typer.Option("state", "--state-key", help="Low-dim column of the state."),
    action_key: str = typer.Option("action", "--action-key", help="Low-dim column of the actions."),
    state_indices: str = typer.Option(None, "--state-indices", help="State elements kept, e.g. '0-17,36-38' "
                                                                    "(needed when the state is longer than 32)."),
    normalize: str = typer.Option("auto", "--normalize", help="auto | dataset | none (mean/std of state, actions)."),
    max_text_tokens: int = typer.Option(48, "--max-text-tokens", min=2, help="Instruction tokens (padded)."),
    tiny_layers: int = typer.Option(4, "--tiny-layers", min=1, help="Depth of the `tiny` teacher."),
    shard_size: int = typer.Option(16, "--shard-size", min=1, help="Clips per shard (and per task)."),
    batch: int = typer.Option(4, "--batch", min=1, help="Samples per teacher forward."),
    device: str = typer.Option("cpu", "--device", help="Torch device: cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N clips of the plan."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `pi0` target version: inputs, velocity (N, K, 50, 32) and attention (N, K, L, 50, P)."""
    from flows.pi0 import Pi0TargetsConfig, run_pi0_targets
    from schemas.model import ModelSpec

    layers = int_list(attn_layers, "--attn-layers")
    config = Pi0TargetsConfig(
        plan=plan, model=model, family=family, pairs=pairs, attn_layers=layers, attn_dtype=attn_dtype,
        cameras=[c.strip() for c in cameras.split(",") if c.strip()] if cameras else None,
        state_key=state_key, action_key=action_key, state_indices=int_list(state_indices, "--state-indices"),
        normalize=normalize, max_text_tokens=max_text_tokens, tiny_layers=tiny_layers, shard_size=shard_size, batch=batch, device=device,
        dtype=dtype, limit=limit)
    ModelSpec.parse(config.model)  # a malformed spec fails here, before Prefect starts
    data_root = get_root(root, writable=True)
    result = run_pi0_targets(data_root, config, runner)
    if result["clips"] == 0 and result["status"] == "complete":
        typer.echo(f"{result['version']} already complete (nothing to do)")
        return
    rate = result["clips"] / result["seconds"] if result["seconds"] > 0 else 0.0
    typer.echo(f"{result['version']} {result['status']}: {result['clips']} samples in {result['seconds']:.1f}s "
               f"({rate:.2f} samples/s)")
