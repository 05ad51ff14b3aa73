"""Shallow-π: what distilling from the offline cache costs against online distillation, measured side
by side in one run.

Every student starts from the same cut of the same teacher (uniform layer map), trains the same
number of steps on the same observations with the same optimiser, batch and seed, through the real
trainer (trainers.shallow_pi.ShallowPiTask under trainers.loop.fit). They differ only in where the
teacher's targets come from:
- ``offline``: K fixed (t, noise) pairs per sample, computed once by pipelines.pi0.compute_targets
  (what the pi0-targets stage stores), one drawn per sample per step, no augmentation;
- ``online``: the frozen teacher run at a fresh (t, noise) per sample every step, without
  augmentation (the same inputs as offline: only the regime differs);
- ``online+aug``: the default, online with openpi's image augmentation.

The actions are the teacher's own chunks (a random teacher is no expert of random actions; see
:func:`teacher_labelled`). The gap is the student's distance to the teacher afterwards
(trainers.shallow_pi.teacher_gap) at (t, noise) pairs no run trained on, over the training
observations and over held-out ones: the velocity MSE at the same (x_t, t) and the MSE of the
10-step action chunk from the same noise. The figure is the ratio offline / online of each error
(above 1: the cache costs accuracy); the untrained cut and the seconds per step of each regime are
printed beside it.

    python bench/bench_shallow_pi_gap.py                                  # tiny π0, CPU (~2 min)
    python bench/bench_shallow_pi_gap.py --size real --device cuda        # random full-size π0 (H100)

Prints a JSON record (and writes it to --out after every phase, so a run cut short by a time limit
keeps what it measured; each phase also prints a timestamped line to stderr). ``--modes offline,online``
trains only those regimes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foresight.pipelines import pi0  # noqa: E402
from foresight.storage.fs import open_root  # noqa: E402
from foresight.trainers import shallow_pi  # noqa: E402
from foresight.storage.runs import RunSpec, read_metrics  # noqa: E402
from foresight.trainers.batching import MemoryStream  # noqa: E402
from foresight.trainers.config import LoopConfig, OptimConfig  # noqa: E402
from foresight.trainers.distributed import seed_everything  # noqa: E402
from foresight.trainers.loop import fit  # noqa: E402

SIZES = {
    # teacher spec, student layers, student attn layers, train / eval observations, K, batch, steps, lr
    "tiny": dict(teacher="tiny", layers=2, attn_layers=[1], train=8, eval=8, pairs=4, batch=4, steps=60, lr=1e-4),
    "real": dict(teacher="random", layers=6, attn_layers=None, train=32, eval=16, pairs=4, batch=8, steps=100,
                 lr=5e-5),
}
EVAL_PAIRS = 2
"""Held-out (t, noise) pairs per observation at which the gap is measured."""
MODES = {"offline": ("offline", False), "online": ("online", False), "online+aug": ("online", True)}


def observations(count: int, params: pi0.Pi0TargetParams, seed: int) -> dict[str, np.ndarray]:
    """Stacked pi0 sample inputs of ``count`` synthetic observations (smooth images, action random walks)."""
    rng = np.random.default_rng(seed)
    size = params.image_size
    samples = []
    for index in range(count):
        grid = np.linspace(0, 1, size)
        phase = rng.uniform(0, 2 * np.pi, 3)
        image = 127.5 * (1 + np.sin(6 * grid[:, None, None] + 4 * grid[None, :, None] + phase[None, None, :]))
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        actions = np.cumsum(rng.normal(0, 0.1, (params.chunk_size, 7)), axis=0)
        samples.append(pi0.assemble_sample(image[None], f"task {index % 4}: move to target {index}",
                                           rng.normal(size=8), actions, params, None))
    return pi0.stack_samples(samples)


@torch.no_grad()
def teacher_labelled(teacher, arrays: dict[str, np.ndarray], keys: list[str], device: torch.device,
                     batch: int) -> dict[str, np.ndarray]:
    """``arrays`` with the actions replaced by the teacher's own chunk (from per-observation noise).

    A random teacher is not an expert of random actions: the task loss would pull the student away
    from it and confound the gap. Labelled by the teacher, the data is what the teacher would do,
    as for a trained teacher on its own demonstrations.
    """
    out = dict(arrays)
    chunks = []
    for start in range(0, len(keys), batch):
        part = {name: value[start:start + batch] for name, value in arrays.items()}
        model_batch = pi0.make_batch(part, teacher.config, device)
        seeds = np.array([pi0.sample_seed("gap-label", key) for key in keys[start:start + batch]])
        chunks.append(shallow_pi.sample_chunk(teacher, model_batch, seeds).float().cpu().numpy())
    out["actions"] = (np.concatenate(chunks) * arrays["action_mask"]).astype(np.float32)
    return out


def with_targets(teacher, arrays: dict[str, np.ndarray], keys: list[str], params: pi0.Pi0TargetParams,
                 device: torch.device, batch: int) -> list[dict]:
    """Per-sample records as an export's stream yields them (``pi0.<name>`` fields), with K cached pairs."""
    parts = []
    for start in range(0, len(keys), batch):
        chunk = {name: value[start:start + batch] for name, value in arrays.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            parts.append(pi0.compute_targets(teacher, chunk, keys[start:start + batch], "bench-gap", params, device))
    stacked = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return [{"__key__": key, **{f"pi0.{name}": value[i] for name, value in stacked.items()}}
            for i, key in enumerate(keys)]


def train_student(teacher, samples: list[dict], mode: str, augment: bool, size: dict, root, device, seed: int):
    """A student trained ``size['steps']`` steps in one regime; returns (student, seconds per step)."""
    loop = LoopConfig(steps=size["steps"], batch_size=size["batch"], num_workers=0, device=device.type,
                      log_every=size["steps"], checkpoint_every=size["steps"], keep_last=1, progress=False,
                      seed=seed)
    optim = OptimConfig(lr=size["lr"], weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=1.0)
    cfg = shallow_pi.ShallowPiRunConfig(teacher=size["teacher"], layers=size["layers"], mode=mode, augment=augment,
                                        attn_layers=size["attn_layers"], optim=optim, loop=loop)
    seed_everything(seed)
    student, layer_map = shallow_pi.build_student(teacher, size["layers"])
    shallow_pi.freeze_unused(student)
    task = shallow_pi.ShallowPiTask(student, teacher if mode == "online" else None, layer_map, cfg, ["front"])
    spec = RunSpec(root, f"gap-{mode}-{int(augment)}", shallow_pi.KIND, None, {}, {"run": cfg.model_dump(mode="json")})
    fit(task, MemoryStream(samples, seed=seed), spec, loop, optim)
    # The loop's own figure: training steps only (no checkpoint writing).
    samples_per_s = [m for m in read_metrics(root, spec.run_id) if m.get("split") == "train"][-1]["samples_per_s"]
    return student.eval(), size["batch"] / samples_per_s


def measure_gap(student, teacher, samples: list[dict], device: torch.device, batch: int) -> dict[str, float]:
    """Mean velocity and chunk MSE to the teacher at EVAL_PAIRS held-out (t, noise) pairs per observation."""
    task = shallow_pi.ShallowPiTask(student, None, [], shallow_pi.ShallowPiRunConfig(lambda_attn=0.0))
    totals = {"velocity_mse": 0.0, "chunk_mse": 0.0}
    count = 0
    for start in range(0, len(samples), batch):
        part = samples[start:start + batch]
        arrays = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.collate(part).items()}
        model_batch = task.model_batch(arrays, augment=False)
        for j in range(EVAL_PAIRS):
            seeds = np.array([pi0.sample_seed(f"gap-eval-{j}", s["__key__"]) for s in part], dtype=np.int64)
            for name, value in shallow_pi.teacher_gap(student, teacher, model_batch, seeds).items():
                totals[name] += value.item() * len(part)
            count += len(part)
    return {name: total / count for name, total in totals.items()}


