"""Write the LeRobot v3.0 recording that bench_frame_store.py reads, with the real ``lerobot`` package.

The recording is checked in under ``bench/data/`` so the benchmark runs without lerobot; this
script documents (and re-creates) how it was made: ``LeRobotDataset.create`` + ``add_frame`` +
``save_episode`` + ``finalize``, i.e. lerobot's own PNG staging and its PyAV encode (libsvtav1,
``g=2``, ``crf=30``, yuv420p), its v3.0 file layout and its metadata.

lerobot 0.4.4 needs torch<2.11 and imports torchvision at module import for its training-time
transforms; this environment only has torch 2.13 (CPU) and PyPI's CUDA-only torchvision wheel, so
the script runs lerobot with its dependencies on PYTHONPATH and replaces ``torchvision`` (never
called when writing a dataset) by an empty module. Run (from the repository root):

    pip install --target /tmp/lrpkgs --no-deps 'lerobot==0.4.4'
    pip install --target /tmp/lrpkgs 'datasets>=4,<5' 'jsonlines>=4,<5' 'draccus==0.10.0' \\
        'deepdiff>=7,<9' 'termcolor>=2.4,<4' 'huggingface-hub>=0.34.2,<0.36'
    PYTHONPATH=/tmp/lrpkgs python bench/make_lerobot_recording.py bench/data/lerobot_v30_av1_96x128
"""

from __future__ import annotations

import argparse
import importlib.machinery
import shutil
import sys
import types
from pathlib import Path

import numpy as np


def _without_torchvision() -> None:
    """An importable stand-in for torchvision: lerobot's writer never calls it (see the docstring)."""
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].v2 = modules["torchvision.transforms.v2"]
    modules["torchvision.transforms.v2"].Transform = type("Transform", (), {})
    modules["torchvision.transforms.v2"].functional = modules["torchvision.transforms.v2.functional"]
    sys.modules.update(modules)


def scene_frame(episode: int, t: int, height: int, width: int) -> np.ndarray:
    """A table-top-like frame: lit background, a textured table, a moving block and a moving arm."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.empty((height, width, 3), dtype=np.float32)
    frame[..., 0] = 90 + 60 * yy / height
    frame[..., 1] = 100 + 40 * xx / width
    frame[..., 2] = 120 + 30 * np.sin(xx / 9.0 + episode)
    table = yy > height * 0.55
    grain = 20 * np.sin(xx / 3.0 + 0.3 * yy) * np.cos(yy / 5.0)
    frame[table] = np.stack([150 + grain, 110 + grain, 70 + 0.5 * grain], axis=-1)[table]
    phase = t / 60.0 * 2 * np.pi
    cx, cy = width * (0.3 + 0.4 * (t / 60.0)), height * (0.65 + 0.05 * np.sin(phase + episode))
    block = (np.abs(xx - cx) < width * 0.06) & (np.abs(yy - cy) < height * 0.06)
    frame[block] = [200, 40 + 40 * episode, 40]
    ax = width * (0.5 + 0.3 * np.cos(phase))
    arm = (np.abs(xx - ax - (yy - height * 0.2) * 0.3) < width * 0.025) & (yy < cy)
    frame[arm] = [60, 60, 70]
    rng = np.random.default_rng(episode * 1000 + t)
    frame += rng.normal(0, 2.0, frame.shape)  # sensor noise
    return np.clip(frame, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args()
    _without_torchvision()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if args.out.exists():
        shutil.rmtree(args.out)
    features = {
        "observation.images.top": {"dtype": "video", "shape": (args.height, args.width, 3),
                                   "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
    }
    dataset = LeRobotDataset.create(repo_id="foresight/bench_frame_store", fps=args.fps, features=features,
                                    root=args.out, robot_type="so100", use_videos=True, image_writer_threads=0)
    for episode in range(args.episodes):
        for t in range(args.frames):
            state = np.sin(0.1 * t + np.arange(6) + episode).astype(np.float32)
            dataset.add_frame({"observation.images.top": scene_frame(episode, t, args.height, args.width),
                               "observation.state": state, "action": np.roll(state, 1),
                               "task": "push the block to the right"})
        dataset.save_episode()
    dataset.finalize()
    print(f"wrote {args.out}: {sum(p.stat().st_size for p in args.out.rglob('*') if p.is_file())} bytes")


if __name__ == "__main__":
    main()
