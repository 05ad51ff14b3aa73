"""Trained runs as eval policies: the run's recorded versions -> the models of its inference stack.

An action-expert run records, per export field, the target version it was trained on (``onestep``,
``text``, ``<teacher>.reference``). Those versions' manifests record the models that made them (SVD,
CLIP text, teachers: spec, seed/config or weight digests) and every output-changing setting, so the
eval rebuilds the exact stack: the same SVD one-step settings, the same teachers on the observed
frame, the decoupler checkpoints the run recorded, the run's own checkpoint. Versions missing from
the store, replaced versions and weights whose digest changed are refused unless
``--allow-version-change`` (then recorded in the eval record).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from foresight.flows.eval import EvalConfig, ResolvedPolicy, parse_policy
from foresight.flows.generate import svd_settings
from foresight.pipelines.svd import SVDParams
from foresight.schemas.base import validate
from foresight.schemas.eval import PolicyIdentity
from foresight.schemas.model import ModelIdentity
from foresight.schemas.target import TargetVersion
from foresight.storage import layout
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore

log = logging.getLogger(__name__)

POLICY_KINDS = ("action-expert", "shallow-pi")


@dataclass
class SamplerSpec:
    """A π0-family policy as its run and pi0 version recorded it."""

    params: Any  # pipelines.pi0.Pi0TargetParams
    teacher: ModelIdentity
    tiny_layers: int
    use_teacher: bool


def resolve_run(root: Root, config: EvalConfig) -> ResolvedPolicy:
    """Identity, observation settings and training demo seeds of the run named by ``config.policy``."""
    from foresight.storage.runs import RunDir

    run_id, step = parse_policy(config.policy)
    runs = RunDir(root, run_id)
    step = runs.latest() if step is None else step
    if step is None:
        raise ValueError(f"run {run_id}: no complete checkpoint under {root.url_of(layout.run_dir(run_id))}")
    info = runs.info(step)
    if info.kind not in POLICY_KINDS:
        raise ValueError(f"run {run_id}: a '{info.kind}' run is not a policy; evaluate one of {list(POLICY_KINDS)}")
    if config.pi0_teacher and info.kind != "shallow-pi":
        raise ValueError(f"run {run_id}: --pi0-teacher needs a shallow-pi run (this is a '{info.kind}' run)")
    where = f"run {run_id} step {step}"
    versions, changes = apply_overrides(info.target_versions, config.versions, config.allow_version_change, where)
    manifests = complete_manifests(root, versions, where)
    checkpoints = {f"{run_id}/{name}": digest for name, digest in info.files.items() if name.endswith(".safetensors")}
    if info.kind == "action-expert":
        stack = stack_spec(info.config, versions, manifests, where)
        models = stack.model_keys()
        for record in info.config.get("decouplers", []):
            dec = RunDir(root, record["run_id"]).info(record["step"])
            checkpoints |= {f"{dec.run_id}/{n}": d for n, d in dec.files.items() if n.endswith(".safetensors")}
    else:
        stack = sampler_spec(info.config, manifests, config.pi0_teacher, where)
        models = {"pi0-teacher": stack.teacher.key()}
        if stack.use_teacher:
            checkpoints = {}  # the teacher alone: the student's weights play no part
    kind = "pi0" if config.pi0_teacher else info.kind
    identity = PolicyIdentity(kind=kind, run_id=run_id, step=step, checkpoint_sha256=checkpoints,
                              versions=versions, models=models, settings={"execute": config.execute})
    camera, size, demo_seeds = training_observations(root, info.export_id, where)
    return ResolvedPolicy(identity, config.camera or camera, config.size or size, demo_seeds, changes, stack)


def sampler_spec(run_config: dict[str, Any], manifests: dict[str, TargetVersion], use_teacher: bool,
                 where: str) -> SamplerSpec:
    """The pi0 version's sample parameters and the teacher a Shallow-π run was distilled from."""
    from foresight.pipelines.pi0 import Pi0TargetParams

    pi0_versions = {m.id: m for m in manifests.values() if m.kind == "pi0"}
    if len(pi0_versions) != 1:
        raise ValueError(f"{where}: expected the fields of one pi0 version, found {sorted(pi0_versions)}")
    manifest = next(iter(pi0_versions.values()))
    params = {k: v for k, v in manifest.recipe.params.items() if k in Pi0TargetParams.model_fields}
    teacher = validate(ModelIdentity, run_config["teacher"], f"{where}: teacher")
    return SamplerSpec(params=validate(Pi0TargetParams, params, f"{where}: version {manifest.id} params"),
                       teacher=teacher, tiny_layers=int(run_config["run"].get("tiny_layers") or 4),
                       use_teacher=use_teacher)


