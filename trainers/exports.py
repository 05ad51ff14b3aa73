"""Reading an export into a trainer: the stream over its fields, collating fields into batches,
decoding fp8-coded fields, one decoded sample, and the check that a sample's target versions match a run's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from foresight.storage.fs import Root
from foresight.trainers.config import DataConfig

FP8_SCALE = ".fp8scale"
"""Suffix of the per-channel scales that ShardStream(decode_fp8=False) puts beside an fp8-coded field."""


def collate_fields(samples: list[dict[str, Any]], fields: dict[str, str], slots: Any = None) -> dict[str, Any]:
    """Stack ``fields`` (batch key -> sample field) of ``samples`` into tensors, with any fp8 scales.

    Writes into the next buffer of ``slots`` (trainers.slots.BatchSlots) when given and the batch fits
    it; otherwise uses trainers.data.collate_samples (numpy copies straight into shared memory inside
    workers).
    """
    from foresight.trainers.data import collate_samples
    from foresight.trainers.slots import batch_layout, fill

    picked = []
    for sample in samples:
        item = {}
        for key, name in fields.items():
            item[key] = sample[name]
            if name + FP8_SCALE in sample:
                item[key + FP8_SCALE] = sample[name + FP8_SCALE]
        picked.append(item)
    buffer = slots.take(batch_layout(picked)) if slots is not None else None
    return fill(buffer, picked) if buffer is not None else collate_samples(picked)


def decode_coded(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch with every fp8-coded field (codes + ``.fp8scale``) decoded to float32 where it lies."""
    if not any(key.endswith(FP8_SCALE) for key in batch):
        return batch
    from foresight.trainers.data import fp8_to_float

    decoded = {}
    for key, value in batch.items():
        if key.endswith(FP8_SCALE):
            continue
        scale = batch.get(key + FP8_SCALE)
        decoded[key] = fp8_to_float(value, scale, torch.float32) if scale is not None else value
    return decoded


def open_export(root: Root, export_id: str, fields: list[str], cfg: DataConfig, seed: int,
                pins: dict[str, str] | None = None, shuffle: bool = True):
    """A ShardStream over ``fields`` of an export, pinned to ``pins`` (default: the export's own versions).

    Returns (stream, {field: version id} of the fields read that come from target versions).
    """
    from foresight.storage.exports import ExportStore
    from foresight.trainers.data import ShardStream

    index = ExportStore(root).index(export_id)
    missing = [f for f in fields if f not in index.fields]
    if missing:
        raise ValueError(f"export '{export_id}': no fields {missing} (it has {sorted(index.fields)})")
    versions = {f: index.versions[f] for f in fields if f in index.versions}
    stream = ShardStream(root, export_id, pins if pins is not None else versions, fields=fields, seed=seed,
                         shuffle_shards=cfg.shuffle_shards and shuffle,
                         shuffle_buffer=cfg.shuffle_buffer if shuffle else 0, verify=cfg.verify,
                         decode_fp8=not cfg.fp8_on_device)
    return stream, versions


def export_sample(root: Root, export_id: str, fields: list[str], clip: int | None = None,
                  verify: bool = True) -> dict[str, Any]:
    """One decoded sample of an export by plan row ``clip`` (default: the export's first sample)."""
    from foresight.pipelines.export import decode_sample
    from foresight.storage.exports import ExportStore

    store = ExportStore(root)
    index = store.index(export_id)
    for shard_position, shard in enumerate(index.shards):
        found = np.flatnonzero(shard.clips == clip) if clip is not None else np.arange(min(shard.samples, 1))
        if len(found):
            position = int(found[0])
            _, members = store.read_sample(index, shard_position, position, verify=verify)
            where = f"export '{export_id}', clip {shard.clip(position)}"
            return decode_sample(members, None, where, fields=fields)
    raise ValueError(f"export '{export_id}': no sample of clip {clip} (it has {index.num_samples} samples)")


def check_sample_versions(sample: dict[str, Any], trained: dict[str, str], allow_change: bool, where: str) -> None:
    """Refuse to run a model on fields of other target versions than it was trained on (unless allowed)."""
    given = sample["meta"].get("versions", {})
    changed = {f: (v, given.get(f)) for f, v in trained.items() if f in given and given[f] != v}
    if changed and not allow_change:
        raise ValueError(f"{where}: sample fields come from other target versions than the run was trained on "
                         f"(field: trained, given) {changed}; pass --allow-version-change to use them anyway")
