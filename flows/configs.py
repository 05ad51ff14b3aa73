"""The config model of every target-building stage: plan, text, generate, teachers, pi0, export.

One model per stage is the one source of its settings: the CLI derives its options from these
fields (flows/cli/options.py), ``pipeline.toml`` sections are these models less the linked ids
(flows/pipeline.py), and the flows take them as they are. ``device`` and ``dtype`` default to
``auto`` and are resolved by a validator (schemas/devices.py rules, pipelines/devices.py probe),
so every entry point resolves them alike and the resolved value is what a version keys. This
module imports no torch, diffusers, transformers or Prefect: the CLI imports it at start-up.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from foresight.pipelines.devices import auto_dtype, resolve_device_field
from foresight.pipelines.export import parse_size
from foresight.schemas.base import StrictModel
from foresight.schemas.devices import AUTO, DEVICE_HELP, TORCH_DTYPE_NAMES
from foresight.schemas.presets import check_preset, deep_merge, nest, preset_values, resolve_nested
from foresight.schemas.presets.svd import recipe_values
from foresight.schemas.svd import (ATTENTION_HELP, CROSS_CONTEXT_HELP, DEFAULT_CROSS_CONTEXT, MAX_LENGTH, CrossContext,
                                   SVDParams, check_attention)


# ---------------------------------------------------------------- plans
class PlanConfig(StrictModel):
    """``foresight plan`` parameters; unset source/camera are taken from the dataset."""

    dataset: str = Field(description="Dataset name in the episode store.")
    source: Literal["segments", "episodes"] | None = Field(
        default=None, description="Clip starts from language segments or whole episodes (default: segments "
                                  "when the dataset has any).")
    camera: str | None = Field(default=None, description="Camera (default: the dataset's first camera).")
    frames: int = Field(default=16, ge=1, description="Frames per clip.")
    stride: int = Field(default=2, ge=1, description="Frames between clip frames.")
    every: int = Field(default=8, ge=1, description="Frames between clip starts.")
    limit: int | None = Field(default=None, ge=1, description="At most N clips, spread evenly.")
    split: str | None = Field(default=None, description="Only episodes of this split.")


# ---------------------------------------------------------------- text targets
class TextConfig(StrictModel):
    """``foresight text`` parameters."""

    plan: str = Field(description="Plan id.")
    model: str | None = Field(default=None, description="CLIP text model spec: hf:<repo>[@rev] | dir:<path> | "
                                                        "random | tiny (required unless the preset names one).")
    max_length: int = Field(default=MAX_LENGTH, ge=1, description="Tokens per instruction (padded/truncated).")
    preset: str | None = Field(default=None, description="Release recipe (svam-calvin, svam-metaworld, vpp) whose "
                                                         "text settings are the defaults; explicit ones win.")
    seed: int = Field(default=0, description="Initialisation seed of random/tiny models.")
    device: str = Field(default=AUTO, validate_default=True, description=DEVICE_HELP)
    shard_size: int = Field(default=256, ge=1, description="Clips per shard.")
    workers: int = Field(default=1, ge=1, description="Parallel shard tasks.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's text settings fill in the ones not given."""
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        explicit = {key: value for key, value in data.items() if value is not None}
        return {**preset_values(check_preset(data["preset"]), "text"), **explicit}

    _resolve_device = field_validator("device")(resolve_device_field)

    @model_validator(mode="after")
    def _has_model(self) -> "TextConfig":
        if self.model is None:
            raise ValueError("text: no model spec (give one, or a preset that names one)")
        return self