class Progress:
    """Timestamped phase lines on stderr, and the record so far written to ``out`` after each phase."""

    def __init__(self, out: Path | None):
        self.out, self.start = out, time.perf_counter()

    def __call__(self, phase: str, record: dict | None = None) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {phase}", file=sys.stderr, flush=True)
        if record is not None and self.out is not None:
            self.out.write_text(json.dumps(record, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    size = dict(SIZES[args.size])
    size.update({k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None})
    device = torch.device(args.device)
    progress = Progress(args.out)
    progress(f"loading the {size['teacher']} teacher on {device}")
    loaded = pi0.load_pi0(size["teacher"], device.type, "float32")
    teacher = loaded.model.requires_grad_(False).eval()
    pi0.use_eager_expert(teacher)
    layer_map = pi0.uniform_layer_map(pi0.num_layers(teacher), size["layers"])
    student_attn = size["attn_layers"] or shallow_pi.middle_layers(size["layers"])
    params = pi0.Pi0TargetParams(pairs=size["pairs"], attn_layers=[layer_map[i] for i in student_attn],
                                 cameras=["front"], tokenizer="bytes", image_size=pi0.image_size(teacher.config))
    keys = [f"obs{i}" for i in range(size["train"] + size["eval"])]
    progress(f"labelling {len(keys)} observations with the teacher's chunks")
    arrays = teacher_labelled(teacher, observations(len(keys), params, args.seed), keys, device, size["batch"])
    progress(f"caching {size['pairs']} (t, noise) pairs per observation (the offline targets)")
    started = time.perf_counter()
    samples = with_targets(teacher, arrays, keys, params, device, size["batch"])
    cache_s = time.perf_counter() - started
    train, held_out = samples[: size["train"]], samples[size["train"]:]
    record = {"size": args.size, "device": args.device, "gpu": torch.cuda.get_device_name(device)
              if device.type == "cuda" else None, "teacher": size["teacher"], "teacher_layers": pi0.num_layers(teacher),
              "student_layers": size["layers"], "steps": size["steps"], "batch": size["batch"], "lr": size["lr"],
              "pairs_cached": size["pairs"], "train_obs": size["train"], "eval_obs": size["eval"],
              "eval_pairs": EVAL_PAIRS, "cache_seconds": cache_s, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = open_root(tmp)
        progress("the untrained cut's gap", record)
        cut, _ = shallow_pi.build_student(teacher, size["layers"])
        record["untrained"] = {"train_obs": measure_gap(cut, teacher, train, device, size["batch"]),
                               "held_out_obs": measure_gap(cut, teacher, held_out, device, size["batch"])}
        del cut
        for name in args.modes:
            mode, augment = MODES[name]
            progress(f"training the {name} student, {size['steps']} steps", record)
            student, step_s = train_student(teacher, train, mode, augment, size, root, device, args.seed)
            record["modes"][name] = {"seconds_per_step": step_s,
                                     "train_obs": measure_gap(student, teacher, train, device, size["batch"]),
                                     "held_out_obs": measure_gap(student, teacher, held_out, device, size["batch"])}
            del student
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record["ratios"] = ratios(record["modes"])
    progress("done", record)
    return record


def ratios(modes: dict) -> dict:
    """offline / online error per observation set and metric, and the step-time ratio."""
    out = {}
    for online in [name for name in ("online", "online+aug") if name in modes and "offline" in modes]:
        for split in ("train_obs", "held_out_obs"):
            for metric in ("velocity_mse", "chunk_mse"):
                offline, other = modes["offline"][split][metric], modes[online][split][metric]
                out[f"offline/{online} {split} {metric}"] = offline / other
        step_s = modes[online]["seconds_per_step"], modes["offline"]["seconds_per_step"]
        out[f"{online}/offline seconds_per_step"] = step_s[0] / step_s[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="Training steps of every run (default per size).")
    parser.add_argument("--lr", type=float, default=None, help="Learning rate of every run (default per size).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated regimes (of {', '.join(MODES)}).")
    args = parser.parse_args()
    args.modes = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    torch.manual_seed(args.seed)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
