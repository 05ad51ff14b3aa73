"""``foresight train decoupler``, ``foresight train action-expert`` and ``foresight predict``.

Another trainer adds its own ``train <name>`` command from its own module, e.g.
``flows/cli/train_shallow_pi.py``::

    from foresight.flows.cli.common import sub_app
    from foresight.flows.cli.train import TRAIN_HELP, CONFIG_OPTION, ..., loop_overrides, echo_result

    def register(app):
        sub_app(app, "train", TRAIN_HELP).command("shallow-pi")(cmd_shallow_pi)

and runs ``trainers.loop.fit`` with its own TrainTask. Multi-GPU / multi-node: launch the same command
under torchrun, e.g. ``torchrun --nproc_per_node 8 $(which foresight) train decoupler ...``; each
rank reads its own shards and rank 0 writes checkpoints and prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from foresight.flows.cli.common import ROOT_OPTION, fail, get_root, sub_app

TRAIN_HELP = "Train models on exports; runs live under <root>/runs/<run_id>/."

CONFIG_OPTION = typer.Option(None, "--config", help="TOML file with any subset of the run config.")
STEPS_OPTION = typer.Option(None, "--steps", min=1, help="Total optimizer steps (overrides [loop] steps).")
BATCH_OPTION = typer.Option(None, "--batch-size", min=1, help="Samples per step per rank.")
DEVICE_OPTION = typer.Option(None, "--device", help="auto, cpu or cuda (overrides [loop] device).")
WORKERS_OPTION = typer.Option(None, "--workers", min=0, help="DataLoader workers per rank.")
SIZE_OPTION = typer.Option(None, "--size", help="Architecture preset: full (reference) or tiny.")
RUN_ID_OPTION = typer.Option(None, "--run-id", help="Run id (default: derived from export and config; reruns resume).")
EVAL_OPTION = typer.Option(None, "--eval-export", help="Held-out export (e.g. the val split) for evaluation.")
ALLOW_OPTION = typer.Option(False, "--allow-version-change",
                            help="Resume on an export whose target versions differ from the checkpoint's (recorded).")
STOP_OPTION = typer.Option(None, "--stop-at", min=1, help="Stop (with a checkpoint) at this step; rerun to resume.")
PRESET_OPTION = typer.Option(None, "--preset", help="Named recipe (svam-calvin, svam-metaworld): its sourced settings "
                                                    "are the defaults; --config and flags win; recorded in the run.")
ARCH_OPTION = typer.Option(None, "--arch", help="release (the released S-VAM architecture) or foresight.")
INIT_OPTION = typer.Option(None, "--init", help="Start from a released checkpoint: dir:<folder or file> | hf:<repo>[@rev].")
ARCH_TABLES = ("model.", "former.", "denoiser.", "perceiver.", "policy.")
DEPENDENT_SETTINGS = {
    "size": (ARCH_TABLES, True),
    "arch": (("former.", "denoiser."), False),
    "objective.kind": (("objective.",), False),
}
"""Setting -> (key prefixes, integers only) of the preset settings that hold only for the preset's value
of that setting: a run that picks another value drops them (sizes belong to a size, the release
modules' settings to arch release, an objective's parameters to that objective)."""


def loop_overrides(steps: int | None, batch_size: int | None, device: str | None, workers: int | None) -> dict[str, Any]:
    """Dotted-key overrides of the [loop] table from the common command-line options."""
    if device is not None and device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: expected auto, cpu or cuda")
    return {"loop.steps": steps, "loop.batch_size": batch_size, "loop.device": device, "loop.num_workers": workers}


def _toml_settings(path: Path | None) -> dict[str, Any]:
    """The settings a TOML run config sets, by dotted key (its values win over a preset's)."""
    import tomllib

    if path is None:
        return {}

    def flatten(table: dict, prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in table.items():
            flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return flat

    try:
        with open(path, "rb") as handle:
            return flatten(tomllib.load(handle), "")
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # load_config reports the problem with the file's name


def preset_overrides(stage: str, preset: str | None, config: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides for ``load_config``: a preset's settings beneath the TOML file's and the flags'.

    The preset comes from ``--preset`` or the file's ``preset`` key. A run that picks another size,
    arch or objective than the preset drops the preset settings that depend on that choice
    (:data:`DEPENDENT_SETTINGS`), with a warning.
    """
    from foresight.schemas.presets import apply_preset, check_preset, preset_values

    explicit = {k: v for k, v in overrides.items() if v is not None}
    settings = _toml_settings(config)
    preset = preset or settings.get("preset")
    if preset is None:
        return explicit
    try:
        values = preset_values(check_preset(preset), stage)
    except ValueError as err:
        fail(str(err))
    if not values:
        typer.echo(f"warning: preset {preset} fixes no {stage} setting", err=True)
    explicit["preset"] = preset
    resolved = apply_preset(preset, stage, explicit)
    shadowed = set(settings) | _dependent_on_other_choices(preset, values, settings | explicit)
    return {k: v for k, v in resolved.items() if k in explicit or k not in shadowed}


def _dependent_on_other_choices(preset: str, values: dict[str, Any], chosen: dict[str, Any]) -> set[str]:
    """Preset settings that hold only for a choice (size, arch, objective) the run made otherwise."""
    dropped: set[str] = set()
    for setting, (prefixes, ints_only) in DEPENDENT_SETTINGS.items():
        if setting not in chosen or values.get(setting, chosen[setting]) == chosen[setting]:
            continue
        keys = sorted(k for k, v in values.items() if k.startswith(prefixes) and k != setting
                      and (not ints_only or type(v) is int))
        typer.echo(f"warning: {setting} {chosen[setting]}: preset {preset}'s settings for {setting} "
                   f"{values[setting]} are ignored ({', '.join(keys)})", err=True)
        dropped |= set(keys)
    return dropped


def is_main_process() -> bool:
    """Only rank 0 of a torchrun job prints."""
    return int(os.environ.get("RANK", "0")) == 0


def echo_result(result: Any, root_url: str) -> None:
    """Print a finished (or stopped) run: id, step, last train and eval metrics, checkpoint."""
    if not is_main_process():
        return
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    typer.echo(f"run {result.run_id}: step {result.step}{resumed}")
    if result.train:
        typer.echo("train " + " ".join(f"{k}={_fmt(v)}" for k, v in result.train.items() if k not in ("split",)))
    if result.eval:
        typer.echo("eval " + " ".join(f"{k}={_fmt(v)}" for k, v in result.eval.items()))
    if result.checkpoint:
        typer.echo(f"checkpoint {root_url}/{result.checkpoint}")


def _fmt(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def cmd_decoupler(export: str = typer.Option(..., "--export", help="Export id to train on."),
                  teacher: str = typer.Option(None, "--teacher", help="Teacher name (fields '<teacher>.target')."),
                  config: Path = CONFIG_OPTION, steps: int = STEPS_OPTION, batch_size: int = BATCH_OPTION,
                  device: str = DEVICE_OPTION, workers: int = WORKERS_OPTION, size: str = SIZE_OPTION,
                  run_id: str = RUN_ID_OPTION, eval_export: str = EVAL_OPTION,
                  allow_version_change: bool = ALLOW_OPTION, stop_at: int = STOP_OPTION,
                  preset: str = PRESET_OPTION, arch: str = ARCH_OPTION, init: str = INIT_OPTION,
                  root: str | None = ROOT_OPTION) -> None:
    """Train the S-VAM decoupler of one teacher: one-step features -> teacher maps (MSE)."""
    from foresight.trainers.decoupler import DecouplerRunConfig, train_decoupler
    from foresight.trainers.config import load_config

    overrides = loop_overrides(steps, batch_size, device, workers) | {"teacher": teacher, "size": size,
                                                                      "arch": arch, "init": init}
    cfg = load_config(DecouplerRunConfig, config, preset_overrides("decoupler", preset, config, overrides))
    data_root = get_root(root, writable=True)
    result = train_decoupler(data_root, export, cfg, run_id, eval_export, allow_version_change, stop_at)
    echo_result(result, data_root.url)


def cmd_action_expert(export: str = typer.Option(..., "--export", help="Export id to train on."),
                      decouplers: str = typer.Option(None, "--decouplers",
                                                     help="Decoupler run ids, comma separated, in concat order."),
                      config: Path = CONFIG_OPTION, steps: int = STEPS_OPTION, batch_size: int = BATCH_OPTION,
                      device: str = DEVICE_OPTION, workers: int = WORKERS_OPTION, size: str = SIZE_OPTION,
                      run_id: str = RUN_ID_OPTION, eval_export: str = EVAL_OPTION,
                      allow_version_change: bool = ALLOW_OPTION, stop_at: int = STOP_OPTION,
                      preset: str = PRESET_OPTION, arch: str = ARCH_OPTION, init: str = INIT_OPTION,
                      objective: str = typer.Option(None, "--objective",
                                                    help="release-edm (the release's) or edm (foresight's)."),
                      root: str | None = ROOT_OPTION) -> None:
    """Train the action expert (aggregator + diffusion policy) over frozen decoupler runs."""
    from foresight.trainers.action_expert import ActionExpertRunConfig, train_action_expert
    from foresight.trainers.config import load_config

    runs = [r.strip() for r in decouplers.split(",") if r.strip()] if decouplers else None
    overrides = loop_overrides(steps, batch_size, device, workers) | {
        "decouplers": runs, "size": size, "arch": arch, "init": init, "objective.kind": objective}
    cfg = load_config(ActionExpertRunConfig, config, preset_overrides("action_expert", preset, config, overrides))
    data_root = get_root(root, writable=True)
    result = train_action_expert(data_root, export, cfg, run_id, eval_export, allow_version_change, stop_at)
    echo_result(result, data_root.url)


def cmd_predict(run: str = typer.Option(..., "--run", help="Run id (decoupler or action-expert)."),
                step: int = typer.Option(None, "--step", min=0, help="Checkpoint step (default: the newest)."),
                export: str = typer.Option(None, "--export", help="Export holding the observation (default: the run's)."),
                clip: int = typer.Option(None, "--clip", min=0, help="Plan row of the clip (default: the first sample)."),
                device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
                seed: int = typer.Option(0, "--seed", help="Sampler noise seed (action expert)."),
                out: Path = typer.Option(None, "--out", help="Write the prediction as .npy here."),
                sheet: Path = typer.Option(None, "--sheet", help="Decoupler runs: contact sheet PNG with the prediction."),
                allow_version_change: bool = ALLOW_OPTION, root: str | None = ROOT_OPTION) -> None:
    """Load a checkpoint and predict for one observation: an action chunk, or a decoupler's maps."""
    import numpy as np
    import torch

    from foresight.storage.runs import RunDir

    data_root = get_root(root)
    run_dir = RunDir(data_root, run)
    info = run_dir.info(step if step is not None else _latest(run_dir))
    export_id = export or info.export_id
    if export_id is None:
        fail(f"run {run}: no export recorded; pass --export")
    torch_device = torch.device(device)
    if info.kind == "decoupler":
        record = _predict_maps(data_root, run, info, export_id, clip, torch_device, allow_version_change, sheet)
    elif info.kind == "action-expert":
        record = _predict_actions(data_root, run, info, export_id, clip, torch_device, seed, allow_version_change)
    else:
        fail(f"run {run}: predict knows decoupler and action-expert runs, not '{info.kind}'")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, record.pop("prediction"))
        record["out"] = str(out)
    else:
        record["prediction"] = record["prediction"].tolist() if info.kind == "action-expert" else "(use --out)"
    typer.echo(json.dumps(record))


def _latest(run_dir: Any) -> int:
    latest = run_dir.latest()
    if latest is None:
        fail(f"run {run_dir.run_id}: no complete checkpoint")
    return latest


def _predict_maps(root: Any, run: str, info: Any, export_id: str, clip: int | None, device: Any,
                  allow_change: bool, sheet: Path | None) -> dict[str, Any]:
    from foresight.trainers.decoupler import load_decoupler, predict_maps, sample_map_metrics, teacher_of
    from foresight.trainers.exports import check_sample_versions, export_sample

    model, info = load_decoupler(root, run, info.step)
    teacher = teacher_of(info)
    fields = ["onestep", f"{teacher}.target", f"{teacher}.reference"]
    sample = export_sample(root, export_id, fields, clip)
    check_sample_versions(sample, info.target_versions, allow_change, f"run {run}")
    pred = predict_maps(model, sample, teacher, device)
    record = {"run": run, "step": info.step, "export": export_id, "clip": sample["meta"]["clip_index"],
              "teacher": teacher, "shape": list(pred.shape), **sample_map_metrics(pred, sample[f"{teacher}.target"])}
    if sheet is not None:
        record["sheet"] = _write_sheet(root, info, teacher, sample["meta"]["clip_index"], pred, sheet)
    record["prediction"] = pred
    return record


def _write_sheet(root: Any, info: Any, teacher: str, clip: int, pred: Any, path: Path) -> str:
    """Contact sheet of the clip: generated frames, teacher maps, and the prediction in the target's colours."""
    from foresight.flows.cli.viz import clip_sheet
    from foresight.pipelines.viz import ExtraMap, png_bytes
    from foresight.storage.audit import version_label
    from foresight.storage.targets import TargetStore

    teacher_version = info.target_versions[f"{teacher}.target"]
    basis = f"{version_label(TargetStore(root).manifest(teacher_version))} target"
    extra = ExtraMap(label=f"decoupler {info.run_id}\nstep {info.step}", tokens_THWC=pred, basis_of=basis)
    image, _ = clip_sheet(root, [teacher_version], clip_index=clip, extra_maps=[extra])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return str(path)


def _predict_actions(root: Any, run: str, info: Any, export_id: str, clip: int | None, device: Any, seed: int,
                     allow_change: bool) -> dict[str, Any]:
    import numpy as np

    from foresight.trainers.action_expert import load_action_expert, predict_actions
    from foresight.trainers.exports import check_sample_versions, export_sample

    task, info = load_action_expert(root, run, info.step)
    teachers = task.decouplers.teachers
    fields = ["onestep", task.text_field, "actions", "actions_mask", *(f"{t}.reference" for t in teachers),
              *(["state"] if task.model.reads_proprio else [])]
    sample = export_sample(root, export_id, fields, clip)
    check_sample_versions(sample, info.target_versions, allow_change, f"run {run}")
    actions = predict_actions(task, sample, device, seed)
    record: dict[str, Any] = {"run": run, "step": info.step, "export": export_id, "clip": sample["meta"]["clip_index"],
                              "shape": list(actions.shape)}
    if "actions" in sample:
        mask = np.asarray(sample["actions_mask"], dtype=bool)
        record["action_mse"] = float(((actions - sample["actions"]) ** 2)[mask].mean()) if mask.any() else None
    record["prediction"] = actions
    return record


def register(app: typer.Typer) -> None:
    """Add ``train decoupler``, ``train action-expert`` and ``predict``."""
    train = sub_app(app, "train", TRAIN_HELP)
    train.command("decoupler")(cmd_decoupler)
    train.command("action-expert")(cmd_action_expert)
    app.command("predict")(cmd_predict)