# ---------------------------------------------------------------- video generation
class GenerateConfig(StrictModel):
    """``foresight generate`` parameters: inputs, model, the SVD settings and how to run."""

    plan: str = Field(description="Plan id.")
    text: str = Field(description="Id of the complete `text` version of the same plan.")
    model: str = Field(description="SVD model spec: hf:<repo>[@rev] | dir:<path> | random | tiny.")
    seed: int = Field(default=0, description="Initialisation seed of random/tiny models.")
    params: SVDParams = Field(default_factory=SVDParams, description="Generation settings (keyed).")
    device: str = Field(default=AUTO, validate_default=True, description=DEVICE_HELP)
    dtype: Literal["auto", "fp32", "fp16", "bf16", "fp8"] = Field(
        default=AUTO, validate_default=True,
        description="UNet/VAE compute dtype (keyed as resolved; auto: fp16 on CUDA, fp32 on CPU); fp8: e4m3 "
                    "transformer Linear layers around float16 (Hopper/Ada GPUs; H100: faster, changes the numbers).")
    batch: int = Field(default=4, ge=1, description="Clips per UNet call, two calls per guided step (H100: 32 "
                                                    "with compile unet).")
    compile: Literal["none", "blocks", "unet"] = Field(
        default="none", description="torch.compile the UNet/decoder per layer (blocks, GPU: 1.4x) or as whole "
                                    "graphs (unet: +4%, longer first call); compiled kernels round differently, "
                                    "so a setting other than none is keyed (a new version).")
    attention: str = Field(default="default", description=f"UNet attention backends: {ATTENTION_HELP}.")
    cross_context: CrossContext = Field(default=DEFAULT_CROSS_CONTEXT, description=f"Text states of the UNet's cross-attention: "
                                                                      f"{CROSS_CONTEXT_HELP}.")
    shard_size: int = Field(default=16, ge=1, description="Clips per shard and per writer.")
    workers: int = Field(default=1, ge=1, description="Parallel shard tasks (each holds a model).")
    compression: Literal["zstd", "none"] = Field(
        default="zstd", description="Codec of the stored one-step features (storage only, not in the version "
                                    "id); 'none' makes random access (ZarrClips) read at page-cache speed.")
    preset: str | None = Field(default=None, description="Release recipe (svam-calvin, svam-metaworld, vpp) whose "
                                                         "generate and extract settings are the defaults of "
                                                         "`params`; explicit params win (keyed).")
    recipe: Literal["fast"] | None = Field(
        default=None, description="Speed recipe over the preset's settings (fast: 12 DPM-Solver++ 2M steps, "
                                  "guidance only where sigma >= 1; docs/RECIPES.md); explicit params win (keyed).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's generate + extract settings, then the speed recipe's, fill in the ``params``
        not given (the recipe wins over the preset, explicit params over both)."""
        if not isinstance(data, dict) or (data.get("preset") is None and data.get("recipe") is None):
            return data
        params = data.get("params")
        explicit = params.model_dump(exclude_unset=True) if isinstance(params, SVDParams) else dict(params or {})
        if data.get("recipe") is not None:
            explicit = deep_merge(nest(recipe_values(data["recipe"])), explicit)
        if data.get("preset") is None:
            return {**data, "params": explicit}
        return {**data, "params": resolve_nested(check_preset(data["preset"]), ("generate", "extract"), explicit)}

    _resolve_device = field_validator("device")(resolve_device_field)
    _check_attention = field_validator("attention")(check_attention)

    @field_validator("dtype")
    @classmethod
    def _resolve_dtype(cls, dtype: str, info: ValidationInfo) -> str:
        return auto_dtype("generate", dtype, info.data.get("device", "cpu"))


# ---------------------------------------------------------------- teachers
class TeachersConfig(StrictModel):
    """One teacher over one video version."""

    video: str = Field(description="Id of the complete `video` target version to read.")
    teacher: str = Field(description="Teacher name: dinov2, da3 or hf.")
    model: str | None = Field(default=None, description="Model spec: hf:<repo>[@rev], dir:<path>, random or tiny "
                                                        "(required unless the preset names one).")
    settings: dict[str, Any] = Field(default_factory=dict, description="Teacher settings (see the teacher's "
                                                                       "settings model); unknown keys are errors.")
    batch: int = Field(default=4, ge=1, description="Clips per forward pass (each clip is T frames).")
    device: str = Field(default=AUTO, validate_default=True, description=DEVICE_HELP)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default=AUTO, validate_default=True, description="Model compute dtype (keyed as resolved; auto: fp32 on "
                                                         "CUDA and CPU); outputs are stored as float16.")
    io_processes: bool | None = Field(default=None, description="Store reads/writes in worker processes "
                                                               "(None: yes on CUDA, where one process's zarr "
                                                               "I/O cannot keep up with the GPU).")
    readers: int | None = Field(default=None, ge=1, description="Reader threads/processes (None: from the cores).")
    writers: int | None = Field(default=None, ge=1, description="Writer threads/processes (None: from the cores).")
    cuda_graphs: bool = Field(default=False, description="CUDA: replay each batch's device work (preprocess, "
                                                         "forwards, store codec) from CUDA graphs, one launch a "
                                                         "batch; the same bytes (not keyed). Off by default: on an "
                                                         "H200 it gained 3% (DINOv2) and lost 6% (DA3, disk-bound).")
    compile_codec: bool = Field(default=True, description="CUDA, fp8 store codec: encode with one "
                                                          "torch.compile graph instead of the eager kernels "
                                                          "(compiled once before the first batch, used only if "
                                                          "it gives the eager bytes on this machine; not keyed).")
    workers: int = Field(default=1, ge=1, description="Parallel tasks (each loads the model once).")
    compression: Literal["zstd", "none"] = Field(default="zstd", description="Codec of the stored target and "
                                                 "reference chunks (storage only, not part of the version id).")
    preset: str | None = Field(default=None, description="Release recipe (svam-calvin, svam-metaworld) whose "
                                                         "settings and weights for this teacher are the defaults; "
                                                         "explicit settings win (keyed).")
    store_codec: Literal["f16", "bf16", "fp8"] = Field(
        default="f16", description="How target and reference values are stored: f16 (float16, 2 bytes a value), "
                                   "bf16 (<= 2^-8 relative error, 2 bytes) or fp8 (companded e4m3 with "
                                   "per-clip, per-channel power-of-two scales, 1 byte: ~4.2% worst relative error, "
                                   "~1.8% relative L2; see pipelines/float_codecs.py). Readers get float16 either "
                                   "way; bf16/fp8 halve the bytes a disk must take. Keyed: a coded version has its "
                                   "own id.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's ``<teacher>.*`` entries fill in the model and the settings not given."""
        if not isinstance(data, dict) or data.get("preset") is None or "teacher" not in data:
            return data
        table = resolve_nested(check_preset(data["preset"]), ("teachers",), {}, prefix=f"{data['teacher']}.")
        model = table.pop("model", None)
        resolved = {**data, "settings": deep_merge(table, dict(data.get("settings") or {}))}
        if model is not None and data.get("model") is None:
            resolved["model"] = model
        return resolved

    _resolve_device = field_validator("device")(resolve_device_field)

    @field_validator("dtype")
    @classmethod
    def _resolve_dtype(cls, dtype: str, info: ValidationInfo) -> str:
        return auto_dtype("teachers", dtype, info.data.get("device", "cpu"))

    @model_validator(mode="after")
    def _has_model(self) -> "TeachersConfig":
        if self.model is None:
            raise ValueError(f"teacher {self.teacher}: no model spec (give one, or a preset that names one)")
        return self


# ---------------------------------------------------------------- pi0 targets
class Pi0TargetsConfig(StrictModel):
    """What ``foresight pi0-targets`` computes and how."""

    plan: str = Field(description="Clip plan id: each clip's first frame is an observation, its actions the chunk.")
    model: str = Field(default="tiny", description="π0 teacher spec: hf:<repo>[@rev], dir:<path>, random or tiny.")
    family: Literal["pi0", "pi05"] = Field(default="pi0", description="Architecture of a random/tiny teacher: π0 "
                                                                      "or π0.5 (a checkpoint's config decides).")
    pairs: int = Field(default=4, ge=0, description="K fixed (t, noise-seed) pairs per sample (0: inputs only, "
                                                    "all that online distillation reads).")
    attn_layers: list[int] | None = Field(
        default=None, description="Teacher layers whose attention is stored; default: the middle layers of "
                                  "a uniform 6-layer student's map; [] stores none.")
    attn_dtype: Literal["float16", "float32"] = Field(default="float16", description="Attention storage dtype.")
    cameras: list[str] | None = Field(default=None, description="Cameras per observation; default: the plan's "
                                                                "camera (the plan must use one).")
    state_key: str = Field(default="state", description="Low-dim column with the robot state.")
    action_key: str = Field(default="action", description="Low-dim column with the actions.")
    state_indices: list[int] | None = Field(default=None, description="State elements kept (needed above 32).")
    normalize: Literal["auto", "dataset", "none"] = Field(
        default="auto", description="Mean/std normalisation of state and actions: 'dataset' requires the "
                                    "dataset statistics, 'auto' uses them when present.")
    max_text_tokens: int = Field(default=48, ge=2, description="Instruction tokens (padded).")
    tiny_layers: int = Field(default=4, ge=1, description="Depth of the `tiny` teacher's two stacks.")
    shard_size: int = Field(default=16, ge=1, description="Clips per shard (and per writer task).")
    batch: int = Field(default=4, ge=1, description="Samples per teacher forward.")
    device: str = Field(default=AUTO, validate_default=True, description=DEVICE_HELP)
    dtype: Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] = Field(
        default=AUTO, validate_default=True, description="Teacher compute dtype (keyed as resolved, by torch's name: "
                                                         "fp32 and float32 are one; auto: fp32 on CUDA and CPU).")
    limit: int | None = Field(default=None, ge=1, description="Only the first N clips of the plan.")
    workers: int = Field(default=1, ge=1, description="Parallel shard tasks (each holds the teacher once per "
                                                      "process).")

    _resolve_device = field_validator("device")(resolve_device_field)

    @field_validator("dtype")
    @classmethod
    def _resolve_dtype(cls, dtype: str, info: ValidationInfo) -> str:
        """Every stage's names (fp32, bf16, fp16) and torch's (what pi0 took first) -> torch's, keyed."""
        dtype = auto_dtype("pi0", dtype, info.data.get("device", "cpu"))
        return TORCH_DTYPE_NAMES.get(dtype, dtype)