def apply_overrides(trained: dict[str, str], overrides: dict[str, str], allow: bool, where: str
                    ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The run's versions with ``overrides`` applied; a real change needs ``allow`` (and is returned)."""
    unknown = sorted(set(overrides) - set(trained))
    if unknown:
        raise ValueError(f"{where}: --versions names fields {unknown} the run was not trained on "
                         f"(it has {sorted(trained)})")
    changes = [{"field": f, "trained": trained[f], "used": v, "reason": "--versions"}
               for f, v in sorted(overrides.items()) if v != trained[f]]
    if changes and not allow:
        listed = ", ".join(f"{c['field']} {c['trained']} -> {c['used']}" for c in changes)
        raise ValueError(f"{where}: {listed} differ from the versions the run was trained on; "
                         "pass --allow-version-change to evaluate it anyway (the change is recorded)")
    return trained | overrides, changes


def complete_manifests(root: Root, versions: dict[str, str], where: str) -> dict[str, TargetVersion]:
    """Manifest per field; one ValueError listing every version missing or incomplete in the store."""
    store = TargetStore(root)
    missing = {field: vid for field, vid in sorted(versions.items()) if store.status(vid) != "complete"}
    if missing:
        listed = ", ".join(f"{field}={vid}" for field, vid in missing.items())
        raise ValueError(f"{where}: was trained on target versions not (completely) in the store {root.url}: "
                         f"{listed}; rebuild them, or pass --versions FIELD=ID --allow-version-change")
    return {field: store.manifest(vid) for field, vid in versions.items()}


def _model(manifest: TargetVersion, field: str, where: str) -> ModelIdentity:
    model = manifest.recipe.model
    if model is None:
        raise ValueError(f"{where}: version {manifest.id} ('{field}') records no model, so its stack cannot be rebuilt")
    return model


def stack_spec(run_config: dict[str, Any], versions: dict[str, str], manifests: dict[str, TargetVersion],
               where: str):
    """The S-VAM stack of an action-expert run, from its versions' manifests."""
    from foresight.pipelines.eval.svam import StackSpec, TeacherSpec

    text_field = run_config["run"]["text_field"]
    needed = ["onestep", text_field, *(f"{d['teacher']}.reference" for d in run_config["decouplers"])]
    absent = [f for f in needed if f not in manifests]
    if absent:
        raise ValueError(f"{where}: the run records no versions for {absent} (it has {sorted(versions)})")
    video, text = manifests["onestep"], manifests[text_field]
    params, dtype = svd_settings(video.recipe.params)
    teachers = {}
    for record in run_config["decouplers"]:
        name, field = record["teacher"], f"{record['teacher']}.reference"
        recipe = manifests[field].recipe
        settings = dict(recipe.params.get("settings", {})) | ({"preprocess": recipe.params["preprocess"]}
                                                             if "preprocess" in recipe.params else {})
        teachers[name] = TeacherSpec(recipe.params.get("teacher", name), _model(manifests[field], field, where),
                                     settings, recipe.params.get("dtype", "fp32"))
    return StackSpec(text=_model(text, text_field, where), text_max_length=int(text.recipe.params.get("max_length", 20)),
                     svd=_model(video, "onestep", where),
                     svd_params=validate(SVDParams, params, f"{where}: version {video.id} params"),
                     svd_dtype=dtype, teachers=teachers)


def training_observations(root: Root, export_id: str | None, where: str) -> tuple[str, int, dict[str, set[int]]]:
    """(camera, frame side, task -> demonstration seeds) of the run's training dataset."""
    from foresight.storage.episodes import EpisodeStore
    from foresight.storage.exports import ExportStore
    from foresight.storage.plans import PlanStore

    if export_id is None:
        return "corner2", 128, {}
    index = ExportStore(root).index(export_id)
    episodes = EpisodeStore(root, index.dataset)
    camera = PlanStore(root).info(index.plan_id).params.get("camera") or next(iter(episodes.info().cameras))
    size = int(episodes.info().cameras[camera][0])
    seeds: dict[str, set[int]] = {}
    for record in episodes.records():
        if "seed" in record.extra:
            seeds.setdefault(record.task, set()).add(int(record.extra["seed"]))
    if not seeds:
        log.warning("%s: dataset %s records no MetaWorld seeds; eval seeds cannot be checked against it",
                    where, index.dataset)
    return camera, size, seeds


def build_run_policy(root: Root, config: EvalConfig):
    """(policy, weight changes): the run's models loaded on ``config.device``."""
    resolved = resolve_run(root, config)
    if isinstance(resolved.stack, SamplerSpec):
        return _sampler_policy(root, config, resolved)
    from foresight.pipelines.eval.svam import SVAMPolicy, load_stack
    from foresight.trainers.action_expert import load_action_expert

    identity = resolved.identity
    expert, _ = load_action_expert(root, identity.run_id, identity.step)
    models, changed = load_stack(resolved.stack, config.device)
    return SVAMPolicy(resolved.stack, models, expert, identity, config.device), check_weight_changes(changed, config,
                                                                                               identity)


def check_weight_changes(changed: list[str], config: EvalConfig, identity: PolicyIdentity) -> list[dict[str, Any]]:
    """The weight changes to record; ValueError unless ``--allow-version-change`` when there are any."""
    if changed and not config.allow_version_change:
        raise ValueError(f"run {identity.run_id} step {identity.step}: the weights loaded for {changed} are not the "
                         "ones its versions recorded (same spec, other files); pass --allow-version-change to "
                         "evaluate it anyway")
    return [{"field": role, "reason": "weights differ from the recorded identity"} for role in changed]


def _sampler_policy(root: Root, config: EvalConfig, resolved: ResolvedPolicy):
    """A Shallow-π student, or the π0 teacher it was cut from, behind the chunk-sampler policy."""
    from foresight.pipelines import pi0
    from foresight.pipelines.eval.chunk_sampler import ChunkSamplerPolicy
    from foresight.trainers.shallow_pi import load_student

    spec, identity = resolved.stack, resolved.identity
    changed: list[str] = []
    tokenizer = None
    if spec.use_teacher or spec.params.tokenizer == "checkpoint":
        loaded = pi0.load_pi0(spec.teacher.spec, config.device, spec.params.dtype, spec.tiny_layers,
                              spec.teacher.family)
        tokenizer = loaded.tokenizer
        changed = ["pi0-teacher"] if loaded.identity.key() != spec.teacher.key() else []
    model = loaded.model if spec.use_teacher else load_student(root, identity.run_id, identity.step)[0]
    policy = ChunkSamplerPolicy(model, spec.params, tokenizer, identity, config.device)
    return policy, check_weight_changes(changed, config, identity)
