"""``foresight train shallow-pi``: distil a π0 teacher into a layer-subsampled student."""

from __future__ import annotations

from pathlib import Path

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root, sub_app
from foresight.flows.cli.pi0 import int_list
from foresight.flows.cli.train import (ALLOW_OPTION, BATCH_OPTION, CONFIG_OPTION, DEVICE_OPTION, EVAL_OPTION, RUN_ID_OPTION,
                             STEPS_OPTION, STOP_OPTION, TRAIN_HELP, WORKERS_OPTION, echo_result, loop_overrides)


def register(app: typer.Typer) -> None:
    sub_app(app, "train", TRAIN_HELP).command("shallow-pi")(cmd_shallow_pi)


def cmd_shallow_pi(
    export: str = typer.Option(..., "--export", help="Export of a pi0 target version."),
    teacher: str = typer.Option(None, "--teacher", help="π0 teacher spec the student is cut from (the one that "
                                                        "made the targets): hf:, dir:, random or tiny."),
    layers: int = typer.Option(None, "--layers", min=1, help="Student depth of both stacks (L_S)."),
    preset: str = typer.Option(None, "--preset", help="Sourced settings as defaults, e.g. 'shallow-pi' "
                                                      "(docs/RECIPES.md); explicit options win."),
    mode: str = typer.Option(None, "--mode", help="online (default: teacher run beside the student, fresh "
                                                  "(t, noise) every step) | offline (the export's cached pairs, "
                                                  "an approximation)."),
    augment: bool = typer.Option(None, "--augment/--no-augment", help="Image augmentation (online only; "
                                                                      "default on when online)."),
    lambda_kd: float = typer.Option(None, "--lambda-kd", min=0, help="Weight of the velocity distillation loss."),
    lambda_attn: float = typer.Option(None, "--lambda-attn", min=0, help="Weight of the attention KL loss."),
    attn_heads: str = typer.Option(None, "--attn-heads", help="mean (default: L_attn between head-averaged "
                                                              "maps) | all (per head; online only)."),
    attn_layers: str = typer.Option(None, "--attn-layers", help="Student layers of L_attn, e.g. '1,2,3,4' "
                                                                "(default: all but the first and last)."),
    tiny_layers: int = typer.Option(None, "--tiny-layers", min=1, help="Depth of the `tiny` teacher."),
    teacher_family: str = typer.Option(None, "--teacher-family", help="pi0 | pi05 (π0.5): architecture of a "
                                                                      "random/tiny teacher (default: the targets')."),
    config: Path = CONFIG_OPTION, steps: int = STEPS_OPTION, batch_size: int = BATCH_OPTION,
    device: str = DEVICE_OPTION, workers: int = WORKERS_OPTION, run_id: str = RUN_ID_OPTION,
    eval_export: str = EVAL_OPTION, allow_version_change: bool = ALLOW_OPTION, stop_at: int = STOP_OPTION,
    root: str | None = ROOT_OPTION,
) -> None:
    """Train a Shallow-π student: L_task + lambda_kd L_kd + lambda_attn L_attn, online (default) or offline."""
    from foresight.trainers.config import load_config
    from foresight.trainers.shallow_pi import ShallowPiRunConfig, train_shallow_pi

    overrides = loop_overrides(steps, batch_size, device, workers) | {
        "preset": preset, "teacher": teacher, "layers": layers, "mode": mode, "augment": augment,
        "lambda_kd": lambda_kd, "lambda_attn": lambda_attn, "attn_layers": int_list(attn_layers, "--attn-layers"), "attn_heads": attn_heads,
        "tiny_layers": tiny_layers, "teacher_family": teacher_family}
    cfg = load_config(ShallowPiRunConfig, config, overrides)
    data_root = get_root(root, writable=True)
    result = train_shallow_pi(data_root, export, cfg, run_id, eval_export, allow_version_change, stop_at)
    echo_result(result, data_root.url)