# ---------------------------------------------------------------- exports
class ExportConfig(StrictModel):
    """One export: which versions of which plan, which fields, how they are stored."""

    plan: str = Field(description="Plan id whose clips become samples (plan order).")
    targets: list[str] = Field(description="Target version ids to export, each optionally 'alias=version'.")
    fields: list[str] | None = Field(default=None, description="Fields to export; None = every field.")
    shard_size: str = Field(default="1GB", description="Target tar shard size, e.g. 1GB, 256MiB.")
    codec: Literal["f16", "bf16", "fp8"] = Field(default="f16", description="Codec of float target fields: f16, "
                                                                        "bf16 or fp8 (e4m3 + per-channel scales); "
                                                                        "keyed.")
    split: str | None = Field(default=None, description="Only clips of episodes of this split.")
    action_chunk: int = Field(default=10, ge=1, description="Action rows per sample (from the clip's first frame).")
    action_column: str = Field(default="action", description="Episode low-dim column holding actions.")
    state_column: str = Field(default="state", description="Episode low-dim column holding the state.")
    read_batch: int = Field(default=4, ge=1, description="Clips read per zarr selection.")
    workers: int = Field(default=1, ge=1, description="Shards written in parallel.")
    allow_null: bool = Field(default=False, description="Export versions made by the `null` model (simulation "
                                                        "only: bench/bench_scale.py); refused otherwise.")

    @field_validator("shard_size")
    @classmethod
    def _positive_shard_size(cls, value: str) -> str:
        if parse_size(value) <= 0:
            raise ValueError(f"shard_size {value!r}: must be at least one byte")
        return value
